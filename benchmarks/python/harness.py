"""What every benchmark shares: the contenders (Dopamine in each mode, the
forward-only methods a user would pick instead, torch's SGD and Adam), the
training loop that times them, and the record format of results/bench.json."""

import dataclasses
import inspect
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import torch_dopamine


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer as the report names it."""

    name: str  # "dopamine", "wp", "zo-sgd[central]", "sgd", "adam[foreach]", ...
    family: str  # key of the task's learning-rate grid centre
    gradient: bool  # needs backward()
    make: Callable[[List[torch.Tensor], float, float, int], torch.optim.Optimizer]
    # Forward evaluations a step makes (a forward-only step: k + 1, or 2k
    # with antithetic).
    forwards_per_step: int = 1
    # A forward-only contender's options, every one resolved (the defaults
    # where it sets none), as sorted (name, value) pairs.
    options: tuple = ()

    @property
    def backwards_per_step(self) -> int:
        return 1 if self.gradient else 0

    @property
    def forward_equivalents_per_step(self) -> int:
        """A step's cost in forward passes: a backward costs about two."""
        return self.forwards_per_step + 2 * self.backwards_per_step


def _dopamine(**options):
    return lambda params, lr, sigma, seed: torch_dopamine.Dopamine(params, lr=lr, sigma=sigma, seed=seed, **options)


# The optimizer's own defaults, which a contender's options override.
DOPAMINE_DEFAULTS = {name: p.default for name, p in inspect.signature(torch_dopamine.Dopamine).parameters.items()}


def _forward_only(name, family, **options):
    directions = options.get("num_perturbations", DOPAMINE_DEFAULTS["num_perturbations"])
    forwards = 2 * directions if options.get("antithetic", DOPAMINE_DEFAULTS["antithetic"]) else directions + 1
    resolved = tuple(sorted({**DOPAMINE_DEFAULTS, **options}.items()))
    return Contender(name, family, False, _dopamine(**options), forwards, resolved)


# Options that keep the paper's RPE: no running baseline (the update's
# RPEs against L0 alone).
PAPER_RPE = dict(beta_baseline=None)
# The defaults before docs/DESIGN.md "Defaults" chose two directions and the
# baseline: four directions, the paper's RPE.
EARLIER_DEFAULTS = dict(num_perturbations=4, **PAPER_RPE)

CONTENDERS = {
    c.name: c
    for c in [
        # The defaults (two Rademacher directions, the RPEs against a running
        # baseline; docs/DESIGN.md "Defaults"), the defaults without the
        # baseline (the paper's RPE), and with rank-1 perturbations
        # (perturbation="lowrank": r (rows + cols) draws per weight instead of
        # rows x cols; rank 1 is the rank every task's weights admit, an
        # output layer of one row).
        _forward_only("dopamine", "dopamine"),
        _forward_only("dopamine[no_baseline]", "dopamine", **PAPER_RPE),
        _forward_only("dopamine[lowrank]", "dopamine", perturbation="lowrank", rank=1),
        # The paper's RPE with four directions (the earlier defaults), and
        # what each part of them buys: one direction (the paper's rule), one
        # measured centrally at the cost of two forwards (no baseline
        # applies), the paper's Gaussian noise, rank-1 perturbations.
        _forward_only("dopamine[k=4,no_baseline]", "dopamine", **EARLIER_DEFAULTS),
        _forward_only("dopamine[k=1,no_baseline]", "dopamine", num_perturbations=1, **PAPER_RPE),
        _forward_only("dopamine[k=1,antithetic]", "dopamine", num_perturbations=1, antithetic=True, **PAPER_RPE),
        _forward_only("dopamine[rpe_tracking]", "rpe_tracking", lr_adaptation="rpe_tracking"),
        _forward_only("dopamine[k=4,no_baseline,gaussian]", "dopamine", **EARLIER_DEFAULTS, noise="gaussian"),
        _forward_only("dopamine[k=4,no_baseline,lowrank]", "dopamine", **EARLIER_DEFAULTS, perturbation="lowrank", rank=1),
        _forward_only(
            "dopamine[k=4,no_baseline,lowrank,gaussian]", "dopamine", **EARLIER_DEFAULTS, perturbation="lowrank", rank=1, noise="gaussian"
        ),
        # The forward-only peers keep their published rules: no baseline.
        # Standard WP: Gaussian noise, one direction, no adaptation.
        _forward_only("wp", "wp", lr_adaptation="none", noise="gaussian", num_perturbations=1, **PAPER_RPE),
        # The earlier defaults without the RPE rule: WP with their four
        # Rademacher directions, the ablation that tells the rule from the
        # averaging.
        _forward_only("wp[k=4]", "wp", lr_adaptation="none", **EARLIER_DEFAULTS),
        # MeZO's estimator: the central difference of Gaussian noise along one
        # direction, no adaptation; SPSA's: the same with Rademacher noise.
        _forward_only("zo-sgd[central]", "wp", lr_adaptation="none", antithetic=True, noise="gaussian", num_perturbations=1, **PAPER_RPE),
        _forward_only("spsa", "wp", lr_adaptation="none", antithetic=True, noise="rademacher", num_perturbations=1, **PAPER_RPE),
        # FZOO's estimator (arXiv 2506.09034): one-sided Rademacher
        # directions against one base loss, the step divided by the spread of
        # their losses; four directions, as the RPE ablation's.
        _forward_only("fzoo", "fzoo", lr_adaptation="loss_spread", noise="rademacher", **EARLIER_DEFAULTS),
        Contender("sgd", "sgd", True, lambda p, lr, sigma, seed: torch.optim.SGD(p, lr=lr)),
        Contender("sgd[foreach]", "sgd", True, lambda p, lr, sigma, seed: torch.optim.SGD(p, lr=lr, foreach=True)),
        Contender("adam", "adam", True, lambda p, lr, sigma, seed: torch.optim.Adam(p, lr=lr)),
        Contender("adam[foreach]", "adam", True, lambda p, lr, sigma, seed: torch.optim.Adam(p, lr=lr, foreach=True)),
        Contender("adam[fused]", "adam", True, lambda p, lr, sigma, seed: torch.optim.Adam(p, lr=lr, fused=True)),
    ]
}


