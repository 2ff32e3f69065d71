"""The Dopamine optimizer for Python, over the ops that the C++ optimizer calls."""

import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch.optim import Optimizer

__all__ = ["Dopamine"]

_OPTION_NAMES = (
    "lr",
    "sigma",
    "lr_adaptation",
    "beta",
    "beta_s",
    "beta_eta",
    "eps",
    "lr_min",
    "lr_max",
    "weight_decay",
    "seed",
    "noise",
    "non_finite_loss",
)
_STATE_NAMES = ("step", "skipped_steps", "rpe_trace", "rpe_magnitude", "current_lr")

Loss = Union[torch.Tensor, float]


def _as_float(name: str, value: Any, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"Dopamine: invalid {name}: {value!r} (expected a real number)")
    return float(value)


def _check_options(group: Dict[str, Any]) -> None:
    """Raises ValueError naming the first invalid option and its value; the
    rules are the C++ ones (the dopamine::check_options op)."""
    if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
        raise ValueError(f"Dopamine: invalid seed: {group['seed']!r} (expected an int)")
    for name in ("lr_adaptation", "noise", "non_finite_loss"):
        if not isinstance(group[name], str):
            raise ValueError(f"Dopamine: invalid {name}: {group[name]!r} (expected a string)")
    try:
        torch.ops.dopamine.check_options(
            _as_float("lr", group["lr"]),
            _as_float("sigma", group["sigma"]),
            group["lr_adaptation"],
            _as_float("beta", group["beta"]),
            _as_float("beta_s", group["beta_s"]),
            _as_float("beta_eta", group["beta_eta"]),
            _as_float("eps", group["eps"]),
            _as_float("lr_min", group["lr_min"], optional=True),
            _as_float("lr_max", group["lr_max"], optional=True),
            _as_float("weight_decay", group["weight_decay"]),
            group["noise"],
            group["non_finite_loss"],
        )
    except RuntimeError as error:
        raise ValueError(str(error).splitlines()[0]) from None


def _check_params(params: List[torch.Tensor], group_index: int) -> None:
    seen = set()
    for i, param in enumerate(params):
        where = f"Dopamine: parameter {i} of group {group_index}"
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"{where} is a {type(param).__name__}, not a tensor")
        if not param.is_floating_point():
            raise ValueError(f"{where} has dtype {param.dtype}; expected a floating-point tensor")
        if param.layout != torch.strided:
            raise ValueError(f"{where} has layout {param.layout}; sparse parameters are not supported")
        if id(param) in seen:
            raise ValueError(f"{where} appears more than once in the group")
        seen.add(id(param))


def _loss_value(loss: Any, which: str) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or not loss.is_floating_point():
            raise RuntimeError(
                "Dopamine: the closure must return a scalar floating-point tensor or a "
                f"Python float; the {which} loss has shape {tuple(loss.shape)} and dtype "
                f"{loss.dtype}"
            )
        return loss.item()
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise RuntimeError(
        "Dopamine: the closure must return a scalar floating-point tensor or a Python "
        f"float; the {which} loss is {loss!r} of type {type(loss).__name__}"
    )


class _GroupStep:
    """One parameter group's share of a step: what it perturbs and its next
    state, committed only when the step completes."""

    def __init__(self, group: Dict[str, Any], first_index: int, state: Dict[str, Any]):
        self.group = group
        self.first_index = first_index
        self.next = {name: state.get(name, 0) for name in _STATE_NAMES}
        self.next["step"] += 1

    def perturb(self, sigma: float) -> None:
        group = self.group
        torch.ops.dopamine.perturb_(
            group["params"], group["seed"], self.next["step"], self.first_index, sigma, group["noise"]
        )


