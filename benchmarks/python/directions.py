"""The directions study: every forward-only method at its best number of
directions, at an equal budget of forward passes (docs/BENCHMARKS.md,
"Every forward-only method at its best number of directions").

Each method of harness.DIRECTION_METHODS with k directions is tuned as any
contender is (protocol.tune: the same schedules and tuning seeds, the grid
about the same centre), but its horizon is the budget of forward passes
(BUDGET_FORWARDS_PER_STEP x the task's horizon) over its forwards per step:
k = 8 takes fewer steps than k = 1, and a cosine schedule spans the steps
it has. The grid is wider (GRID_FACTORS): horizons shorter than the task's
move the best learning rate, which the main grid put at its ends on digits
and spirals. Every k gets the same trials, so every method gets the same
tuning budget per k. On the tuning seeds the task's rule then picks each
method's k, XOR counting forward passes to target rather than steps.
Scoring runs each method at the k its tuning picked and, for the ablation
that isolates the RPE rule, Dopamine and WP (the same Rademacher noise, no
adaptation) at every k.
"""

from typing import Dict, List, Optional, Sequence

import protocol
import tasks
from harness import CONTENDERS, DIRECTION_METHODS, with_directions

TASKS = ("xor", "lorenz", "rossler", "digits", "spirals")
# The ablation's pair at every k: the RPE rule, and no adaptation.
RULE = "dopamine"
WITHOUT_RULE = "wp"
GRID_FACTORS = (1 / 27, 1 / 9, 1 / 3, 1.0, 3.0, 9.0, 27.0)


def contenders(method: str) -> List[str]:
    return [with_directions(method, k) for k in DIRECTION_METHODS[method].counts]


def selection_key(task: tasks.Task, contender_name: str, trial: dict) -> tuple:
    """A trial's score (protocol.trial_score) comparable across k: XOR's
    median steps to target counted in forward passes."""
    score = tuple(trial["score"])
    if task.name == "xor":
        return (score[0], score[1] * CONTENDERS[contender_name].forward_equivalents_per_step)
    return score


def choose_directions(task: tasks.Task, tuned: Dict[str, dict]) -> Dict[str, int]:
    """Each method's k: the k whose selected trial scores best, the fewer
    directions on a tie."""
    chosen = {}
    for method, spec in DIRECTION_METHODS.items():
        keys = {}
        for k in spec.counts:
            name = with_directions(method, k)
            keys[k] = max(selection_key(task, name, trial) for trial in tuned[name]["trials"])
        chosen[method] = max(spec.counts, key=lambda k: (keys[k], -k))
    return chosen


def tune(task: tasks.Task, full: bool, workers: int, progress, methods: Sequence[str] = tuple(DIRECTION_METHODS), earlier: Optional[dict] = None) -> dict:
    """The study's entry of benchmarks/tuned.json for the task: every
    method's trials at each k, and the k chosen. Tunes `methods`, and any
    method that `earlier` (the task's entry before) lacks; the others keep
    their trials from it."""
    before = (earlier or {}).get("contenders", {})
    retuned = [m for m in DIRECTION_METHODS if m in methods or any(name not in before for name in contenders(m))]
    names = [name for method in retuned for name in contenders(method)]
    kept = {name: before[name] for method in DIRECTION_METHODS if method not in retuned for name in contenders(method)}
    tuned = dict(kept, **protocol.tune(task, names, full, workers, progress, protocol.equal_forwards_steps, GRID_FACTORS))
    chosen = choose_directions(task, tuned)
    progress(f"directions on {task.name}: " + ", ".join(f"{method} k={k}" for method, k in chosen.items()))
    return dict(contenders=tuned, chosen=chosen)


def scored(study: dict) -> List[str]:
    """What scoring runs: every method at its chosen k, and the ablation's
    pair at every k."""
    names = [with_directions(method, k) for method, k in study["chosen"].items()]
    names += [name for method in (RULE, WITHOUT_RULE) for name in contenders(method)]
    return list(dict.fromkeys(names))


def score(task: tasks.Task, study: dict, full: bool, workers: int, progress) -> List[dict]:
    """The scored rows of the study, marked with the study, the method, its
    k, and whether its tuning chose that k."""
    names = scored(study)
    rows = protocol.score(task, {name: study["contenders"][name] for name in names}, full, workers, progress, protocol.equal_forwards_steps)
    method_of = {with_directions(method, k): (method, k) for method, spec in DIRECTION_METHODS.items() for k in spec.counts}
    for row in rows:
        method, k = method_of[row["optimizer"]]
        row.update(study="directions", method=method, directions=k, chosen=study["chosen"][method] == k)
    return rows