@dataclasses.dataclass(frozen=True)
class DirectionMethod:
    """A forward-only method of the directions study (directions.py): its
    lr grid family, its options but the number of directions, and the
    numbers of directions it is tuned over."""

    family: str
    options: Dict[str, object]
    counts: tuple = (1, 2, 4, 8)


# Each forward-only method with k directions. WP takes the defaults'
# Rademacher noise, so that WP and Dopamine at the same k differ in the
# step-size rule alone (the study's ablation); loss_spread needs two
# perturbed losses, so FZOO starts at k = 2.
DIRECTION_METHODS = {
    "dopamine": DirectionMethod("dopamine", {}),
    "wp": DirectionMethod("wp", dict(lr_adaptation="none", **PAPER_RPE)),
    "zo-sgd[central]": DirectionMethod("wp", dict(lr_adaptation="none", antithetic=True, noise="gaussian", **PAPER_RPE)),
    "spsa": DirectionMethod("wp", dict(lr_adaptation="none", antithetic=True, noise="rademacher", **PAPER_RPE)),
    "fzoo": DirectionMethod("fzoo", dict(lr_adaptation="loss_spread", noise="rademacher", **PAPER_RPE), (2, 4, 8)),
}


def with_directions(method: str, k: int) -> str:
    """The study's name of `method` with k directions: "wp[k=2]",
    "zo-sgd[central,k=8]"."""
    return f"{method[:-1]},k={k}]" if method.endswith("]") else f"{method}[k={k}]"


def _register_direction_contenders() -> None:
    """Every method of the study at each of its k, beside the contenders of
    the same options under their usual names ("dopamine[k=1]", "wp[k=4]")."""
    for method, spec in DIRECTION_METHODS.items():
        for k in spec.counts:
            name = with_directions(method, k)
            contender = _forward_only(name, spec.family, num_perturbations=k, **spec.options)
            known = CONTENDERS.setdefault(name, contender)
            if known.options != contender.options or known.family != contender.family:
                raise RuntimeError(f"the directions study's {name} is not the contender of that name: {known} vs {contender}")


_register_direction_contenders()

# The contenders of the paper's tasks that make bench scores: the defaults
# and two variants a user may pick, the forward-only peers, and the gradient
# baselines.
TASK_CONTENDERS = [
    "dopamine",
    "dopamine[no_baseline]",
    "dopamine[lowrank]",
    "wp",
    "wp[k=4]",
    "zo-sgd[central]",
    "spsa",
    "fzoo",
    "sgd",
    "adam",
]
# The earlier defaults and what each part of them bought: the evidence of
# docs/DESIGN.md "Defaults" (Rademacher noise, full perturbations) and of
# the paper's rule against WP with the same directions. Tuned and scored
# like the others, on demand (run_suite.py --contenders), not by make bench.
EVIDENCE_CONTENDERS = [
    "dopamine[k=4,no_baseline]",
    "dopamine[k=1,no_baseline]",
    "dopamine[k=1,antithetic]",
    "dopamine[k=4,no_baseline,gaussian]",
    "dopamine[k=4,no_baseline,lowrank]",
    "dopamine[k=4,no_baseline,lowrank,gaussian]",
]
# Learning-rate schedules every contender is tuned over: constant, or cosine
# decay from lr to 0 at the horizon.
SCHEDULES = ("constant", "cosine")


