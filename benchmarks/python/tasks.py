"""The paper's tasks, a real-data task, two spirals and fine-tuning a pretrained language
model: how to build each model and its losses for a seed, and the rule by
which a run is judged. The protocol (protocol.py) tunes and scores every
contender on them."""

import dataclasses
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import lm


@dataclasses.dataclass
class Task:
    """A task: how to build a model and its losses for a seed, its horizon,
    its scoring seeds, and the figure that judges a run."""

    name: str
    seeds: List[int]  # scoring seeds; tuning uses protocol.TUNING_SEEDS
    steps: int  # the horizon, the same for every contender
    sigma: float
    # Per contender family, the centre of its lr grid; fzoo's, when not
    # given, is Dopamine's times sigma (__post_init__).
    centres: Dict[str, float]
    # (seed, split) -> params, loss_fn, evaluate, reached, before_step,
    # after_step, metric_limit (harness.Run's); split is "validation"
    # (tuning) or "test" (scoring): the held-out set that evaluate and
    # reached judge.
    setup: Callable[[int, str], dict]
    eval_every: int
    metric: str  # what final_metric is
    higher_is_better: bool
    chosen_by: str
    config: dict
    stop_at_target: bool = True
    # The contenders it is tuned and scored on; None: harness.TASK_CONTENDERS.
    contenders: Optional[Sequence[str]] = None
    # Work done once before any run, in the main process (progress) -> None:
    # pretraining, say, so that the workers do not each repeat it.
    prepare: Optional[Callable[[Callable[[str], None]], None]] = None
    # Whether scoring measures each contender's peak memory against inference.
    measure_memory: bool = False

    def __post_init__(self):
        # loss_spread's lr is about sigma times rpe_normalized's
        # (docs/DESIGN.md, "The algorithm").
        self.centres.setdefault("fzoo", self.centres["dopamine"] * self.sigma)


# --- XOR (paper) -------------------------------------------------------------

XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def _xor_setup(seed, split):
    # XOR is judged by its training loss: there is nothing held out.
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
        centres=dict(dopamine=0.1, rpe_tracking=1.0, wp=1.0, sgd=3.0, adam=0.1),
        setup=_xor_setup,
        eval_every=1,
        metric="train MSE",
        higher_is_better=False,
        chosen_by="highest success rate, then fewest median steps to MSE < 0.01, on the tuning seeds",
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


@dataclasses.dataclass(frozen=True)
class Windows:
    """Windows of a series and the point after each: the first 70% of the
    series trains, the next 10% validates (tuning selects on it), the last
    20% tests (scoring reports it); targets never cross a boundary."""

    train: tuple
    held_out: Dict[str, tuple]  # split -> (x, y)
    persistence: Dict[str, float]  # split -> MSE of repeating the last point


_SERIES_CACHE: Dict[tuple, Windows] = {}


def _windows(system: str, window: int) -> Windows:
    if (system, window) not in _SERIES_CACHE:
        series = trajectory(system)
        validation_start, test_start = int(0.7 * len(series)), int(0.8 * len(series))
        mean, std = series[:validation_start].mean(0), series[:validation_start].std(0)
        z = ((series - mean) / std).float()
        x = z.unfold(0, window, 1)[:-1].transpose(1, 2).contiguous()  # [n, window, 3]; x[i] predicts y[i] = z[i + window]
        y = z[window:]
        cuts = validation_start - window, test_start - window
        held_out = dict(validation=(x[cuts[0] : cuts[1]], y[cuts[0] : cuts[1]]), test=(x[cuts[1] :], y[cuts[1] :]))
        _SERIES_CACHE[system, window] = Windows(
            train=(x[: cuts[0]], y[: cuts[0]]),
            held_out=held_out,
            persistence={split: F.mse_loss(hx[:, -1], hy).item() for split, (hx, hy) in held_out.items()},
        )
    return _SERIES_CACHE[system, window]


