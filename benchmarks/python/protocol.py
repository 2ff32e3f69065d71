"""The benchmark protocol, modelled on MLCommons AlgoPerf's external tuning:
tuning is separate from scoring.

- Tuning (`make bench-tune`): every contender gets the same budget on every
  task: the learning rates centre x {1/9, 1/3, 1, 3, 9} (log-spaced, the
  centre per task and optimizer family) crossed with the schedules
  {constant, cosine}, each trained on the three TUNING_SEEDS and judged on
  the task's validation split. The task's rule picks one configuration per
  contender, fewest divergences first; benchmarks/tuned.json keeps every
  trial.
- Scoring (`make bench`): the selected configuration on the task's scoring
  seeds, which tuning never saw, judged on the test split, which tuning
  never saw either. A diverged run (a non-finite loss, or a last
  loss above the first) counts as a failure and as the worst value in every
  median; it is reported, never dropped.
- Figures: medians over the scoring seeds with a 95% bootstrap interval,
  success rates, divergences, and steps, forward passes and seconds to
  target; every contender has the same horizon, and the metric at an equal
  budget of forward passes is read off each run's curve. On tasks that run
  their whole horizon, so is the metric at an equal time: the median
  training time of the contender that finishes first. Fine-tuning also
  measures each contender's peak memory against inference.

Runs go to a pool of worker processes with one intra-op thread each (the
models are small), so a run's seconds are measured beside the other
workers' runs.
"""

import dataclasses
import math
import multiprocessing
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import tasks
from harness import CONTENDERS, EVIDENCE_CONTENDERS, SCHEDULES, TASK_CONTENDERS, median, peak_step_bytes, record, train

TUNING_SEEDS = (1000, 1001, 1002)
GRID_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
BOOTSTRAP_RESAMPLES = 2000
# A step of standard WP and of MeZO's central difference evaluates twice: the
# budget of "equal forward passes" is this many forward equivalents per step
# of the horizon.
BUDGET_FORWARDS_PER_STEP = 2


# The options that make a contender what it is, as its optimizer reports them.
_IDENTITY_OPTIONS = ("lr_adaptation", "noise", "antithetic", "num_perturbations", "perturbation", "rank", "beta_baseline", "foreach", "fused")


def identity(contender_name: str) -> dict:
    """What tuned.json records of the contender a tuning ran: its optimizer's
    class and identifying options, so that a tuning made for other options
    (another default, say) is refused rather than scored."""
    optimizer = CONTENDERS[contender_name].make([torch.nn.Parameter(torch.zeros(1))], 1.0, 0.01, 0)
    return dict(optimizer=type(optimizer).__name__, **{k: optimizer.defaults[k] for k in _IDENTITY_OPTIONS if k in optimizer.defaults})


def grid(task: tasks.Task, contender_name: str, factors: Sequence[float] = GRID_FACTORS) -> List[float]:
    centre = task.centres[CONTENDERS[contender_name].family]
    return [float(f"{centre * factor:.3g}") for factor in factors]


def description(task_list: Sequence[tasks.Task]) -> dict:
    """What results/bench.json and tuned.json record as "protocol"."""
    return dict(
        tuning_seeds=list(TUNING_SEEDS),
        scoring_seeds={task.name: task.seeds for task in task_list},
        grid=f"lr = centre x {{{', '.join(f'{f:.3g}' for f in GRID_FACTORS)}}} per task and optimizer family",
        schedules=list(SCHEDULES),
        divergence="a non-finite loss, or a last training loss above the first (fine-tuning: a last held-out loss "
        "above the pretrained model's)",
        bootstrap_resamples=BOOTSTRAP_RESAMPLES,
    )


@dataclasses.dataclass(frozen=True)
class Job:
    task: str
    full: bool
    contender: str
    lr: float
    schedule: str
    seed: int
    split: str  # the held-out set that judges the run: "validation" or "test"
    steps: Optional[int] = None  # the horizon, when not the task's


# What --contenders may name on the paper's tasks: make bench's contenders
# and the evidence contenders it leaves out.
NAMED_CONTENDERS = TASK_CONTENDERS + EVIDENCE_CONTENDERS


