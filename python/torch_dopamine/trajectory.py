"""A run as a few scalars per step, and its replay (docs/DESIGN.md,
"Trajectory and replay").

The noise is a pure function of (seed, step, parameter index, element index),
so what a step did to the parameters is fixed by the groups' layouts and
noise options, the perturbations the step moved through, and each group's
plan (step size, decay, whether the step was taken: ``plan_step``'s output).
:func:`replay` calls the same ops in the same order, so it rounds every
perturbation round trip as the run did and rebuilds the parameters bit for
bit, without a forward pass.
"""

import inspect
from typing import Any, Dict, Sequence, Tuple

import torch

from ._engine import STATE_FIELDS, StepTable
from ._options import ENUM_NAMES, OPTION_NAMES, pack

__all__ = ["Recorder", "load_trajectory", "replay"]

# 4: plans carry the next state's rpe_baseline (3: layouts give each
# group's perturbation and rank, and plans their rank; 2: moves name their
# direction, and plans end with one step size per direction).
FORMAT = 4


class Recorder:
    """Records the steps of one optimizer into a trajectory: a dict of
    ``format``, ``master_weights``, ``layouts`` (per group: the parameters'
    global indices, seed, sigma, noise code, perturbation code and rank; stored once per change) and
    ``steps`` (per step: its layout, each group's step number, the
    perturbations moved through as ``(offset, direction, groups moved)``, and each
    group's plan as a list of floats, or None for a step abandoned when the
    closure failed). Plain Python values: it pickles, and goes to JSON as
    Python's json module writes it (a skipped step's plan may hold NaN)."""

    def __init__(self, master_weights: bool):
        self.trajectory: Dict[str, Any] = dict(format=FORMAT, master_weights=master_weights, layouts=[], steps=[])
        self._layout_of: Dict[Tuple, int] = {}

    def begin(self, groups: Sequence[Tuple[Tuple[int, ...], int, float, int, int, int]], steps: Sequence[int]) -> Dict[str, Any]:
        """A new step over groups given as (indices, seed, sigma, noise code, perturbation code, rank),
        numbered `steps`; returns its record, which the step fills in."""
        key = tuple(groups)
        if key not in self._layout_of:
            self._layout_of[key] = len(self.trajectory["layouts"])
            self.trajectory["layouts"].append([list(group) for group in groups])
        record = dict(layout=self._layout_of[key], steps=list(steps), moves=[], plans=None)
        self.trajectory["steps"].append(record)
        return record


def load_trajectory(path: Any) -> Dict[str, Any]:
    """A trajectory from a file that either front end wrote: Python's
    ``torch.save(optimizer.trajectory(), path)``, or C++'s
    ``torch::jit::pickle_save(optimizer.trajectory())``, whose typed lists
    and dicts name the functions that rebuild them. Loads with
    ``weights_only=True``, those functions allowed."""
    import torch.jit._pickle as rebuild

    allowed = [rebuild.restore_type_tag, rebuild.build_intlist, rebuild.build_doublelist, rebuild.build_boollist]
    if not hasattr(torch.serialization, "safe_globals"):  # torch 2.4 has only the global list
        torch.serialization.add_safe_globals(allowed)
        return torch.load(path, weights_only=True)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


@torch.no_grad()
def replay(params: Sequence[torch.Tensor], trajectory: Dict[str, Any]) -> None:
    """Applies a recorded trajectory to ``params``, in place: every parameter
    the optimizer was given, in its order (frozen ones included, since the
    order keys the noise), as they were before the first recorded step. The
    result is the recorded run's parameters, bit for bit. Bfloat16/float16
    parameters of a ``master_weights`` run start from their float32 copies,
    as the optimizer's master weights do; an optimizer that loaded master
    weights from a checkpoint before recording started from those instead,
    which replay does not know."""
    if not isinstance(trajectory, dict) or trajectory.get("format") != FORMAT:
        found = trajectory.get("format") if isinstance(trajectory, dict) else None
        got = f"format {found!r} (an earlier version's: replay it with that version)" if found is not None else type(trajectory).__name__
        raise ValueError(f"replay: not a trajectory of format {FORMAT} (from Dopamine.trajectory()); got {got}")
    params = list(params)
    # Checked before anything is written.
    needed = 1 + max((i for layout in trajectory["layouts"] for group in layout for i in group[0]), default=-1)
    if needed > len(params):
        raise ValueError(f"replay: the trajectory moves parameter {needed - 1}, but {len(params)} parameters were given")
    for number, record in enumerate(trajectory["steps"]):
        groups = len(trajectory["layouts"][record["layout"]])
        moved = next((moved for _, _, moved in record["moves"] if moved != groups), groups)
        if moved != groups:
            raise ValueError(
                f"replay: step {number} of the trajectory moved {moved} of its {groups} groups (a move that "
                "failed part-way); it cannot be replayed"
            )
    # move_ reads sigma, the seed, the noise and the perturbation of the options; the others
    # are the optimizer's defaults.
    from .optimizer import Dopamine

    defaults = {
        name: parameter.default for name, parameter in inspect.signature(Dopamine.__init__).parameters.items()
        if name in OPTION_NAMES
    }
    masters: Dict[int, torch.Tensor] = {}
    for record in trajectory["steps"]:
        layout = trajectory["layouts"][record["layout"]]
        table = StepTable()
        for (indices, seed, sigma, noise, perturbation, rank), step in zip(layout, record["steps"]):
            halves = [i for i in indices if trajectory["master_weights"] and params[i].dtype in (torch.bfloat16, torch.float16)]
            for i in halves:
                masters.setdefault(i, params[i].detach().float().contiguous())
            # move_ keys the noise by the state's step + 1.
            state = torch.zeros(len(STATE_FIELDS), dtype=torch.float64)
            state[0] = step - 1
            packed = pack({**defaults, "seed": seed, "sigma": sigma, "noise": ENUM_NAMES["noise"][noise],
                           "perturbation": ENUM_NAMES["perturbation"][perturbation], "rank": rank})
            table.add_group([params[i] for i in indices], list(indices), [masters[i] for i in halves], state, packed,
                            [0] * len(indices))
        for offset, direction, _ in record["moves"]:
            table.move_to(offset, direction)
        if record["plans"] is not None:
            table.finish(list(torch.tensor(record["plans"], dtype=torch.float64).unbind(0)))
