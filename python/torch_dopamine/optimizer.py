"""The Dopamine optimizer for Python, over the ops that the C++ optimizer calls."""

import functools
import math
import numbers
import operator
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ._engine import STATE_FIELDS, StepTable
from ._options import IN_EVERY_STATE, OLDER_STATE_VALUES, OPTION_NAMES, PackedOptions, code, pack
from .distributed import (
    Collective, check_parallel, check_sharding, checksum, describe, held_alike, is_dtensor, local_pieces, replicated,
)
from .trajectory import Recorder

__all__ = ["Dopamine", "STATE_FIELDS"]

# The version of the layout of state_dict(): 2 added rpe_baseline to the
# group state. A state of format 1, or saved before formats were numbered,
# loads with its group states given b = 0.
STATE_FORMAT = 2

Loss = Union[torch.Tensor, float]


def _check_params(params: List[torch.Tensor], group_index: int) -> None:
    seen = set()
    for i, param in enumerate(params):
        where = f"Dopamine: parameter {i} of group {group_index}"
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"{where} is a {type(param).__name__}, not a tensor")
        check_sharding(param, where)
        if not param.is_floating_point():
            raise ValueError(f"{where} has dtype {param.dtype}; expected a floating-point tensor")
        if param.layout != torch.strided:
            raise ValueError(f"{where} has layout {param.layout}; sparse parameters are not supported")
        if id(param) in seen:
            raise ValueError(f"{where} appears more than once in the group")
        seen.add(id(param))