def contenders_of(task: tasks.Task, chosen: Optional[Sequence[str]] = None) -> List[str]:
    """The task's contenders, or those of `chosen` that it may be scored on:
    its contenders, and on the paper's tasks the evidence contenders too
    (harness.EVIDENCE_CONTENDERS)."""
    if not chosen:
        return list(task.contenders or TASK_CONTENDERS)
    known = task.contenders or NAMED_CONTENDERS
    return [name for name in chosen if name in known]


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(job: Job) -> dict:
    """One training run, in a worker process."""
    task = tasks.task_named(job.task, job.full)
    contender = CONTENDERS[job.contender]
    setup = task.setup(job.seed, job.split)
    run = train(
        contender,
        setup["params"],
        setup["loss_fn"],
        job.lr,
        task.sigma,
        job.seed,
        job.steps or task.steps,
        setup["reached"],
        setup.get("evaluate"),
        task.eval_every,
        task.stop_at_target,
        setup.get("before_step"),
        setup.get("after_step"),
        schedule=job.schedule,
        metric_limit=setup.get("metric_limit"),
    )
    return dict(
        steps_to_target=run.steps_to_target,
        seconds_to_target=run.seconds_to_target,
        final_metric=run.final_metric if run.final_metric is not None else run.final_loss,
        final_loss=run.final_loss,
        diverged=run.diverged,
        seconds=run.seconds,
        steps=run.steps,
        curve=run.curve,
        metric_limit=run.metric_limit,
    )


def _memory(job: Job) -> Dict[str, int]:
    """The peak memory of the job's contender against inference, in a worker
    process (harness.peak_step_bytes), with the bytes of the model's
    weights, which both hold."""
    task = tasks.task_named(job.task, job.full)
    setup = task.setup(job.seed, job.split)
    peaks = peak_step_bytes(CONTENDERS[job.contender], setup["params"], setup["loss_fn"], job.lr, task.sigma, setup.get("before_step"))
    weights = sum(t.numel() * t.element_size() for t in setup["model"].state_dict().values())
    return dict(peaks, weights=weights)


