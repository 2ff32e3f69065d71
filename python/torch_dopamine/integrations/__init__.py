"""Dopamine in the frameworks users fine-tune with, imported only on demand
(docs/INTEGRATIONS.md):

- :mod:`torch_dopamine.integrations.huggingface`: ``DopamineTrainer``, a
  ``transformers.Trainer`` that trains with Dopamine and no backward pass;
- :mod:`torch_dopamine.integrations.lightning`: ``DopamineModule``, a
  ``lightning.LightningModule`` in manual optimisation.

Importing this package imports neither framework; each module needs its own.
"""