def _loss_tensor(loss: Any, which: str) -> torch.Tensor:
    """The loss as a float64 scalar tensor, after checking what the closure
    returned."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or not loss.is_floating_point():
            raise RuntimeError(
                "Dopamine: the closure must return a scalar floating-point tensor or a "
                f"Python float; the {which} loss has shape {tuple(loss.shape)} and dtype "
                f"{loss.dtype}"
            )
        # A copy: a closure may return the same buffer at every call.
        return loss.detach().reshape(()).to(torch.float64, copy=True)
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=torch.float64)
    raise RuntimeError(
        "Dopamine: the closure must return a scalar floating-point tensor or a Python "
        f"float; the {which} loss is {loss!r} of type {type(loss).__name__}"
    )


@functools.lru_cache(maxsize=16)
def _evaluations(antithetic: bool, directions: int) -> Tuple[Tuple[int, int, str], ...]:
    """The evaluations of a step in plan_step's order, as (offset,
    direction, name): the parameters carry offset * sigma * z_direction.
    Cached: every step of an optimizer asks for the same ones."""
    return tuple(zip(*torch.ops.dopamine.evaluations(antithetic=antithetic, directions=directions)))


def _is_half(param: torch.Tensor) -> bool:
    return param.dtype in (torch.bfloat16, torch.float16)


class _Generators:
    """torch's random generators (the CPU's, and those of the CUDA devices
    of ``params``) as they were when made; :meth:`restore` sets them so
    again, so that every evaluation of a step draws the same numbers."""

    def __init__(self, params: List[torch.Tensor]):
        self.cpu = torch.get_rng_state()
        # No tensor is on a GPU before CUDA is initialised: nothing to scan.
        self.cuda = {p.device: None for p in params if p.is_cuda} if torch.cuda.is_initialized() else {}
        for device in self.cuda:
            self.cuda[device] = torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


_requires_grad = operator.attrgetter("requires_grad")


class _GroupShare:
    """A parameter group's share of a step: its trainable parameters, the
    tensors the ops update for them (``local_pieces``) with their global
    indices and element offsets, their master weights and the group's state
    (None before its first step). Once a step commits it, the optimizer
    keeps it for the next steps while it :meth:`fits`, so that a step costs
    no Python work per parameter beyond that check (docs/NOISE_AND_KERNELS.md,
    "Many small tensors")."""

    def __init__(self, group_index: int, params: List[torch.Tensor], first_index: int,
                 state: Optional[torch.Tensor]):
        self.group_index = group_index
        self.params = list(params)
        self.requires_grad = list(map(_requires_grad, params))
        self.first_index = first_index
        self.state = state
        self.trainable: List[torch.Tensor] = []
        self.pieces: List[torch.Tensor] = []
        self.indices: List[int] = []
        self.offsets: List[int] = []
        self.masters: List[torch.Tensor] = []
        self.has_dtensor = False
        # The optimizer's state as the commit left it: the dict itself, and
        # its size, which any parameter's record added or removed changes.
        self.records: Optional[Tuple[Dict[Any, Any], int]] = None

    def fits(self, params: List[torch.Tensor], first_index: int, records: Dict[Any, Any]) -> bool:
        """Whether the group still holds these parameters, in this order,
        with the same requires_grad, at the same place among all groups',
        and the optimizer's state is as the commit left it. A DTensor's
        pieces are taken anew each step."""
        return (
            self.records is not None and self.records[0] is records and self.records[1] == len(records)
            and first_index == self.first_index and len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and list(map(_requires_grad, params)) == self.requires_grad
            and not self.has_dtensor
        )


class _Step:
    """A step's share of the optimizer, taken when it starts (the snapshot):
    the table the ops take (StepTable), and per group in it the group and
    its share; the evaluations; and the trajectory's record of it, if one
    is kept."""

    def __init__(self, antithetic: bool, directions: int):
        self.table = StepTable()
        self.groups: List[Dict[str, Any]] = []
        self.shares: List[_GroupShare] = []
        self.antithetic = antithetic
        self.directions = directions
        self.evaluations = _evaluations(antithetic, directions)
        self.record: Optional[Dict[str, Any]] = None

    def move_to(self, offset: int, direction: int = 0) -> None:
        """Every group comes to carry offset * sigma * z_direction (recorded
        in the trajectory)."""
        if self.table.carries(offset, direction):
            return
        self.table.move_to(offset, direction)
        if self.record is not None:
            self.record["moves"].append((offset, direction, len(self.groups)))

    def restore(self) -> None:
        self.move_to(0)


class Dopamine(Optimizer):
    r"""Dopamine: forward-only weight perturbation whose step size is adapted by
    the reward prediction error (RPE).

    With one direction (``num_perturbations=1``), each :meth:`step` evaluates
    the closure twice under ``torch.no_grad()``:
    ``L0 = L(theta)`` and ``L1 = L(theta + sigma * z)``, with ``z`` standard
    noise (normal, or +-1) that is a pure function of (``seed``, step, parameter index,
    element index) and is never stored. With ``delta = L1 - L0``:

    .. math::
        \begin{aligned}
        m_t &= \beta m_{t-1} + (1 - \beta) |\delta| / \sigma,
            \qquad \eta_t = \eta_0 / (m_t / (1 - \beta^t) + \epsilon)
            \quad \text{(rpe\_normalized)} \\
        \theta &\leftarrow \theta - \eta_t (\delta / \sigma) z
            - \eta_0 \lambda \theta
        \end{aligned}

    in the same pass that removes the perturbation. The default takes two
    directions ``z_0, z_1`` (three evaluations: ``L0`` and one along each),
    the trace takes the mean of their ``|delta_j| / sigma`` and the update
    the mean of their ``eta_t ((delta_j - b) / sigma) z_j``, where ``b``
    (``beta_baseline``) is a running prediction of the part of every
    ``delta_j`` that one-sided differences share; ``num_perturbations=1,
    beta_baseline=None, noise="gaussian"`` is the paper's rule. The defaults
    are the benchmark's choice (docs/DESIGN.md, "Defaults"). The arithmetic is the
    registered ops ``torch.ops.dopamine.*``, which the C++ optimizer calls too
    (docs/DESIGN.md has the whole protocol).

    Args:
        params: parameters, named parameters (``model.named_parameters()``), or
            dicts defining parameter groups. Parameters with
            ``requires_grad=False`` are left untouched, as torch's optimizers
            leave them; they still count in the indices that key the noise.
        lr: base learning rate ``eta0`` (>= 0).
        sigma: perturbation scale (> 0).
        lr_adaptation: ``"rpe_normalized"`` (default; ``eta_t = lr / (m_hat + eps)``,
            ``m_hat`` the bias-corrected EMA of ``|delta| / sigma``), ``"rpe_tracking"``
            (``eta_t = (1 - beta_eta) eta_{t-1} + beta_eta s_t``, ``s`` the EMA of
            ``|delta|``), ``"loss_spread"`` (``eta_t = lr / (d_t + eps)``, ``d_t`` the
            sample standard deviation of the step's perturbed losses, FZOO's rule; its
            ``lr`` is about ``sigma`` times smaller than the others'; needs
            ``num_perturbations >= 2`` or ``antithetic``) or ``"none"`` (standard weight
            perturbation).
        beta: EMA constant of ``rpe_normalized``, in [0, 1).
        beta_s: EMA constant of ``rpe_tracking``'s RPE magnitude, in [0, 1).
        beta_eta: ``rpe_tracking``'s learning-rate tracking rate, in [0, 1].
        eps: added to the RPE trace before dividing (> 0).
        lr_min, lr_max: optional clamp of ``eta_t`` in every mode.
        weight_decay: decoupled weight decay, applied as ``lr * weight_decay``.
        seed: key of the group's noise (an int in [-2**63, 2**63)).
        noise: ``"rademacher"`` (default; each element +1 or -1, as in SPSA:
            ``E[z z^T] = I`` still holds, from one random bit per element) or
            ``"gaussian"`` (``z`` standard normal: the paper's noise).
        non_finite_loss: ``"skip"`` (restore, count the step in
            ``skipped_steps``, return the loss) or ``"raise"`` (restore, raise
            RuntimeError). A step size that is not finite is treated alike.
            Read from the optimizer's defaults.
        capturable: keep losses, step sizes and state on the parameters'
            device, so that a step makes no host synchronisation (and can be
            captured in a CUDA graph); ``non_finite_loss="raise"`` is refused.
            Read from the defaults.
        master_weights: give bfloat16/float16 parameters a float32 master
            weight in the state; the perturbation and the update are computed
            on it and the parameter is its rounding (4 bytes per such
            element). Read from the defaults.
        antithetic: evaluate ``L+ = L(theta + sigma z)`` and ``L- = L(theta -
            sigma z)`` instead of ``L0`` and ``L1``: ``delta = (L+ - L-) / 2``,
            the central difference of MeZO and SPSA, and :meth:`step` returns
            ``(L+ + L-) / 2``. One evaluation serves every group, so all groups
            must have the same value (a step raises ValueError otherwise).
        num_perturbations: the number k of directions per step (an int in
            [1, 65536]): ``z_j`` is keyed by (``seed``, step, j, parameter
            index, element index), ``delta_j`` is measured along each, the RPE
            trace takes the mean of ``|delta_j| / sigma`` and the update is
            the mean over j of ``eta_t (delta_j / sigma) z_j``. k + 1
            evaluations per step (2k with ``antithetic``); the same in every
            group. k = 1 is the rule above, to the bit. Default 2.
        restore_rng: restore torch's random generators (the CPU's, and
            those of the CUDA devices the parameters are on) before every
            evaluation of a step after the first, so that dropout, or
            anything else the closure samples, draws the same numbers in
            every evaluation and the losses differ by the perturbation
            alone; the generators advance across steps as with one
            evaluation per step. Read from the defaults. Default True.
        perturbation: ``"full"`` (default; ``z`` draws every element) or
            ``"lowrank"``: a parameter of two or more dimensions, viewed as
            rows by the rest, takes ``z = (u_0 v_0^T + ... + u_{r-1} v_{r-1}^T)
            / sqrt(r)``, its factors the first ``r (rows + cols)`` draws of its
            noise, so a pass draws ``r (rows + cols)`` numbers instead of
            ``rows x cols``; one-dimensional parameters are perturbed in full.
            Not with ``capturable``, nor over sharded DTensor parameters.
        rank: the rank ``r`` of a ``"lowrank"`` perturbation (an int >= 1, at
            most the smaller side of every parameter of two or more
            dimensions; a step raises ValueError otherwise). Default 1.
        beta_baseline: an EMA constant in [0, 1) (default 0.98), or ``None``
            (``delta_j = L_j - L0``, the paper's RPE): the update takes
            ``delta_j - b``, ``b`` the bias-corrected EMA of the earlier
            steps' mean ``delta_j``, which predicts the curvature offset that
            one-sided RPEs share; the trace still takes ``|delta_j|``. Unused
            with ``antithetic``. One float of state. A checkpoint saved
            without the option loads it as ``None``.
        process_group: a ``torch.distributed`` process group: a step
            all-reduces the losses (8 bytes per evaluation, plus 8) and every
            rank applies the same update; the parameters never travel. Every
            rank must build the optimizer alike (checked here, with one
            all-gather). Not saved in the state, and refused with
            ``capturable``.
        parallel: with a process group, ``"data"`` (every rank's closure
            returns the loss of its own shard of the batch; the step takes
            the mean over the ranks) or ``"population"`` (every rank's closure
            returns the loss of the same batch; rank 0 evaluates the
            unperturbed loss and rank r the directions r, r + W, ... of the
            ``num_perturbations``, which must be a multiple of the world size
            W). Ignored without a process group.
        verify_every: with a process group, every that many steps compare a
            digest of every rank's parameters and raise RuntimeError if they
            differ, after the step (0, the default: never).
        record_trajectory: record every step's scalars, for
            :meth:`trajectory` and :func:`torch_dopamine.replay`.

    The state of every parameter of a group holds the same ``group_state``
    tensor, float64 ``[step, skipped_steps, rpe_trace, rpe_magnitude,
    current_lr, rpe_baseline]`` (see :meth:`group_state`), and, with ``master_weights``,
    its ``master_weight``.
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, Tuple[str, torch.Tensor], Dict[str, Any]]],
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
        noise: str = "rademacher",
        non_finite_loss: str = "skip",
        *,
        capturable: bool = False,
        master_weights: bool = False,
        antithetic: bool = False,
        num_perturbations: int = 2,
        restore_rng: bool = True,
        perturbation: str = "full",
        rank: int = 1,
        beta_baseline: Optional[float] = 0.98,
        process_group: Optional[Any] = None,
        parallel: str = "data",
        verify_every: int = 0,
        record_trajectory: bool = False,
    ):
        # The keywords above are the options, by their names (_options.py).
        arguments = locals()
        defaults = {name: arguments[name] for name in OPTION_NAMES}
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"Dopamine: invalid process_group: {process_group!r} (expected a torch.distributed "
                "ProcessGroup, such as torch.distributed.group.WORLD, or None)"
            )
        # Not in the defaults: a process group is neither saved nor loaded
        # with the state (docs/DESIGN.md, "Many processes").
        self._collective = None
        try:
            pack(defaults)
            if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 0:
                raise ValueError(f"Dopamine: invalid verify_every: {verify_every!r} (expected an int >= 0)")
            if not isinstance(record_trajectory, bool):
                raise ValueError(f"Dopamine: invalid record_trajectory: {record_trajectory!r} (expected a bool)")
            check_parallel(parallel, num_perturbations, 1 if process_group is None else dist.get_world_size(process_group))
            if process_group is None and verify_every:
                raise ValueError("Dopamine: verify_every needs a process_group")
            if process_group is not None and capturable:
                raise ValueError(
                    "Dopamine: capturable=True with a process_group is not supported: a distributed step "
                    "reads on the host whether the closure failed on any rank"
                )
            self._recorder = Recorder(master_weights) if record_trajectory else None
            super().__init__(params, defaults)
            if process_group is not None and parallel == "population" and any(
                replicated(p) is None for group in self.param_groups for p in group["params"]
            ):
                raise ValueError(
                    "Dopamine: parallel='population' with sharded DTensor parameters is not supported: rank 0 "
                    "evaluates once more than the others, and a closure over shards makes collectives"
                )
            refused = None
        except Exception as error:
            if process_group is None:
                raise
            refused = error
        if process_group is not None:
            # Every rank takes part, even one that refused its arguments, so
            # that no rank waits for the others (docs/DESIGN.md, "Many processes").
            collective = Collective(process_group, parallel, verify_every)
            collective.check_configuration(None if refused else self._configuration(collective), refused)
            self._collective = collective

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group after checking its options and parameters; options it
        does not set are taken from the defaults. Named parameters
        (``(name, tensor)`` pairs) keep their names in ``param_names``."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Dopamine: a parameter group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = dict(param_group)
        if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
            param_group["param_names"] = [name for name, _ in params]
            params = [param for _, param in params]
        unknown = sorted(set(param_group) - set(OPTION_NAMES) - {"params", "initial_lr", "param_names"})
        if unknown:
            raise ValueError(f"Dopamine: unknown option(s) {unknown} in parameter group {len(self.param_groups)}")
        pack({**self.defaults, **param_group})
        _check_params(params, len(self.param_groups))
        if any(is_dtensor(p) for p in params):
            for name, enabled in (("master_weights", self.defaults["master_weights"]),
                                  ("record_trajectory", self.__dict__.get("_recorder") is not None)):
                if enabled:
                    raise ValueError(f"Dopamine: {name} is not supported with DTensor parameters")
        super().add_param_group({**param_group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing: Dopamine never reads or writes gradients."""

    def group_state(self, group_index: int) -> Optional[Dict[str, float]]:
        """The state of group ``group_index`` as Python numbers (a host
        synchronisation when it lives on a GPU), or None before its first
        step."""
        for param in self.param_groups[group_index]["params"]:
            record = self.state.get(param)
            if record and "group_state" in record:
                return dict(zip(STATE_FIELDS, record["group_state"].tolist()))
        return None

    def _snapshot(self) -> _Step:
        """The first phase of a step: the groups' shares of it, checked. A
        closure that changes options or groups affects the step after it
        only."""
        first = self.param_groups[0] if self.param_groups else self.defaults
        step = _Step(first["antithetic"], first["num_perturbations"])
        for g, group in enumerate(self.param_groups):
            # One evaluation serves every group, so all must agree on both
            # options (docs/DESIGN.md, "The algorithm").
            for name in ("antithetic", "num_perturbations"):
                if group[name] != first[name]:
                    raise ValueError(
                        f"Dopamine: invalid {name}: {group[name]!r} in parameter group {g}, "
                        f"{first[name]!r} in group 0; it must be the same in every group"
                    )
        cache = self.__dict__.setdefault("_packed_options", {})
        cache["defaults"] = PackedOptions.of(self.defaults, cache.get("defaults"))
        untrained: List[int] = []
        states: List[torch.Tensor] = []
        packed: List[List[float]] = []
        index = 0
        kept = self.__dict__.setdefault("_shares", {})
        for g, group in enumerate(self.param_groups):
            options = cache[g] = PackedOptions.of(group, cache.get(g))
            share = kept.get(g)
            if share is None or not share.fits(group["params"], index, self.state):
                share = self._share_of(group, g, index)
            index += len(group["params"])
            if share is None:
                if group["params"]:
                    untrained.append(g)
                continue
            device = share.trainable[0].device if self.defaults["capturable"] else torch.device("cpu")
            if self.defaults["capturable"] and any(p.device != device for p in share.trainable):
                raise RuntimeError(
                    f"Dopamine: with capturable=True every parameter of group {g} must be on one "
                    f"device; they are on {sorted({str(p.device) for p in share.trainable})}"
                )
            state = share.state if share.state is not None else torch.zeros(
                len(STATE_FIELDS), dtype=torch.float64, device=device)
            step.groups.append(group)
            step.shares.append(share)
            states.append(state.to(device))
            packed.append(options.packed)
        self._warn_untrained(untrained, not step.groups)
        # The last step's table serves while it holds the same shares and
        # states: its lists, which C++ holds, are then made once.
        kept_table = self.__dict__.get("_kept_table")
        if (kept_table is not None and len(kept_table[0]) == len(step.shares)
                and all(map(operator.is_, kept_table[0], step.shares))
                and all(map(operator.is_, kept_table[1].states, states))):
            step.table = kept_table[1]
            step.table.set_options(packed)
        else:
            for share, state, options_packed in zip(step.shares, states, packed):
                step.table.add_group(share.pieces, share.indices, share.masters, state, options_packed, share.offsets)
        return step

    def _share_of(self, group: Dict[str, Any], g: int, first_index: int) -> Optional["_GroupShare"]:
        """Group ``g``'s share of a step, its parameters checked, or None
        when none of them requires grad."""
        # Parameters that have taken a step were checked then; a group
        # changed since (through param_groups) is checked again.
        if any(param not in self.state for param in group["params"]):
            _check_params(group["params"], g)
        if group["perturbation"] == "lowrank" and any(replicated(p) is None for p in group["params"]):
            # A shard would draw its own rows' factors, not the whole
            # parameter's (docs/DESIGN.md, "The noise").
            raise ValueError(
                f"Dopamine: perturbation='lowrank' over sharded DTensor parameters is not supported "
                f"(group {g}); use perturbation='full'"
            )
        # A group is left out when it has nothing to train, not when this
        # rank's shards of it are empty: every rank takes the same steps
        # (docs/DESIGN.md, "Many processes").
        if not any(p.requires_grad for p in group["params"]):
            return None
        share = _GroupShare(g, group["params"], first_index, self._group_state_of(group, g))
        for i, param in enumerate(group["params"]):
            if not param.requires_grad:
                continue
            share.trainable.append(param)
            share.has_dtensor = share.has_dtensor or is_dtensor(param)
            # A DTensor's shard is updated in pieces that draw the noise of
            # their places in the whole (docs/DESIGN.md, "Many processes").
            for piece, offset in local_pieces(param):
                share.pieces.append(piece)
                share.indices.append(first_index + i)
                share.offsets.append(offset)
            if self.defaults["master_weights"] and _is_half(param):
                master = self.state[param].get("master_weight") if param in self.state else None
                share.masters.append(master if master is not None else param.detach().float().contiguous())
        return share

    def _group_state_of(self, group: Dict[str, Any], g: int) -> Optional[torch.Tensor]:
        """The state tensor the parameters of group ``g`` hold, or None
        before its first step."""
        state = None
        for param in group["params"]:
            record = self.state.get(param)
            if record and "group_state" in record:
                if state is not None and record["group_state"] is not state:
                    raise RuntimeError(
                        f"Dopamine: the parameters of group {g} hold the states of "
                        "different groups (was a parameter moved between groups?)"
                    )
                state = record["group_state"]
        return state

    def _warn_untrained(self, untrained: List[int], step_trains_nothing: bool) -> None:
        """Warns, once per group, that the groups ``untrained`` (which have
        parameters, none requiring grad) are not trained: a plain tensor does
        not require grad, and forward-only users have no reason to set it."""
        warned = self.__dict__.setdefault("_warned_untrained", set())
        for g in untrained:
            if g in warned:
                continue
            warned.add(g)
            warnings.warn(
                f"Dopamine: none of the {len(self.param_groups[g]['params'])} parameter(s) of group {g} "
                f"requires grad, so {'step() trains nothing' if step_trains_nothing else 'that group is not trained'}. "
                "Dopamine needs no gradients, but like torch's optimizers it trains only parameters with "
                "requires_grad: call requires_grad_() on them (a plain tensor, such as torch.zeros(8), does "
                "not require grad).",
                UserWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Loss]] = None) -> Loss:  # type: ignore[override]
        """Evaluates ``closure`` unperturbed, then at ``theta + sigma z_j`` for
        each of the ``num_perturbations`` directions (with ``antithetic`` at
        ``theta + sigma z_j`` and ``theta - sigma z_j`` for each j), updates
        the parameters and returns the unperturbed loss as the closure
        returned it (with ``antithetic`` the mean of the evaluations; with a
        process group the ranks', in the closure's type). If the closure
        raises or returns something other than a scalar, the parameters are
        restored, the state is unchanged and the error propagates (with a
        process group, on every rank, naming the failing ones). A
        ``verify_every`` check that finds ranks apart raises after the step
        was taken."""
        if closure is None:
            raise RuntimeError(
                "Dopamine.step() needs a closure that returns the loss: each step "
                "evaluates the model unperturbed and along each perturbation"
            )
        step = self._snapshot()
        if not step.groups:
            # Nothing to perturb, so no collective either: every rank of a
            # process group has the same trainable parameters.
            loss = closure()
            _loss_tensor(loss, step.evaluations[0][2])
            return loss
        recorder = self.__dict__.get("_recorder")
        if recorder is not None:
            starts = [sum(step.table.group_sizes[:t]) for t in range(len(step.groups))]
            step.record = recorder.begin(
                [(tuple(step.table.indices[start:start + size]), group["seed"], float(group["sigma"]),
                  code("noise", group["noise"]), code("perturbation", group["perturbation"]), group["rank"])
                 for start, size, group in zip(starts, step.table.group_sizes, step.groups)],
                [int(state[0].item()) + 1 for state in step.table.states],
            )
        returned, losses = self._evaluate(step, closure)
        self._finish(step, losses)
        self._commit(step)
        # The loss the step evaluated, as the closure returned it: L0, or with
        # antithetic the mean of every evaluation (from the copies: a closure
        # may return the same buffer twice); with a process group, the ranks'.
        if step.antithetic or self.__dict__.get("_collective") is not None:
            mean = losses.sum() / len(step.evaluations) if step.antithetic else losses[0]
            return mean.to(returned.dtype).to(returned.device) if isinstance(returned, torch.Tensor) else mean.item()
        return returned

    def _evaluate(self, step: _Step, closure: Callable[[], Loss]) -> Tuple[Loss, torch.Tensor]:
        """The second phase: the closure at every perturbation, in
        plan_step's order. Returns the first loss as the closure returned it
        and every loss as float64 (with a process group, shared by the
        ranks). If an evaluation fails, every group is restored and the
        error propagates (on every rank of a process group)."""
        collective = self.__dict__.get("_collective")
        if collective is not None:
            check_parallel(collective.parallel, step.directions, collective.world_size)
        # With parallel="population" a rank evaluates some of the losses, and
        # moves through every perturbation all the same, so that every rank
        # rounds alike (docs/DESIGN.md, "Many processes").
        returned = None
        values: List[Optional[torch.Tensor]] = [None] * len(step.evaluations)
        failure: Optional[Exception] = None
        generators = _Generators(step.table.params) if self.defaults["restore_rng"] else None
        try:
            for i, (offset, direction, which) in enumerate(step.evaluations):
                step.move_to(offset, direction)
                if failure is not None or (collective is not None and not collective.evaluates(offset, direction)):
                    continue
                if generators is not None and returned is not None:
                    generators.restore()
                try:
                    loss = closure()
                    values[i] = _loss_tensor(loss, which)
                except Exception as error:
                    if collective is None:
                        raise
                    # A rank whose closure failed still moves through every
                    # perturbation the others do, so that all ranks round
                    # alike when they restore (docs/DESIGN.md, "Many processes").
                    failure = error
                    continue
                returned = loss if returned is None else returned
        except BaseException as error:
            step.restore()
            if collective is None or not isinstance(error, Exception):
                raise
            failure = error
        if failure is not None:
            step.restore()
            # The other ranks are waiting in the all-reduce: join it, so
            # that every rank raises.
            collective.fail(failure, len(step.evaluations))
        # On the first loss's device; 0 for a loss another rank evaluates.
        device = next(value.device for value in values if value is not None)
        losses = torch.stack([
            torch.zeros((), dtype=torch.float64, device=device) if value is None else value.to(device)
            for value in values
        ])
        if collective is not None:
            try:
                losses = collective.share_losses(losses)
            except BaseException:
                step.restore()
                raise
        return returned, losses

    def _finish(self, step: _Step, losses: torch.Tensor) -> None:
        """The third phase: every group's plan, then one finish_step_ that
        takes or skips the step for all. With non_finite_loss='raise' a
        skipped step restores the states and raises."""
        # Without capturable the states are on the CPU, and moving the losses
        # there is the step's one host synchronisation.
        on_state_device = losses.to(step.table.states[0].device)
        raises = self.defaults["non_finite_loss"] == "raise"
        try:
            plans = [torch.ops.dopamine.plan_step(state, on_state_device, options=packed)
                     for state, packed in zip(step.table.states, step.table.packed)]
            saved = [state.clone() for state in step.table.states] if raises else []
            taken = step.table.finish(plans)
            if step.record is not None:
                step.record["plans"] = torch.stack(plans).tolist()
        except BaseException:
            # finish_step_ checks everything before it writes: the parameters
            # are still perturbed.
            step.restore()
            raise
        if not raises or taken.item():
            return
        for state, before in zip(step.table.states, saved):
            state.copy_(before)
        numbers = losses.tolist()
        bad = next((i for i, value in enumerate(numbers) if not math.isfinite(value)), None)
        cause = (
            f"the {step.evaluations[bad][2]} loss is {numbers[bad]}"
            if bad is not None
            else f"the step size is not finite (losses {', '.join(map(str, numbers[:-1]))} and {numbers[-1]})"
        )
        collective = self.__dict__.get("_collective")
        where = "" if collective is None else (
            " (the mean over the process group's ranks)" if collective.parallel == "data"
            else " (as the rank that evaluated it computed it)"
        )
        raise RuntimeError(
            f"Dopamine: {cause}{where}; parameters restored, step not taken (non_finite_loss='raise')"
        )

    def _commit(self, step: _Step) -> None:
        """The last phase: every parameter of a group holds the group's
        state (and its master weight), and the groups' shares are kept for
        the next steps; a process group's ranks compare their parameters
        every verify_every steps."""
        kept = self.__dict__.setdefault("_shares", {})
        for group, state, share in zip(step.groups, step.table.states, step.shares):
            if kept.get(share.group_index) is share and share.state is state:
                continue  # every record is as the step that kept it left it
            for param in group["params"]:
                self.state[param]["group_state"] = state
            for param, master in zip(filter(_is_half, share.trainable), share.masters):
                self.state[param]["master_weight"] = master
            share.state = state
            kept[share.group_index] = share
        for share in step.shares:
            share.records = (self.state, len(self.state))
        self._kept_table = (tuple(step.shares), step.table)
        collective = self.__dict__.get("_collective")
        if collective is not None and collective.verify_every:
            collective.verify(
                held_alike([p for share in step.shares for p in share.trainable]) + step.table.masters,
                int(step.table.states[0][0].item()),
            )

    def trajectory(self) -> Dict[str, Any]:
        """The steps taken since construction as a few scalars each (see
        :mod:`torch_dopamine.trajectory`), from which
        :func:`torch_dopamine.replay` rebuilds the parameters bit for bit
        from the initial ones. Needs ``record_trajectory=True``. The record
        itself, which later steps extend: ``copy.deepcopy`` keeps a
        snapshot."""
        recorder = self.__dict__.get("_recorder")
        if recorder is None:
            raise RuntimeError("Dopamine.trajectory() needs the optimizer built with record_trajectory=True")
        return recorder.trajectory

    def _configuration(self, collective: Collective) -> Dict[str, Any]:
        """What every rank of a process group must agree on: each group's
        options and its parameters' shapes, dtypes and requires_grad, in
        the words of the error that names a difference."""
        configuration: Dict[str, Any] = {
            "parallel": collective.parallel,
            "verify_every": collective.verify_every,
            "parameter groups": len(self.param_groups),
        }
        for g, group in enumerate(self.param_groups):
            configuration[f"group {g}"] = {
                "options": {name: group[name] for name in OPTION_NAMES},
                "parameters": len(group["params"]),
                **{f"parameter {i}": describe(p) for i, p in enumerate(group["params"])},
            }
        # Last, since a difference in the shapes says more: whether every
        # rank starts from the same parameters (DDP broadcasts rank 0's; we
        # refuse to start apart).
        configuration["the parameters' digest"] = checksum(
            held_alike([p for group in self.param_groups for p in group["params"]])
        )
        return configuration

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict, with copies of the group states (five numbers
        per group, updated in place by every step), so that a dict taken now
        keeps describing now; parameters of one group share one copy."""
        state_dict = super().state_dict()
        copies: Dict[int, torch.Tensor] = {}
        for index, record in state_dict["state"].items():
            record = dict(record)
            group_state = record["group_state"]
            record["group_state"] = copies.setdefault(id(group_state), group_state.clone())
            state_dict["state"][index] = record
        state_dict["dopamine_format"] = STATE_FORMAT
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state saved by :meth:`state_dict`. A state of another
        optimizer, for other parameters, with other parameter names, or with
        values no run can reach (checked by ``dopamine::check_state``) raises
        ValueError and leaves this optimizer as it was."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("Dopamine.load_state_dict: expected a dict with 'state' and 'param_groups'")
        saved_format = state_dict.get("dopamine_format", 1)
        if saved_format not in (1, STATE_FORMAT):
            raise ValueError(
                f"Dopamine.load_state_dict: the state is of format {saved_format!r}; this version of torch_dopamine "
                f"reads formats 1 to {STATE_FORMAT} (and states saved before formats were numbered)"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"Dopamine.load_state_dict: the state has {len(groups)} parameter group(s), "
                f"this optimizer {len(self.param_groups)}"
            )
        params_of_id = {}
        for g, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            missing = [name for name in IN_EVERY_STATE if name not in saved]
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
            if "param_names" in saved and "param_names" in ours and saved["param_names"] != ours["param_names"]:
                raise ValueError(
                    f"Dopamine.load_state_dict: the parameter names of group {g} differ from "
                    "this optimizer's (were the parameters reordered or renamed?)"
                )
            pack({**self.defaults, **OLDER_STATE_VALUES, **saved})
            params_of_id.update(zip(saved["params"], ours["params"]))
        loaded = {}
        for index, entry in state_dict["state"].items():
            if not isinstance(entry, dict) or not {"group_state"} <= set(entry) <= {"group_state", "master_weight"}:
                raise ValueError(
                    f"Dopamine.load_state_dict: the state of parameter {index} has keys "
                    f"{sorted(entry) if isinstance(entry, dict) else entry!r}, expected group_state "
                    "(and master_weight); the state is not a Dopamine optimizer's"
                )
            group_state = entry["group_state"]
            if saved_format == 1 and isinstance(group_state, torch.Tensor) and group_state.shape == (len(STATE_FIELDS) - 1,):
                # Format 1 had no rpe_baseline: b = 0. Any other shape is
                # check_state's to refuse.
                entry = {**entry, "group_state": torch.cat([group_state, group_state.new_zeros(1)])}
            try:
                torch.ops.dopamine.check_state(entry["group_state"])
            except RuntimeError as error:
                raise ValueError(f"Dopamine.load_state_dict: parameter {index}: {str(error).splitlines()[0]}") from None
            param = params_of_id.get(index)
            master = entry.get("master_weight")
            if param is not None and master is not None and (master.dtype != torch.float32 or master.shape != param.shape):
                raise ValueError(
                    f"Dopamine.load_state_dict: the master weight of parameter {index} is not a "
                    "float32 tensor of its parameter's shape"
                )
            loaded[index] = entry
        # One state tensor per group, shared by its parameters.
        shared_states = []
        for g, saved in enumerate(groups):
            shared = None
            for index in saved["params"]:
                if index not in loaded:
                    continue
                group_state = loaded[index]["group_state"]
                # On the CPU; a capturable step moves it to its device.
                group_state = group_state.to(device="cpu", dtype=torch.float64)
                if shared is None:
                    shared = group_state.clone()
                elif not torch.equal(shared, group_state):
                    raise ValueError(
                        f"Dopamine.load_state_dict: the parameters of group {g} hold different group states"
                    )
            shared_states.append(shared)
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "dopamine_format"})
        # torch casts floating-point state to the parameter's dtype: the
        # group states (float64) and master weights (float32) are set anew.
        for saved, ours, shared in zip(groups, self.param_groups, shared_states):
            for index, param in zip(saved["params"], ours["params"]):
                self.state.pop(param, None)
                if index not in loaded:
                    continue
                self.state[param]["group_state"] = shared
                master = loaded[index].get("master_weight")
                if master is not None:
                    self.state[param]["master_weight"] = master.to(param.device).clone()
        for group in self.param_groups:
            for name in OPTION_NAMES:
                group.setdefault(name, OLDER_STATE_VALUES.get(name, self.defaults[name]))