def run_jobs(jobs: Sequence[Job], workers: int, progress, label: str, work=_run) -> List[dict]:
    """Every job's `work` (a training run by default), in order, from
    `workers` processes; a progress line about every tenth of the way."""
    results = []
    started = time.perf_counter()
    every = max(1, len(jobs) // 10)
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        for done, result in enumerate(pool.imap(work, jobs), start=1):
            results.append(result)
            if done % every == 0 or done == len(jobs):
                elapsed = time.perf_counter() - started
                progress(f"{label}: {done}/{len(jobs)} runs, {elapsed:.0f} s, about {elapsed / done * (len(jobs) - done):.0f} s left")
    return results


# --- Judging runs --------------------------------------------------------------


def worst(task: tasks.Task) -> float:
    return -math.inf if task.higher_is_better else math.inf


def final_value(task: tasks.Task, run: dict) -> float:
    """A run's final metric; a diverged run's is the worst."""
    value = run["final_metric"]
    return worst(task) if run["diverged"] or value is None or not math.isfinite(value) else value


def equal_forwards_steps(task: tasks.Task, contender_name: str) -> int:
    """The steps in which the contender spends the budget of forward passes
    (BUDGET_FORWARDS_PER_STEP x the task's horizon, a backward counting as
    two)."""
    return BUDGET_FORWARDS_PER_STEP * task.steps // CONTENDERS[contender_name].forward_equivalents_per_step


def value_at_forwards(task: tasks.Task, run: dict, contender_name: str) -> float:
    """The metric when the run had spent the budget of forward passes: the
    last evaluation at or before that step; the worst if it diverged
    before, or had no evaluation by then."""
    return _value_by(task, run, "steps", equal_forwards_steps(task, contender_name))


def value_at_seconds(task: tasks.Task, run: dict, seconds: float) -> float:
    """The metric when the run had trained for `seconds` (optimizer steps
    only): the last evaluation by then; the worst if it diverged before, or
    had no evaluation by then."""
    return _value_by(task, run, "seconds", seconds)


# Where a run's curve points (step, seconds, loss, metric) hold what it spent.
_CURVE_AXIS = {"steps": 0, "seconds": 1}


def _value_by(task: tasks.Task, run: dict, spent: str, budget: float) -> float:
    """The run's last metric (or loss) by the time it had spent `budget`
    (`spent`: "steps" or "seconds"); the worst if it diverged by then, or
    had no evaluation by then."""
    if run["diverged"] and run[spent] <= budget:
        return worst(task)
    axis = _CURVE_AXIS[spent]
    points = [point[3] if point[3] is not None else point[2] for point in run["curve"] if point[axis] <= budget]
    return points[-1] if points and math.isfinite(points[-1]) else worst(task)


def steps_or_inf(run: dict) -> float:
    return math.inf if run["steps_to_target"] is None else float(run["steps_to_target"])


def bootstrap_ci(values: Sequence[float], seed: int = 0) -> Optional[List[float]]:
    """The 95% percentile interval of the median over BOOTSTRAP_RESAMPLES
    resamples of `values` (with replacement); None for no values. Infinite
    values (failures) stay in, so an interval may reach infinity."""
    if not values:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.sort(np.median(data[rng.integers(0, len(data), size=(BOOTSTRAP_RESAMPLES, len(data)))], axis=1))
    low = medians[int(0.025 * (BOOTSTRAP_RESAMPLES - 1))]
    high = medians[int(math.ceil(0.975 * (BOOTSTRAP_RESAMPLES - 1)))]
    return [float(low), float(high)]


def trial_score(task: tasks.Task, runs: List[dict]) -> tuple:
    """The task's rule as a key that is larger for the better trial: XOR by
    success rate (a diverged run fails), then fewer median steps; the others
    by fewer divergences, then the median final metric, diverged runs
    counting as the worst. Fewest divergences first because a configuration
    that diverged on a tuning seed will on some scoring seeds too, and the
    target counts divergences."""
    if task.name == "xor":
        solved = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        return (len(solved) / len(runs), -(statistics.median(solved) if solved else math.inf))
    middle = statistics.median(final_value(task, r) for r in runs)
    return (-sum(r["diverged"] for r in runs), middle if task.higher_is_better else -middle)


# --- Tuning ----------------------------------------------------------------------


# A contender's horizon in steps, where it is not the task's (the
# directions study's equal budget of forward passes).
Horizon = Optional[Callable[[tasks.Task, str], int]]


def tune(
    task: tasks.Task,
    contender_names: Sequence[str],
    full: bool,
    workers: int,
    progress,
    horizon: Horizon = None,
    factors: Sequence[float] = GRID_FACTORS,
) -> Dict[str, dict]:
    """Every contender's trials on the tuning seeds and the configuration
    the task's rule selects, for benchmarks/tuned.json: `factors` times the
    centre of the contender's family are its learning rates."""
    if task.prepare:
        task.prepare(progress)
    grids = {name: grid(task, name, factors) for name in contender_names}
    trials = [(name, lr, schedule) for name in contender_names for lr in grids[name] for schedule in SCHEDULES]
    jobs = [
        Job(task.name, full, name, lr, schedule, seed, "validation", horizon(task, name) if horizon else None)
        for name, lr, schedule in trials
        for seed in TUNING_SEEDS
    ]
    results = run_jobs(jobs, workers, progress, f"tuning {task.name}")
    tuned: Dict[str, dict] = {}
    for i, (name, lr, schedule) in enumerate(trials):
        runs = results[i * len(TUNING_SEEDS) : (i + 1) * len(TUNING_SEEDS)]
        entry = tuned.setdefault(
            name, dict(identity=identity(name), split="validation", grid=grids[name], schedules=list(SCHEDULES), trials=[])
        )
        entry["trials"].append(
            dict(
                lr=lr,
                schedule=schedule,
                score=list(trial_score(task, runs)),
                successes=sum(r["steps_to_target"] is not None for r in runs),
                divergences=sum(r["diverged"] for r in runs),
                finals=[final_value(task, r) for r in runs],
            )
        )
    for name, entry in tuned.items():
        best = max(entry["trials"], key=lambda trial: tuple(trial["score"]))
        entry.update(lr=best["lr"], schedule=best["schedule"], at_grid_edge=best["lr"] in (entry["grid"][0], entry["grid"][-1]))
        progress(f"tuning {task.name}: {name} selects lr {best['lr']:g} {best['schedule']}{' (grid edge)' if entry['at_grid_edge'] else ''}")
    return tuned


# --- Scoring ---------------------------------------------------------------------


def runs_by_contender(names: Sequence[str], seeds: int, results: List[dict]) -> Dict[str, List[dict]]:
    """The results of jobs made contender by contender, `seeds` runs each,
    split by contender."""
    return {name: results[i * seeds : (i + 1) * seeds] for i, name in enumerate(names)}


def score(task: tasks.Task, tuned: Dict[str, dict], full: bool, workers: int, progress, horizon: Horizon = None) -> List[dict]:
    """One record per contender: its tuned configuration on the scoring
    seeds, for the task's horizon or `horizon`'s."""
    if task.prepare:
        task.prepare(progress)
    names = list(tuned)
    jobs = [
        Job(task.name, full, name, tuned[name]["lr"], tuned[name]["schedule"], seed, "test", horizon(task, name) if horizon else None)
        for name in names
        for seed in task.seeds
    ]
    results = run_jobs(jobs, workers, progress, f"scoring {task.name}")
    runs_of = runs_by_contender(names, len(task.seeds), results)
    # Equal time: the median time the fastest contender takes for the
    # horizon (a run stopped early counted at its pace); every contender is
    # read at that time. Not where the horizons differ.
    equal_seconds = (
        None
        if task.stop_at_target or horizon
        else min(statistics.median(r["seconds"] / r["steps"] * task.steps for r in runs) for runs in runs_of.values())
    )
    memory = {}
    if task.measure_memory:
        memory_jobs = [Job(task.name, full, name, tuned[name]["lr"], tuned[name]["schedule"], task.seeds[0], "test") for name in names]
        memory = dict(zip(names, run_jobs(memory_jobs, workers, progress, f"peak memory on {task.name}", _memory)))
    records = []
    for name in names:
        runs = runs_of[name]
        contender = CONTENDERS[name]
        entry = tuned[name]
        solved = [r for r in runs if r["steps_to_target"] is not None]
        finals = [final_value(task, r) for r in runs]
        at_budget = [value_at_forwards(task, r, name) for r in runs]
        budget_steps = equal_forwards_steps(task, name)
        steps = [steps_or_inf(r) for r in runs]
        records.append(
            record(
                "python",
                task.name,
                contender,
                dict(task.config, lr=entry["lr"], sigma=None if contender.gradient else task.sigma, seeds=len(runs), selected=True),
                schedule=entry["schedule"],
                success_rate=len(solved) / len(runs),
                median_steps_to_target=median([r["steps_to_target"] for r in solved]),
                median_seconds_to_target=median([r["seconds_to_target"] for r in solved]),
                median_forwards_to_target=median([r["steps_to_target"] * contender.forward_equivalents_per_step for r in solved]),
                final_metric=statistics.median(finals),
                ci95=bootstrap_ci(finals),
                median_steps_all_runs=statistics.median(steps),
                ci95_steps=bootstrap_ci(steps) if task.name == "xor" else None,
                divergences=sum(r["diverged"] for r in runs),
                metric_at_equal_forwards=statistics.median(at_budget),
                ci95_at_equal_forwards=bootstrap_ci(at_budget),
                solved_within_equal_forwards=sum(r["steps_to_target"] is not None and r["steps_to_target"] <= budget_steps for r in runs) / len(runs),
                equal_forwards_budget=BUDGET_FORWARDS_PER_STEP * task.steps,
                forward_equivalents_per_step=contender.forward_equivalents_per_step,
                ms_per_step=1e3 * sum(r["seconds"] for r in runs) / max(1, sum(r["steps"] for r in runs)),
                metric=task.metric,
                higher_is_better=task.higher_is_better,
                grid=entry["grid"],
                at_grid_edge=entry["at_grid_edge"],
                chosen_by=task.chosen_by,
                scoring_seeds=list(task.seeds),
                # Each seed's figure of the task's rule, for the comparisons
                # seed by seed (paired): XOR its steps to target (inf:
                # unsolved), the others its final metric (diverged: the worst).
                per_seed=steps if task.name == "xor" else finals,
                horizon_steps=horizon(task, name) if horizon else task.steps,
                curve=runs[0]["curve"],
            )
        )
        if runs[0]["metric_limit"] is not None:
            records[-1]["metric_limit"] = runs[0]["metric_limit"]
        if equal_seconds is not None:
            at_seconds = [value_at_seconds(task, r, equal_seconds) for r in runs]
            records[-1].update(
                equal_seconds_budget=equal_seconds, metric_at_equal_seconds=statistics.median(at_seconds), ci95_at_equal_seconds=bootstrap_ci(at_seconds)
            )
        if name in memory:
            peaks = memory[name]
            records[-1].update(
                peak_memory_bytes=peaks["weights"] + peaks["step"],
                inference_memory_bytes=peaks["weights"] + peaks["inference"],
                memory_vs_inference=(peaks["weights"] + peaks["step"]) / (peaks["weights"] + peaks["inference"]),
            )
        row = records[-1]
        progress(
            f"scoring {task.name}: {name} (lr {entry['lr']:g} {entry['schedule']}): solved {len(solved)}/{len(runs)}, "
            f"{row['divergences']} diverged, median {task.metric} {row['final_metric']:.4g}"
        )
    return records


# --- Comparing -------------------------------------------------------------------


def _as_cost(row: dict, figure: float, per_forward: bool) -> float:
    """A figure of the row's task as a cost, lower is better: XOR's steps to
    target (in forward passes, `per_forward`), the error for accuracy, else
    the metric."""
    if row["task"] == "xor":
        return figure * row["forward_equivalents_per_step"] if per_forward else figure
    return 1.0 - figure if row["higher_is_better"] else figure


def cost(row: dict, at_equal_forwards: bool = False) -> float:
    """A scored row as one number, lower is better, for the performance
    profile: XOR the median steps (or forward passes) to target over every
    scoring seed, a failure counting as infinite; the others the median
    final metric (test error for accuracy)."""
    if row["task"] == "xor":
        return _as_cost(row, row["median_steps_all_runs"], at_equal_forwards)
    return _as_cost(row, row["metric_at_equal_forwards"] if at_equal_forwards else row["final_metric"], at_equal_forwards)


def _ratio(difference: float) -> float:
    """The ratio a / b of two costs from (a - b) / (a + b), in [-1, 1]."""
    return math.inf if difference == 1 else (1 + difference) / (1 - difference)


def sign_test(won: int, lost: int) -> float:
    """The two-sided exact sign test of `won` against `lost` seeds (ties
    left out): the chance of a split at least this uneven if each seed were
    a coin toss; 1 for no seeds. With five seeds it is 0.0625 at best."""
    seeds = won + lost
    tail = sum(math.comb(seeds, i) for i in range(min(won, lost) + 1)) / 2**seeds
    return min(1.0, 2 * tail)


def paired(row: dict, other: dict, per_forward: bool = False) -> dict:
    """Row against other seed by seed. A scoring seed starts both from the
    same initialisation and data, so the ratio of their costs on each seed
    (< 1: row better; 1 where they are equal, two failures included) leaves
    out what the seeds share, which two medians and their intervals keep.
    The seeds row won and lost with their sign test (`p`), the median ratio
    and its 95% interval. The median and the interval are taken of
    (a - b) / (a + b), finite where a failure makes the ratio 0 or infinite,
    and turned back into ratios, so that swapping the pair inverts them (two
    middle ratios of 0.5 and 2 are a median of 1 either way). Each seed's
    figure is the row's at its own horizon (the directions study's: the
    budget of forward passes); `per_forward` counts XOR's steps to target in
    forward passes."""
    if row["scoring_seeds"] != other["scoring_seeds"]:
        raise ValueError(f"{row['optimizer']} and {other['optimizer']} were scored on different seeds: no pairs")
    differences = []
    for a, b in zip(row["per_seed"], other["per_seed"]):
        a, b = _as_cost(row, a, per_forward), _as_cost(other, b, per_forward)
        differences.append(0.0 if a == b else 1.0 if math.isinf(a) else -1.0 if math.isinf(b) else (a - b) / (a + b))
    won, lost = sum(d < 0 for d in differences), sum(d > 0 for d in differences)
    return dict(
        won=won,
        lost=lost,
        p=sign_test(won, lost),
        ratio=_ratio(statistics.median(differences)),
        ci95=[_ratio(bound) for bound in bootstrap_ci(differences)],
    )


def performance_profile(rows_by_task: Dict[str, Dict[str, dict]], taus: Sequence[float], at_equal_forwards: bool = False) -> Dict[str, List[float]]:
    """Dolan-More: for each optimizer, the fraction of tasks on which its cost
    is within a factor tau of the best optimizer's on that task."""
    names = sorted({name for rows in rows_by_task.values() for name in rows})
    ratios: Dict[str, List[float]] = {name: [] for name in names}
    for rows in rows_by_task.values():
        costs = {name: cost(row, at_equal_forwards) for name, row in rows.items()}
        best = min(costs.values())
        for name in names:
            c = costs.get(name, math.inf)
            if not math.isfinite(c):  # failed, also where every optimizer failed
                ratios[name].append(math.inf)
            elif best > 0:
                ratios[name].append(c / best)
            else:  # a zero cost: only the optimizers that reach it are best
                ratios[name].append(1.0 if c == 0 else math.inf)
    tasks_count = len(rows_by_task)
    return {name: [sum(r <= tau for r in ratios[name]) / tasks_count for tau in taus] for name in names}


def beats(row: dict, other: dict, per_forward: bool = False) -> bool:
    """The issue's rule: XOR by success rate, then median steps (forward
    passes, `per_forward`); the others by the median final metric; and no
    more divergences."""
    if row["divergences"] > other["divergences"]:
        return False
    if row["task"] == "xor":
        if row["success_rate"] != other["success_rate"]:
            return row["success_rate"] > other["success_rate"]
        key = "median_forwards_to_target" if per_forward else "median_steps_to_target"
        return (row[key] or math.inf) < (other[key] or math.inf)
    if row["higher_is_better"]:
        return row["final_metric"] > other["final_metric"]
    return row["final_metric"] < other["final_metric"]