class Dopamine(Optimizer):
    r"""Dopamine: forward-only weight perturbation whose step size is adapted by
    the reward prediction error (RPE).

    Each :meth:`step` evaluates the closure twice under ``torch.no_grad()``:
    ``L0 = L(theta)`` and ``L1 = L(theta + sigma * z)``, with ``z`` standard
    noise (normal, or +-1) that is a pure function of (``seed``, step, parameter index,
    element index) and is never stored. With ``delta = L1 - L0`` it updates
    ``theta <- theta - eta_t * (delta / sigma) * z - lr * weight_decay * theta``
    in the same pass that removes the perturbation.

    Args:
        params: parameters, or dicts defining parameter groups.
        lr: base learning rate ``eta0`` (>= 0).
        sigma: perturbation scale (> 0).
        lr_adaptation: ``"rpe_normalized"`` (default; ``eta_t = lr / (m_hat + eps)``,
            ``m_hat`` the bias-corrected EMA of ``|delta| / sigma``), ``"rpe_tracking"``
            (``eta_t = (1 - beta_eta) eta_{t-1} + beta_eta s_t``, ``s`` the EMA of
            ``|delta|``) or ``"none"`` (standard weight perturbation).
        beta: EMA constant of ``rpe_normalized``, in [0, 1).
        beta_s: EMA constant of ``rpe_tracking``'s RPE magnitude, in [0, 1).
        beta_eta: ``rpe_tracking``'s learning-rate tracking rate, in [0, 1].
        eps: added to the RPE trace before dividing (> 0).
        lr_min, lr_max: optional clamp of ``eta_t`` in every mode.
        weight_decay: decoupled weight decay, applied as ``lr * weight_decay``.
        seed: key of the group's noise (an int).
        noise: ``"gaussian"`` (default; ``z`` standard normal) or ``"rademacher"``
            (each element +1 or -1, as in SPSA; ``E[z z^T] = I`` still holds).
        non_finite_loss: ``"skip"`` (restore, count the step in
            ``skipped_steps``, return the loss) or ``"raise"`` (restore, raise
            RuntimeError). Read from the optimizer's defaults.

    The state is one record per group, kept under the group's first parameter:
    ``step``, ``skipped_steps``, ``rpe_trace``, ``rpe_magnitude``, ``current_lr``.
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, Dict[str, Any]]],
        lr: float = 0.1,
        sigma: float = 0.01,
        lr_adaptation: str = "rpe_normalized",
        beta: float = 0.9,
        beta_s: float = 0.9998,
        beta_eta: float = 2e-4,
        eps: float = 1e-8,
        lr_min: Optional[float] = None,
        lr_max: Optional[float] = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        noise: str = "gaussian",
        non_finite_loss: str = "skip",
    ):
        defaults = dict(
            lr=lr,
            sigma=sigma,
            lr_adaptation=lr_adaptation,
            beta=beta,
            beta_s=beta_s,
            beta_eta=beta_eta,
            eps=eps,
            lr_min=lr_min,
            lr_max=lr_max,
            weight_decay=weight_decay,
            seed=seed,
            noise=noise,
            non_finite_loss=non_finite_loss,
        )
        _check_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group after checking its options and parameters; options it
        does not set are taken from the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Dopamine: a parameter group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        unknown = sorted(set(param_group) - set(_OPTION_NAMES) - {"params", "initial_lr"})
        if unknown:
            raise ValueError(f"Dopamine: unknown option(s) {unknown} in parameter group {len(self.param_groups)}")
        _check_options({**self.defaults, **param_group})
        _check_params(params, len(self.param_groups))
        super().add_param_group({**param_group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing: Dopamine never reads or writes gradients."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Loss]] = None) -> Loss:  # type: ignore[override]
        """Evaluates ``closure`` exactly twice (unperturbed, then perturbed),
        updates the parameters and returns the unperturbed loss as the closure
        returned it. If the closure raises or returns something other than a
        scalar, the parameters are restored, the state is unchanged and the
        error propagates."""
        if closure is None:
            raise RuntimeError(
                "Dopamine.step() needs a closure that returns the loss: each step "
                "evaluates the model twice, unperturbed and perturbed"
            )
        steps: List[_GroupStep] = []
        first_index = 0
        for g, group in enumerate(self.param_groups):
            _check_options(group)
            params = group["params"]
            if params:
                state = self.state.get(params[0])
                if not state:
                    _check_params(params, g)
                steps.append(_GroupStep(group, first_index, state or {}))
            first_index += len(params)

        def commit(group_step: _GroupStep) -> None:
            self.state[group_step.group["params"][0]] = dict(group_step.next)

        def skip(loss: Loss, value: float, which: str) -> Loss:
            if self.defaults["non_finite_loss"] == "raise":
                raise RuntimeError(
                    f"Dopamine: the {which} loss is {value}; parameters restored, step "
                    "not taken (non_finite_loss='raise')"
                )
            for group_step in steps:
                group_step.next["skipped_steps"] += 1
                commit(group_step)
            return loss

        loss = closure()
        unperturbed = _loss_value(loss, "unperturbed")
        if not math.isfinite(unperturbed):
            return skip(loss, unperturbed, "unperturbed")

        perturbed_groups = 0
        try:
            for group_step in steps:
                group_step.perturb(group_step.group["sigma"])
                perturbed_groups += 1
            perturbed = _loss_value(closure(), "perturbed")
        except BaseException:
            for group_step in steps[:perturbed_groups]:
                group_step.perturb(-group_step.group["sigma"])
            raise
        if not math.isfinite(perturbed):
            for group_step in steps:
                group_step.perturb(-group_step.group["sigma"])
            return skip(loss, perturbed, "perturbed")

        delta = perturbed - unperturbed
        for group_step in steps:
            group, state = group_step.group, group_step.next
            rpe_trace, rpe_magnitude, lr = torch.ops.dopamine.adapt_lr(
                group["lr_adaptation"],
                delta,
                state["step"] - state["skipped_steps"],
                float(group["lr"]),
                float(group["sigma"]),
                float(group["beta"]),
                float(group["beta_s"]),
                float(group["beta_eta"]),
                float(group["eps"]),
                _as_float("lr_min", group["lr_min"], optional=True),
                _as_float("lr_max", group["lr_max"], optional=True),
                state["rpe_trace"],
                state["rpe_magnitude"],
                state["current_lr"],
            )
            state.update(rpe_trace=rpe_trace, rpe_magnitude=rpe_magnitude, current_lr=lr)
            torch.ops.dopamine.restore_update_(
                group["params"],
                group["seed"],
                state["step"],
                group_step.first_index,
                float(group["sigma"]),
                lr * delta / group["sigma"],
                float(group["lr"]) * float(group["weight_decay"]),
                group["noise"],
            )
            commit(group_step)
        return loss

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state saved by :meth:`state_dict`. A state of another
        optimizer, or for other parameters, raises ValueError and leaves this
        optimizer as it was."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("Dopamine.load_state_dict: expected a dict with 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"Dopamine.load_state_dict: the state has {len(groups)} parameter group(s), "
                f"this optimizer {len(self.param_groups)}"
            )
        for g, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            missing = [name for name in _OPTION_NAMES if name not in saved]
            if missing:
                raise ValueError(
                    f"Dopamine.load_state_dict: parameter group {g} lacks {missing}; "
                    "the state is not a Dopamine optimizer's"
                )
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    f"Dopamine.load_state_dict: parameter group {g} has {len(saved['params'])} "
                    f"parameter(s) in the state, {len(ours['params'])} in this optimizer"
                )
            _check_options(saved)
        for index, entry in state_dict["state"].items():
            if set(entry) != set(_STATE_NAMES):
                raise ValueError(
                    f"Dopamine.load_state_dict: the state of parameter {index} has keys "
                    f"{sorted(entry)}, expected {sorted(_STATE_NAMES)}; the state is not "
                    "a Dopamine optimizer's"
                )
        super().load_state_dict(state_dict)
