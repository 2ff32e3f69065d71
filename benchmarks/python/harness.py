"""What every benchmark shares: the contenders (Dopamine in each mode,
standard WP, torch's SGD and Adam), their learning-rate grids, the training
loop that times them, and the record format of results/bench.json."""

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import torch_dopamine

# The grid rule: three points, x1/3, x1 and x3 around a per-task centre for
# each optimizer family (the centres are in each task's GRID_CENTRES).
GRID_FACTORS = (1 / 3, 1.0, 3.0)


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer as the report names it."""

    name: str  # "dopamine", "dopamine[rpe_tracking]", "wp", "sgd", "adam[foreach]", ...
    family: str  # key of the task's grid centre
    gradient: bool  # needs backward()
    make: Callable[[List[torch.Tensor], float, float, int], torch.optim.Optimizer]

    @property
    def forwards_per_step(self) -> int:
        return 1 if self.gradient else 2

    @property
    def backwards_per_step(self) -> int:
        return 1 if self.gradient else 0


def _dopamine(**options):
    return lambda params, lr, sigma, seed: torch_dopamine.Dopamine(params, lr=lr, sigma=sigma, seed=seed, **options)


CONTENDERS = {
    c.name: c
    for c in [
        Contender("dopamine", "dopamine", False, _dopamine()),
        Contender("dopamine[rpe_tracking]", "rpe_tracking", False, _dopamine(lr_adaptation="rpe_tracking")),
        Contender("dopamine[rademacher]", "dopamine", False, _dopamine(noise="rademacher")),
        Contender("wp", "wp", False, _dopamine(lr_adaptation="none")),
        Contender("sgd", "sgd", True, lambda p, lr, sigma, seed: torch.optim.SGD(p, lr=lr)),
        Contender("sgd[foreach]", "sgd", True, lambda p, lr, sigma, seed: torch.optim.SGD(p, lr=lr, foreach=True)),
        Contender("adam", "adam", True, lambda p, lr, sigma, seed: torch.optim.Adam(p, lr=lr)),
        Contender("adam[foreach]", "adam", True, lambda p, lr, sigma, seed: torch.optim.Adam(p, lr=lr, foreach=True)),
        Contender("adam[fused]", "adam", True, lambda p, lr, sigma, seed: torch.optim.Adam(p, lr=lr, fused=True)),
    ]
}
TASK_CONTENDERS = [
    "dopamine",
    "dopamine[rpe_tracking]",
    "dopamine[rademacher]",
    "wp",
    "sgd",
    "sgd[foreach]",
    "adam",
    "adam[foreach]",
]


def grid(centres: Dict[str, float], contender: Contender) -> List[float]:
    centre = centres[contender.family]
    return [float(f"{centre * factor:.3g}") for factor in GRID_FACTORS]


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
    """One training run: when it reached the target, where it ended, and the
    curve of (step, seconds, train loss, metric) at each evaluation."""

    steps_to_target: Optional[int] = None
    seconds_to_target: Optional[float] = None
    final_loss: float = float("nan")
    final_metric: Optional[float] = None
    seconds: float = 0.0
    steps: int = 0
    curve: List[tuple] = dataclasses.field(default_factory=list)


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
) -> Run:
    """Trains for `steps` steps. The clock runs during optimizer steps only,
    not during evaluations or the task's own hooks (drawing a minibatch
    before a step, a projection after it). `reached(loss, metric)` says when
    the target is met."""
    optimizer = contender.make(params, lr, sigma, seed)
    run = Run()
    elapsed = 0.0
    for step in range(1, steps + 1):
        if before_step:
            before_step()
        start = time.perf_counter()
        loss = take_step(optimizer, contender, loss_fn)
        elapsed += time.perf_counter() - start
        if after_step:
            after_step()
        if not (loss == loss) or abs(loss) == float("inf"):
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
