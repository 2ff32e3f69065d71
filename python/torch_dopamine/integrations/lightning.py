"""Dopamine in PyTorch Lightning, in manual optimisation
(docs/INTEGRATIONS.md)."""

from typing import Any

import lightning
import torch

from ..optimizer import Dopamine

__all__ = ["DopamineModule"]


class DopamineModule(lightning.LightningModule):
    """A ``LightningModule`` trained by :class:`Dopamine`, forward passes
    only. Subclass it and define :meth:`loss`; ``dopamine_options`` are
    Dopamine's options (``lr``, ``sigma``, ``num_perturbations``, ...).

    Each training step is one Dopamine step, with ``self.loss(batch)`` as its
    closure, evaluated ``num_perturbations + 1`` times under ``no_grad``
    (Lightning's ``on_before_optimizer_step`` hooks run after each). The
    unperturbed loss is logged as ``train_loss``. Override
    ``configure_optimizers`` for parameter groups or a scheduler.
    """

    def __init__(self, **dopamine_options: Any):
        super().__init__()
        # Lightning would otherwise call backward on the loss.
        self.automatic_optimization = False
        self.dopamine_options = dopamine_options

    def loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of the model on ``batch``."""
        raise NotImplementedError("DopamineModule: define loss(batch), the scalar loss of the model on a batch")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return Dopamine([p for p in self.parameters() if p.requires_grad], **self.dopamine_options)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.optimizers().step(closure=lambda: self.loss(batch))
        self.log("train_loss", loss, prog_bar=True)
        # Manual optimisation leaves the schedulers to the module.
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else filter(None, [schedulers]):
            scheduler.step()
        return loss