def schedule_factor(schedule: str, step: int, horizon: int) -> float:
    """The multiplier of the base lr at `step` (counted from 0)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / horizon))
    raise ValueError(f"unknown schedule {schedule!r} (expected one of {SCHEDULES})")


def take_step(optimizer, contender: Contender, loss_fn: Callable[[], torch.Tensor]) -> float:
    """One training step; returns the loss before the update."""
    if contender.gradient:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.item()
    return float(optimizer.step(loss_fn))


@dataclasses.dataclass
class Run:
    """One training run: when it reached the target, where it ended, whether
    it diverged, and the curve of (step, seconds, train loss, metric) at each
    evaluation."""

    steps_to_target: Optional[int] = None
    seconds_to_target: Optional[float] = None
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    final_metric: Optional[float] = None
    seconds: float = 0.0
    steps: int = 0
    curve: List[tuple] = dataclasses.field(default_factory=list)
    # Where set (fine-tuning), the held-out metric a run must end at or below:
    # the pretrained model's.
    metric_limit: Optional[float] = None

    @property
    def diverged(self) -> bool:
        """A non-finite loss; else, with a metric limit, a last metric above
        it (a fine-tuning that made the model worse), without one a last
        training loss above the first."""
        if not math.isfinite(self.final_loss):
            return True
        if self.metric_limit is not None:
            return self.final_metric is None or not self.final_metric <= self.metric_limit
        return self.final_loss > self.initial_loss


def train(
    contender: Contender,
    params: List[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    lr: float,
    sigma: float,
    seed: int,
    steps: int,
    reached: Callable[[float, Optional[float]], bool],
    evaluate: Optional[Callable[[], float]] = None,
    eval_every: int = 1,
    stop_at_target: bool = True,
    before_step: Optional[Callable[[], None]] = None,
    after_step: Optional[Callable[[], None]] = None,
    schedule: str = "constant",
    metric_limit: Optional[float] = None,
) -> Run:
    """Trains for `steps` steps with the base learning rate `lr` under
    `schedule`. The clock runs during optimizer steps only, not during
    evaluations or the task's own hooks (drawing a minibatch before a step,
    a projection after it). `reached(loss, metric)` says when the target is
    met; `metric_limit` is Run's."""
    optimizer = contender.make(params, lr, sigma, seed)
    run = Run(metric_limit=metric_limit)
    elapsed = 0.0
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule_factor(schedule, step - 1, steps)
        if before_step:
            before_step()
        start = time.perf_counter()
        loss = take_step(optimizer, contender, loss_fn)
        elapsed += time.perf_counter() - start
        if step == 1:
            run.initial_loss = loss
        if after_step:
            after_step()
        if not math.isfinite(loss):
            run.final_loss = loss
            break
        if step % eval_every == 0 or step == steps:
            metric = evaluate() if evaluate else None
            run.curve.append((step, elapsed, loss, metric))
            run.final_loss, run.final_metric = loss, metric
            if run.steps_to_target is None and reached(loss, metric):
                run.steps_to_target, run.seconds_to_target = step, elapsed
                if stop_at_target:
                    break
    run.seconds, run.steps = elapsed, step
    return run


def peak_step_bytes(
    contender: Contender,
    params: List[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    lr: float,
    sigma: float,
    before_step: Optional[Callable[[], None]] = None,
) -> Dict[str, int]:
    """What a training step allocates at its peak, above what was allocated
    before it (the optimizer's construction and state, activations kept for
    a backward, gradients, noise), counted by the profiler's allocation
    events over two steps; and the same for inference (one forward of the
    same loss under no_grad). CPU and CUDA allocations both count."""
    from torch.profiler import ProfilerActivity, profile

    def peak(work: Callable[[], None]) -> int:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, profile_memory=True) as prof:
            work()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
        held = highest = 0
        for event in events:
            held += event.nbytes()
            highest = max(highest, held)
        return highest

    def inference() -> None:
        with torch.no_grad():
            loss_fn()

    def training() -> None:
        optimizer = contender.make(params, lr, sigma, 0)
        for _ in range(2):
            take_step(optimizer, contender, loss_fn)
        del optimizer

    if before_step:
        before_step()
    return dict(inference=peak(inference), step=peak(training))


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def record(front_end, task, contender: Contender, config, device="cpu", **figures):
    """One row of results/bench.json: the schema's keys (null where a figure
    does not apply), then any task-specific ones in `figures`."""
    row = {
        "front_end": front_end,
        "task": task,
        "optimizer": contender.name,
        "config": config,
        "success_rate": None,
        "median_steps_to_target": None,
        "median_seconds_to_target": None,
        "final_metric": None,
        "peak_memory_bytes": None,
        "ms_per_step": None,
        "forward_passes_per_step": contender.forwards_per_step,
        "backward_passes_per_step": contender.backwards_per_step,
        "torch_version": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    row.update(figures)
    return row


class Progress:
    """One line per finished unit of work, with the elapsed time."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)
