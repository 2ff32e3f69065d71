"""Scaling: MLPs from about 1e3 to 1e7 parameters (1e9 on a GPU), each point
measured in a fresh subprocess: milliseconds per training step, optimizer-only
milliseconds, and peak memory above a no-grad inference run of the same model
that evaluates the same loss (process peak RSS on CPU,
torch.cuda.max_memory_allocated on CUDA), each peak counted from the start of
its own phase. Also the
op benchmark: the fused ops against torch's own kernels at 1e7 parameters.

Run as a script, it measures one point and prints it as JSON."""

import argparse
import functools
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import torch_dopamine
from torch_dopamine._options import pack
from harness import CONTENDERS, DOPAMINE_DEFAULTS, take_step

INPUTS, CLASSES, BATCH = 64, 10, 64


def width_for(params: int) -> int:
    """Width h of a 64-h-h-10 MLP with about `params` parameters."""
    h = 1
    while (h * h + h) + (INPUTS * h + h) + (h * CLASSES + CLASSES) < params:
        h += 1
    return h


def mlp(width: int, device) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, CLASSES),
    ).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median milliseconds of `fn` over `repeats` runs after one warm-up."""
    return interleaved({"fn": fn}, device, repeats)["fn"]


def interleaved(fns, device, repeats):
    """Median milliseconds of each callable of `fns` (a dict), timed in
    rounds that run each once, so that the machine's drift hits all alike."""
    for fn in fns.values():
        fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(device) -> int:
    """Restarts the peak count at the current use; returns that use. On
    Linux, writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so
    the peak measured next is this phase's, not one left by start-up."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_up(contender, device) -> None:
    """One step on a small model (large enough to use the thread pool): what
    the first step of an optimizer loads or starts (torch.optim's machinery,
    the ops, the kernels' worker threads) is not per-parameter memory."""
    layer = torch.nn.Linear(512, 512).to(device)
    optimizer = contender.make(list(layer.parameters()), 1e-4, 1e-3, 0)
    take_step(optimizer, contender, lambda: layer(torch.ones(1, 512, device=device)).sum())


def measure_point(optimizer: str, params: int, device: str, repeats: int) -> dict:
    device = torch.device(device)
    contender = CONTENDERS[optimizer]
    torch.manual_seed(0)
    model = mlp(width_for(params), device)
    x = torch.randn(BATCH, INPUTS, device=device)
    y = torch.randint(CLASSES, (BATCH,), device=device)
    weights = list(model.parameters())
    warm_up(contender, device)
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    # The inference run the memory is compared with, its own peak: the same
    # evaluation as a training step's (forward and loss), without autograd.
    reset_peak(device)
    with torch.no_grad():
        for _ in range(2):
            loss_fn()
    sync(device)
    inference_peak = peak_bytes(device)
    reset_peak(device)

    opt = contender.make(weights, 1e-4, 1e-3, 0)

    def forward():
        with torch.no_grad():
            loss_fn()

    # A step against the forward passes it makes, each measured alone under
    # no_grad, interleaved.
    ms = interleaved({"step": lambda: take_step(opt, contender, loss_fn), "forward": forward}, device, repeats)
    step_ms = ms["step"]
    peak = peak_bytes(device)
    if contender.gradient:
        optimizer_ms = timed(opt.step, device, repeats)
    else:
        noise, directions = opt.param_groups[0]["noise"], opt.param_groups[0]["num_perturbations"]
        state = torch.zeros(len(torch_dopamine.STATE_FIELDS), dtype=torch.float64)
        with torch.no_grad():
            optimizer_ms = timed(lambda: engine_step(weights, noise, state, directions), device, repeats)
    return {
        "optimizer": optimizer,
        "params": sum(w.numel() for w in weights),
        "param_bytes": sum(w.numel() * w.element_size() for w in weights),
        "ms_per_step": step_ms,
        "forward_ms": ms["forward"],
        "step_vs_forward_passes": step_ms / (contender.forward_equivalents_per_step * ms["forward"]),
        "optimizer_ms_per_step": optimizer_ms,
        "peak_memory_bytes": max(0, peak - inference_peak),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def run_point(optimizer, params, device, repeats) -> dict:
    """measure_point in a fresh interpreter, so peak RSS is this point's.

    glibc's mmap threshold is fixed at its default (128 KiB): left dynamic,
    it rises after the first large free, and the activation buffers then come
    from the heap, whose top may keep a freed one resident; the peak then
    varied by one or two activation buffers between runs of the same point.
    Fixed, every buffer above it is returned on free, so the peak counts only
    what is alive, in the inference run and the training run alike."""
    command = [sys.executable, __file__, "--optimizer", optimizer, "--params", str(params), "--device", device]
    command += ["--repeats", str(repeats)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"scaling point {optimizer} {params} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# Losses of a step that is taken (state on the CPU, as without capturable).
LOSSES = torch.tensor([1.0, 1.0 + 1e-6], dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def packed_options(noise, directions, rank=0):
    """The options of the ops' steps, packed once (as the optimizer keeps
    them while they stay the same); rank > 0: a low-rank perturbation."""
    defaults = torch_dopamine.Dopamine([torch.zeros(1, requires_grad=True)]).defaults
    perturbation = dict(perturbation="lowrank", rank=rank) if rank else {}
    return pack({**defaults, "lr": 1e-4, "sigma": 1e-3, "noise": noise, "num_perturbations": directions, **perturbation})


def move(params, noise, state, carried=(0, 0), to=(1, 0), directions=1, rank=0):
    torch.ops.dopamine.move_.default(
        params, [], [state], options=packed_options(noise, directions, rank), indices=list(range(len(params))),
        group_sizes=[len(params)], carried=list(carried), to=list(to),
    )


def finish(params, noise, state, directions=1, rank=0):
    losses = torch.cat([LOSSES[:1], LOSSES[1:].repeat(directions)])
    plan = torch.ops.dopamine.plan_step(state, losses, options=packed_options(noise, directions, rank))
    torch.ops.dopamine.finish_step_.default(
        params, [], [state], [plan], indices=list(range(len(params))), group_sizes=[len(params)]
    )


def engine_step(params, noise, state, directions=1, rank=0):
    """The optimizer's own work in a step, evaluations left out: the move_
    calls of `directions` directions (theta + sigma z_0, then straight to
    theta + sigma z_1, ...: one pass each), plan_step and finish_step_."""
    for j in range(directions):
        move(params, noise, state, carried=(1, j - 1) if j else (0, 0), to=(1, j), directions=directions, rank=rank)
    finish(params, noise, state, directions, rank)


# The ranks of the low-rank perturbations the ops benchmark times.
LOWRANK_RANKS = (1, 4)

# The same 1e7 elements as few large and as many small tensors.
LAYOUTS = ((5, 2_000_000), (200, 50_000), (2000, 5_000))


def layout_benchmark(device: str, repeats: int = 15) -> dict:
    """The optimizer's step (torch_dopamine.Dopamine with the default options
    but the noise, and a closure that computes nothing) on each layout of
    LAYOUTS, interleaved (one step of each layout per round, medians over
    rounds), and each layout's ratio to the 5-tensor one."""
    device = torch.device(device)
    evaluations = itertools.count()

    def closure():
        # Losses that differ, so that every step moves the parameters.
        return torch.tensor(1.0 + 1e-6 * (next(evaluations) % 3))

    result = {}
    for noise in ("gaussian", "rademacher"):
        steps = {}
        for count, size in LAYOUTS:
            params = [torch.zeros(size, device=device, requires_grad=True) for _ in range(count)]
            steps[f"{count}x{size}"] = functools.partial(torch_dopamine.Dopamine(params, noise=noise).step, closure)
        ms = interleaved(steps, device, repeats)
        base = ms[f"{LAYOUTS[0][0]}x{LAYOUTS[0][1]}"]
        result[noise] = {"ms": ms, "ratio": {name: v / base for name, v in ms.items()}}
    return result


def ops_benchmark(device: str, numel: int = 10_000_000, tensors: int = 5, repeats: int = 30) -> dict:
    """The fused ops at `numel` float32 elements in `tensors` tensors, against
    torch's normal_, copy_ and the fastest Adam steps, in one process. A step
    of k directions (one, and the default) makes k + 1 memory passes: k
    move_ passes and the finish. The tensors are matrices of 1000 rows (for
    the low-rank perturbations; the others draw the same either way)."""
    device = torch.device(device)
    size = numel // tensors
    params = [torch.zeros(1000, size // 1000, device=device) for _ in range(tensors)]
    others = [torch.zeros_like(p) for p in params]
    state = torch.zeros(len(torch_dopamine.STATE_FIELDS), dtype=torch.float64)
    k = DOPAMINE_DEFAULTS["num_perturbations"]
    fns = {}
    for noise in ("gaussian", "rademacher"):
        fns[f"move_[{noise}]"] = functools.partial(move, params, noise, state)
        # From one direction to the next: one pass drawing both.
        fns[f"move_[{noise}, to the next direction]"] = functools.partial(
            move, params, noise, state, carried=(1, 0), to=(1, 1), directions=2
        )
        fns[f"finish_step_[{noise}]"] = functools.partial(finish, params, noise, state)
        fns[f"finish_step_[{noise}, k={k}]"] = functools.partial(finish, params, noise, state, k)
        fns[f"step[{noise}, k=1]"] = functools.partial(engine_step, params, noise, state)
        fns[f"step[{noise}, k={k}]"] = functools.partial(engine_step, params, noise, state, k)
        if device.type == "cpu":  # perturbation="lowrank" runs on the CPU only
            for rank in LOWRANK_RANKS:
                fns[f"move_[{noise}, lowrank r={rank}]"] = functools.partial(move, params, noise, state, rank=rank)
                fns[f"step[{noise}, lowrank r={rank}, k={k}]"] = functools.partial(
                    engine_step, params, noise, state, k, rank
                )
    # The memory passes each op makes, for its bandwidth.
    passes = {name: 1 for name in fns if name.startswith(("move_", "finish_step_"))}
    passes.update({name: 2 if name.endswith(" k=1]") else k + 1 for name in fns if name.startswith("step[")})
    fns["normal_"] = lambda: [p.normal_() for p in params]
    fns["copy_"] = lambda: [o.copy_(p) for o, p in zip(others, params)]
    adam_params = [torch.nn.Parameter(torch.zeros(size, device=device)) for _ in range(tensors)]
    for p in adam_params:
        p.grad = torch.zeros_like(p)
    for variant in ("fused", "foreach"):
        try:
            adam = torch.optim.Adam(adam_params, lr=1e-3, **{variant: True})
            adam.step()
            fns[f"adam[{variant}]"] = adam.step
        except (RuntimeError, ValueError) as error:  # fused Adam is missing on some builds
            print(f"adam[{variant}] unavailable: {error}", file=sys.stderr)
    # Every figure from the same interleaved rounds: the ratios compare runs
    # that saw the same machine.
    times = interleaved(fns, device, repeats)
    for variant in ("fused", "foreach"):
        times.setdefault(f"adam[{variant}]", None)
    adam_best = min(v for k, v in times.items() if k.startswith("adam[") and v is not None)
    copy_gbs = 8 * numel / (times["copy_"] * 1e-3) / 1e9
    noises = ("gaussian", "rademacher")
    return {
        "numel": numel,
        "tensors": tensors,
        "repeats": repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "default_directions": k,
        "ms": times,
        "adam_fastest_ms": adam_best,
        "step_vs_adam": {n: times[f"step[{n}, k={k}]"] / adam_best for n in noises},
        "lowrank_step_vs_adam": {
            f"{n}, r={rank}": times[f"step[{n}, lowrank r={rank}, k={k}]"] / adam_best
            for n in noises for rank in LOWRANK_RANKS if f"step[{n}, lowrank r={rank}, k={k}]" in times
        },
        "noise_throughput_vs_normal_": times["normal_"] / times["move_[gaussian]"],
        # Each pass reads and writes every element once: 8 bytes per float.
        "gb_per_s": {name: 8 * numel * count / (times[name] * 1e-3) / 1e9 for name, count in passes.items()},
        "copy_gb_per_s": copy_gbs,
        # The bandwidth bound of a default step: k + 1 copies.
        "step_vs_copies": {n: times[f"step[{n}, k={k}]"] / ((k + 1) * times["copy_"]) for n in noises},
        "layouts": layout_benchmark(str(device)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure_point(args.optimizer, args.params, args.device, args.repeats)))
