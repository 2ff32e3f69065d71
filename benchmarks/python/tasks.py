"""The paper's tasks and a real-data task, each trained by every contender at
every point of its learning-rate grid."""

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from harness import CONTENDERS, Run, grid, median, record, train


@dataclasses.dataclass
class Task:
    """A task: how to build a model and its losses for a seed, and the rule
    that picks each contender's best grid point."""

    name: str
    seeds: List[int]
    steps: int
    sigma: float
    centres: Dict[str, float]
    setup: Callable[[int], dict]  # seed -> params, loss_fn, evaluate, reached, after_step
    eval_every: int
    metric: str  # what final_metric is
    higher_is_better: bool
    chosen_by: str
    config: dict
    stop_at_target: bool = True


def _choose(task: Task, rows: List[dict]) -> dict:
    def key(row):
        metric = row["final_metric"]
        steps = row["median_steps_to_target"] or float("inf")
        if task.name == "xor":
            return (row["success_rate"], -steps)
        if metric is None or metric != metric:  # diverged: worst of all
            return (float("-inf"), row["success_rate"])
        return (metric if task.higher_is_better else -metric, row["success_rate"])

    return max(rows, key=key)


def run_task(task: Task, contender_names: List[str], progress) -> List[dict]:
    """Every contender at every grid point; the best one is marked selected."""
    records = []
    for name in contender_names:
        contender = CONTENDERS[name]
        rows = []
        for lr in grid(task.centres, contender):
            runs: List[Run] = []
            for seed in task.seeds:
                setup = task.setup(seed)
                runs.append(
                    train(
                        contender,
                        setup["params"],
                        setup["loss_fn"],
                        lr,
                        task.sigma,
                        seed,
                        task.steps,
                        setup["reached"],
                        setup.get("evaluate"),
                        task.eval_every,
                        task.stop_at_target,
                        setup.get("before_step"),
                        setup.get("after_step"),
                    )
                )
            solved = [r for r in runs if r.steps_to_target is not None]
            finals = [r.final_metric if r.final_metric is not None else r.final_loss for r in runs]
            rows.append(
                record(
                    "python",
                    task.name,
                    contender,
                    dict(task.config, lr=lr, sigma=task.sigma if not contender.gradient else None, seeds=len(task.seeds)),
                    success_rate=len(solved) / len(runs),
                    median_steps_to_target=median([r.steps_to_target for r in solved]),
                    median_seconds_to_target=median([r.seconds_to_target for r in solved]),
                    final_metric=median(finals),
                    ms_per_step=1e3 * sum(r.seconds for r in runs) / max(1, sum(r.steps for r in runs)),
                    metric=task.metric,
                    grid=grid(task.centres, contender),
                    chosen_by=task.chosen_by,
                    curve=runs[0].curve,
                )
            )
            row = rows[-1]
            progress(
                f"{task.name}: {name} lr {lr:g}: solved {len(solved)}/{len(runs)}, "
                f"median steps {row['median_steps_to_target']}, {task.metric} {row['final_metric']:.4g}"
            )
        best = _choose(task, rows)
        for row in rows:
            row["config"]["selected"] = row is best
        records.extend(rows)
    return records


# --- XOR (paper) -------------------------------------------------------------

XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def _xor_setup(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1), torch.nn.Sigmoid())
    return dict(
        params=list(model.parameters()),
        loss_fn=lambda: F.mse_loss(model(XOR_INPUTS), XOR_TARGETS),
        reached=lambda loss, metric: loss < 0.01,
    )


def xor_task(full: bool) -> Task:
    return Task(
        name="xor",
        seeds=list(range(20)),
        steps=5000 if full else 2000,
        sigma=0.01,
        centres=dict(dopamine=0.1, rpe_tracking=1.0, wp=1.0, sgd=9.0, adam=0.15),
        setup=_xor_setup,
        eval_every=1,
        metric="train MSE",
        higher_is_better=False,
        chosen_by="highest success rate, then fewest median steps to MSE < 0.01",
        config=dict(model="2-4-1 MLP, tanh/sigmoid", loss="MSE, full batch", target="MSE < 0.01", max_steps=5000 if full else 2000),
    )


# --- Chaotic forecasting (paper) ---------------------------------------------


def _derivative(system: str, s: torch.Tensor) -> torch.Tensor:
    x, y, z = s
    if system == "lorenz":
        return torch.stack([10.0 * (y - x), x * (28.0 - z) - y, x * y - (8.0 / 3.0) * z])
    return torch.stack([-y - z, x + 0.2 * y, 0.2 + z * (x - 5.7)])


def trajectory(system: str, steps: int = 5000, dt: float = 0.01, burn_in: int = 1000) -> torch.Tensor:
    """RK4 from (1, 1, 1), float64, after `burn_in` steps onto the attractor."""
    s = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    out = []
    for i in range(burn_in + steps):
        k1 = _derivative(system, s)
        k2 = _derivative(system, s + 0.5 * dt * k1)
        k3 = _derivative(system, s + 0.5 * dt * k2)
        k4 = _derivative(system, s + dt * k3)
        s = s + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i >= burn_in:
            out.append(s)
    return torch.stack(out)