def _chaotic_setup(system: str, hidden: int, batch: Optional[int], window: int, reset_radius: bool):
    def setup(seed, split):
        windows = _windows(system, window)
        (train_x, train_y), (test_x, test_y) = windows.train, windows.held_out[split]
        persistence = windows.persistence[split]
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
    # Quick: a small RNN on minibatches of short windows, so that 3000 steps
    # of every contender on every seed fit make bench's budget; full: the
    # paper's size.
    hidden, batch, window = (512, None, 32) if full else (32, 64, 16)
    steps = 3000
    sigma = {"lorenz": 1e-4, "rossler": 1e-5}[system]
    persistence = _windows(system, window).persistence["test"]
    return Task(
        name=system,
        seeds=list(range(5)),
        steps=steps,
        sigma=sigma,
        centres=dict(dopamine=0.003, rpe_tracking=0.01, wp=0.01, sgd=0.3, adam=0.01),
        setup=_chaotic_setup(system, hidden, batch, window, reset_radius=full),
        eval_every=10 if full else 50,
        metric="test MSE",
        higher_is_better=False,
        chosen_by="fewest divergences, then lowest median final validation MSE, on the tuning seeds (a diverged run counts as the worst)",
        config=dict(
            model=f"ReLU RNN, {hidden} hidden, linear read-out",
            data=f"RK4 dt 0.01, 5000 steps, z-scored on the first 70% (train), then 10% validation and 20% test, windows of {window}",
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
        # 64% train, 16% validation (tuning selects on it), 20% test (scoring
        # reports it).
        validation_start, test_start = int(0.64 * len(x)), int(0.8 * len(x))
        for split, part in (("train", order[:validation_start]), ("validation", order[validation_start:test_start]), ("test", order[test_start:])):
            _DIGITS[split] = (x[part], y[part])
    return _DIGITS


def _classifier_setup(data, make_model, loss, predict, target):
    """A full-batch classification task's setup: `make_model()` seeded, the
    `loss` on the training split, accuracy (`predict(logits)` against the
    labels) on the held-out split, reached at `target`."""

    def setup(seed, split):
        (train_x, train_y), (test_x, test_y) = data()["train"], data()[split]
        torch.manual_seed(seed)
        model = make_model()

        def evaluate():
            with torch.no_grad():
                return (predict(model(test_x)) == test_y).float().mean().item()

        return dict(
            params=list(model.parameters()),
            loss_fn=lambda: loss(model(train_x), train_y),
            evaluate=evaluate,
            reached=lambda _, metric: metric is not None and metric >= target,
        )

    return setup


_digits_setup = _classifier_setup(
    _digits_data,
    lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)),
    F.cross_entropy,
    lambda logits: logits.argmax(1),
    0.9,
)


def _classification_task(name: str, full: bool, seeds: int, centres: Dict[str, float], setup, **config) -> Task:
    """A full-batch classification task, judged by test accuracy."""
    steps = 10000 if full else 3000
    return Task(
        name=name,
        seeds=list(range(seeds)),
        steps=steps,
        sigma=0.01,
        centres=centres,
        setup=setup,
        eval_every=25,
        metric="test accuracy",
        higher_is_better=True,
        chosen_by="fewest divergences, then highest median final validation accuracy, on the tuning seeds (a diverged run counts as the worst)",
        config=dict(config, steps=steps),
        stop_at_target=False,
    )


def digits_task(full: bool) -> Task:
    return _classification_task(
        "digits",
        full,
        5,
        dict(dopamine=0.003, rpe_tracking=0.01, wp=0.03, sgd=1.0, adam=0.003),
        _digits_setup,
        model="64-32-10 MLP, ReLU",
        data="scikit-learn digits (8x8), 1150 train / 287 validation / 360 test, split by seed 0",
        loss="cross-entropy, full batch",
        target="test accuracy >= 0.9",
    )


# --- Two spirals (a harder decision boundary) ---------------------------------

_SPIRALS = {}
SPIRAL_POINTS = 1000  # half on each arm
SPIRAL_TURNS = 2


def _spirals_data():
    """Two interleaved spirals of SPIRAL_TURNS turns each, with Gaussian
    jitter (the classic benchmark of Lang and Witbrock, 1988); 60% train, 20%
    validation, 20% test, drawn once from seed 0."""
    if not _SPIRALS:
        generator = torch.Generator().manual_seed(0)
        half = SPIRAL_POINTS // 2
        end = 2 * torch.pi * SPIRAL_TURNS
        turn = end * torch.rand(half, generator=generator).sqrt()
        arm = torch.stack([turn * torch.cos(turn), turn * torch.sin(turn)], 1) / end
        x = torch.cat([arm, -arm]) + 0.02 * torch.randn(2 * half, 2, generator=generator)
        y = torch.cat([torch.zeros(half), torch.ones(half)]).unsqueeze(1)
        order = torch.randperm(2 * half, generator=generator)
        validation_start, test_start = int(0.6 * len(x)), int(0.8 * len(x))
        for split, part in (("train", order[:validation_start]), ("validation", order[validation_start:test_start]), ("test", order[test_start:])):
            _SPIRALS[split] = (x[part], y[part])
    return _SPIRALS


_spirals_setup = _classifier_setup(
    _spirals_data,
    lambda: torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ),
    F.binary_cross_entropy_with_logits,
    lambda logits: (logits > 0).float(),
    0.95,
)


def spirals_task(full: bool) -> Task:
    return _classification_task(
        "spirals",
        full,
        10,
        dict(dopamine=0.03, rpe_tracking=0.1, wp=0.1, sgd=1.0, adam=0.01),
        _spirals_setup,
        model="2-32-32-1 MLP, tanh",
        data=f"two spirals of {SPIRAL_TURNS} turns, {SPIRAL_POINTS} points with jitter 0.02, 600 train / 200 validation / 200 test",
        loss="binary cross-entropy, full batch",
        target="test accuracy >= 0.95",
    )


# --- Fine-tuning a pretrained language model ---------------------------------

