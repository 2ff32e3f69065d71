"""Dopamine in Hugging Face's ``transformers.Trainer`` (docs/INTEGRATIONS.md).

Each training step is one Dopamine step: the Trainer's loss (its
``compute_loss``) is evaluated unperturbed and along each direction, under
``no_grad``, and no backward pass runs.
"""

import warnings
from typing import Any, Dict, Optional

import torch
import transformers

from ..optimizer import Dopamine

__all__ = ["DopamineTrainer"]


class _TrainerDopamine(Dopamine):
    """Dopamine as :class:`DopamineTrainer` drives it: the step is taken in
    ``training_step``, with the loss as its closure, so the Trainer's own
    ``optimizer.step()`` that follows it has nothing left to do. Any other
    call without a closure is refused, as :class:`Dopamine` refuses it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._taken_in_training_step = False

    def step(self, closure=None):  # type: ignore[override]
        if closure is None and self._taken_in_training_step:
            self._taken_in_training_step = False
            return None
        loss = super().step(closure)
        self._taken_in_training_step = True
        return loss


class DopamineTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with :class:`Dopamine`, forward
    passes only.

    Dopamine's ``lr`` is ``TrainingArguments.learning_rate``, and the
    Trainer's scheduler scales it; ``weight_decay`` is the Trainer's too,
    applied as it applies AdamW's (not to biases and norms). Dopamine's other
    options come from ``dopamine_options`` (``sigma``, ``num_perturbations``,
    ``master_weights``, ``seed``, ...). Dopamine's ``lr`` is on its own scale
    (its default is 0.1, docs/OPTIONS.md), not AdamW's.

    Each step calls ``compute_loss`` ``num_perturbations + 1`` times; with
    ``restore_rng`` (the default) dropout draws the same mask in each. There
    is no gradient: ``gradient_accumulation_steps`` must be 1 (take a larger
    batch instead), ``fp16`` loss scaling does not apply (use ``bf16``, or a
    half-precision model with ``master_weights``), and ``max_grad_norm`` has
    nothing to clip.
    """

    def __init__(self, *args: Any, dopamine_options: Optional[Dict[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dopamine_options = dict(dopamine_options or {})
        for name, where in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            if name in self.dopamine_options:
                raise ValueError(
                    f"DopamineTrainer: {name} is set through TrainingArguments.{where}, not dopamine_options"
                )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "DopamineTrainer: gradient_accumulation_steps must be 1, got "
                f"{self.args.gradient_accumulation_steps}: a forward-only step has no gradient to accumulate; "
                "use a larger per_device_train_batch_size"
            )
        if self.args.fp16:
            raise ValueError(
                "DopamineTrainer: fp16=True scales a loss for its backward pass, and Dopamine makes none; "
                "use bf16=True, or a float16 model with dopamine_options={'master_weights': True}"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, _TrainerDopamine):
            raise ValueError(
                "DopamineTrainer makes its own Dopamine optimizer; pass its options as dopamine_options, "
                f"not an optimizer ({type(self.optimizer).__name__})"
            )
        if self.args.learning_rate == transformers.TrainingArguments.learning_rate:
            warnings.warn(
                f"DopamineTrainer: learning_rate is the Trainer's default ({self.args.learning_rate}), chosen "
                "for AdamW; it is Dopamine's lr, whose default is 0.1 (docs/INTEGRATIONS.md)",
                stacklevel=2,
            )

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups = [
                {
                    "params": [p for n, p in model.named_parameters() if p.requires_grad and (n in decay) == decays],
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                }
                for decays in (True, False)
            ]
            self.optimizer = _TrainerDopamine(
                [group for group in groups if group["params"]], lr=self.args.learning_rate, **self.dopamine_options
            )
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: Dict[str, Any], num_items_in_batch: Optional[Any] = None
    ) -> torch.Tensor:
        """One Dopamine step on ``inputs``; returns its unperturbed loss."""
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        # The Dopamine optimizer itself: accelerate's wrapper would hand the
        # closure to a loss scaler meant for gradients.
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        loss = optimizer.step(closure)
        return loss.detach()