class ReluRnn(torch.nn.Module):
    """Vanilla ReLU RNN; a linear read-out of the last hidden state predicts
    the next point."""

    def __init__(self, hidden: int):
        super().__init__()
        self.rnn = torch.nn.RNN(3, hidden, nonlinearity="relu", batch_first=True)
        self.head = torch.nn.Linear(hidden, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


_SERIES_CACHE: Dict[str, tuple] = {}


def _windows(system: str, window: int = 32):
    if system not in _SERIES_CACHE:
        series = trajectory(system)
        split = int(0.8 * len(series))
        mean, std = series[:split].mean(0), series[:split].std(0)
        z = ((series - mean) / std).float()
        x = z.unfold(0, window, 1)[:-1].transpose(1, 2).contiguous()  # [n, window, 3]
        y = z[window:]
        cut = split - window
        test_x, test_y = x[cut:], y[cut:]
        persistence = F.mse_loss(test_x[:, -1], test_y).item()
        _SERIES_CACHE[system] = (x[:cut], y[:cut], test_x, test_y, persistence)
    return _SERIES_CACHE[system]


def _chaotic_setup(system: str, hidden: int, batch: Optional[int], reset_radius: bool):
    def setup(seed):
        train_x, train_y, test_x, test_y, persistence = _windows(system)
        torch.manual_seed(seed)
        model = ReluRnn(hidden)
        batches = torch.Generator().manual_seed(seed)
        current = {"x": train_x, "y": train_y}

        def next_batch():
            if batch is not None:
                index = torch.randint(len(train_x), (batch,), generator=batches)
                current["x"], current["y"] = train_x[index], train_y[index]

        def reset_spectral_radius():
            # The paper's reset of the recurrent matrix to spectral radius 1.
            with torch.no_grad():
                w = model.rnn.weight_hh_l0
                w.div_(torch.linalg.eigvals(w).abs().max().clamp_min(1e-12))

        def evaluate():
            with torch.no_grad():
                return F.mse_loss(model(test_x), test_y).item()

        return dict(
            params=list(model.parameters()),
            loss_fn=lambda: F.mse_loss(model(current["x"]), current["y"]),
            evaluate=evaluate,
            reached=lambda loss, metric: metric is not None and metric < persistence,
            before_step=next_batch,
            after_step=reset_spectral_radius if reset_radius else None,
        )

    return setup


def chaotic_task(system: str, full: bool) -> Task:
    hidden = 512 if full else 32
    batch = None if full else 256
    steps = 2000 if full else 1000
    sigma = {"lorenz": 1e-4, "rossler": 1e-5}[system]
    persistence = _windows(system)[4]
    return Task(
        name=system,
        seeds=[0, 1, 2] if full else [0],
        steps=steps,
        sigma=sigma,
        centres=dict(dopamine=0.003, rpe_tracking=0.01, wp=0.01, sgd=0.3, adam=0.01),
        setup=_chaotic_setup(system, hidden, batch, reset_radius=full),
        eval_every=10 if full else 20,
        metric="test MSE",
        higher_is_better=False,
        chosen_by="lowest final test MSE (one-step-ahead, z-scored)",
        config=dict(
            model=f"ReLU RNN, {hidden} hidden, linear read-out",
            data="RK4 dt 0.01, 5000 steps, z-scored on the first 80%, windows of 32",
            batch="full" if batch is None else batch,
            steps=steps,
            spectral_radius_reset=full,
            target=f"test MSE < persistence forecast ({persistence:.4g})",
        ),
        stop_at_target=False,
    )


# --- Handwritten digits (real data) -----------------------------------------

_DIGITS = {}


def _digits_data():
    if not _DIGITS:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(x))
        _DIGITS.update(train=(x[order[:cut]], y[order[:cut]]), test=(x[order[cut:]], y[order[cut:]]))
    return _DIGITS


def _digits_setup(seed):
    (train_x, train_y), (test_x, test_y) = _digits_data()["train"], _digits_data()["test"]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def evaluate():
        with torch.no_grad():
            return (model(test_x).argmax(1) == test_y).float().mean().item()

    return dict(
        params=list(model.parameters()),
        loss_fn=lambda: F.cross_entropy(model(train_x), train_y),
        evaluate=evaluate,
        reached=lambda loss, metric: metric is not None and metric >= 0.9,
    )


def digits_task(full: bool) -> Task:
    steps = 10000 if full else 3000
    return Task(
        name="digits",
        seeds=[0, 1, 2] if full else [0],
        steps=steps,
        sigma=0.01,
        centres=dict(dopamine=0.003, rpe_tracking=0.01, wp=0.03, sgd=1.0, adam=0.003),
        setup=_digits_setup,
        eval_every=25,
        metric="test accuracy",
        higher_is_better=True,
        chosen_by="highest final test accuracy",
        config=dict(
            model="64-32-10 MLP, ReLU",
            data="scikit-learn digits (8x8), 1437 train / 360 test, split by seed 0",
            loss="cross-entropy, full batch",
            steps=steps,
            target="test accuracy >= 0.9",
        ),
        stop_at_target=False,
    )


def all_tasks(full: bool) -> List[Task]:
    return [xor_task(full), chaotic_task("lorenz", full), chaotic_task("rossler", full), digits_task(full)]