# Where make bench caches the pretrained model (keyed by its configuration).
LM_CACHE = Path(os.environ.get("DOPAMINE_LM_CACHE", Path(__file__).resolve().parents[2] / "results" / "lm_cache"))
LM_CONFIG = lm.LMConfig()
LM_BATCH = 16  # windows of lm.LMConfig.context bytes per step
LM_RANK = 4
LM_EVALUATION_WINDOWS = 64
LM_TARGET_GAIN = 0.05  # nats/byte below the pretrained model's held-out loss
# The contenders: Dopamine's defaults, MeZO's and FZOO's estimators, and the
# gradient references (docs/BENCHMARKS.md, "Fine-tuning").
FINETUNE_CONTENDERS = ("dopamine", "dopamine[lowrank]", "zo-sgd[central]", "fzoo", "sgd", "adam")
_LM: Dict[str, object] = {}


def _pretrained_lm(progress: Optional[Callable[[str], None]] = None) -> Dict[str, object]:
    """The pretrained model's weights and the fine-tuning text, once per
    process."""
    if not _LM:
        config = LM_CONFIG
        if progress and not lm.checkpoint_path(config, LM_CACHE).exists():
            progress(f"pretraining the language model ({config.pretrain_steps} AdamW steps; cached in {LM_CACHE})")
        _LM.update(config=config, weights=lm.pretrained(config, LM_CACHE).state_dict(), splits=lm.finetuning_splits())
    return _LM


def _finetune_setup(adapters: bool):
    def setup(seed, split):
        pretrained = _pretrained_lm()
        config, splits = pretrained["config"], pretrained["splits"]
        model = lm.TinyLM(config)
        model.load_state_dict(pretrained["weights"])
        torch.manual_seed(seed)  # the adapters' initialisation
        params = lm.add_adapters(model, LM_RANK) if adapters else list(model.parameters())
        held_out = lm.evaluation_windows(splits[split], config.context, LM_EVALUATION_WINDOWS)
        generator = torch.Generator().manual_seed(seed)
        batch = [None]

        def before_step():
            batch[0] = lm.batch_of(splits["train"], config.context, LM_BATCH, generator)

        def evaluate():
            with torch.no_grad():
                return lm.lm_loss(model, held_out).item()

        start = evaluate()
        return dict(
            model=model,
            params=params,
            loss_fn=lambda: lm.lm_loss(model, batch[0]),
            evaluate=evaluate,
            reached=lambda loss, metric: metric is not None and metric <= start - LM_TARGET_GAIN,
            before_step=before_step,
            metric_limit=start,
        )

    return setup


def finetune_task(adapters: bool, full: bool) -> Task:
    steps = 3000 if full else 300
    config = LM_CONFIG
    return Task(
        name="finetune-lora" if adapters else "finetune-full",
        seeds=list(range(5)),
        steps=steps,
        sigma=0.01,
        # From a probe of centre x {1/9, 1, 9} on one tuning seed per
        # family; adapters take larger steps than the whole model.
        centres=dict(dopamine=0.01, wp=0.1, sgd=3.0, adam=0.01)
        if adapters
        else dict(dopamine=0.001, wp=0.0001, sgd=0.1, adam=0.001),
        setup=_finetune_setup(adapters),
        eval_every=25,
        metric="test loss (nats/byte)",
        higher_is_better=False,
        chosen_by="fewest divergences, then lowest median final validation loss, on the tuning seeds (a diverged run "
        "counts as the worst)",
        config=dict(
            model=f"byte-level transformer, {config.layers} layers, width {config.width}, {config.heads} heads, context "
            f"{config.context}, pretrained by AdamW for {config.pretrain_steps} steps on the Python standard library's sources",
            data="Debian's licence texts (/usr/share/common-licenses), 80% train / 10% validation / 10% test by position",
            trained=f"rank-{LM_RANK} adapters on every linear layer of the blocks, the base frozen" if adapters else "every parameter",
            dtype="float32",
            batch=f"{LM_BATCH} random windows a step; held out: {LM_EVALUATION_WINDOWS} fixed windows",
            steps=steps,
            target=f"held-out loss {LM_TARGET_GAIN} nats/byte below the pretrained model's",
            divergence="a non-finite loss, or a last held-out loss above the pretrained model's",
        ),
        stop_at_target=False,
        contenders=FINETUNE_CONTENDERS,
        prepare=_pretrained_lm,
        measure_memory=True,
    )


TASK_NAMES = ("xor", "lorenz", "rossler", "digits", "spirals", "finetune-full", "finetune-lora")


def task_named(name: str, full: bool) -> Task:
    if name == "xor":
        return xor_task(full)
    if name == "digits":
        return digits_task(full)
    if name == "spirals":
        return spirals_task(full)
    if name.startswith("finetune-"):
        return finetune_task(name == "finetune-lora", full)
    return chaotic_task(name, full)


def all_tasks(full: bool) -> List[Task]:
    return [task_named(name, full) for name in TASK_NAMES]

