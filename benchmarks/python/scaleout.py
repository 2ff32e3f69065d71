"""Scale-out: data-parallel Dopamine against DDP with Adam and with SGD, on
`ranks` processes over gloo on loopback, the 64-h-h-10 MLP of the scaling
benchmark at each size, a global batch of 64 split evenly.

Per contender and size: the median step time over interleaved rounds (each
round steps every contender once, so the machine's drift hits all alike),
and the bytes each rank sends per step, measured from the loopback
interface's transmit counter over a run of that contender alone (minus a run
of the same barriers without steps), beside the payload its collectives
carry. Every rank runs one thread.

Run as a script, it starts the ranks itself and prints the records as JSON;
run_suite.py calls `run`."""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import torch_dopamine
from harness import CONTENDERS
from scaling import BATCH, CLASSES, INPUTS, mlp, width_for

# Rounds of interleaved timing, and steps of each byte count.
ROUNDS, BYTE_STEPS = 10, 5
# The contenders, and the CONTENDERS entry each reports as.
SCALEOUT_CONTENDERS = {"dopamine[data]": "dopamine", "ddp+adam[fused]": "adam[fused]", "ddp+sgd": "sgd"}


def loopback_bytes_sent() -> int:
    with open("/proc/net/dev") as dev:
        for line in dev:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def make_steps(params: int, rank: int, world_size: int):
    """Each contender's step function on this rank's shard of the batch,
    over models that start from the same weights on every rank."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, INPUTS, generator=generator)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    x, y = x[shard], y[shard]
    width = width_for(params)
    steps = {}

    torch.manual_seed(1)
    model = mlp(width, "cpu")
    dopamine = torch_dopamine.Dopamine(model.parameters(), lr=1e-3, sigma=1e-3, process_group=dist.group.WORLD)
    steps["dopamine[data]"] = lambda: dopamine.step(lambda: F.cross_entropy(model(x), y))

    def forward():
        # One forward pass of this rank's shard, alone under no_grad: the
        # unit a step's time is compared with.
        with torch.no_grad():
            F.cross_entropy(model(x), y)

    steps["forward"] = forward

    for name, make in (
        ("ddp+adam[fused]", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
        ("ddp+sgd", lambda p: torch.optim.SGD(p, lr=1e-2)),
    ):
        torch.manual_seed(1)
        ddp = DistributedDataParallel(mlp(width, "cpu"))
        optimizer = make(ddp.parameters())

        def step(ddp=ddp, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            optimizer.step()
            return loss

        steps[name] = step
    count = sum(p.numel() for p in model.parameters())
    return steps, count


def measure(params: int, rank: int, world_size: int, rounds: int, byte_steps: int) -> dict:
    steps, count = make_steps(params, rank, world_size)
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    def sent(step_count, step):
        dist.barrier()
        before = loopback_bytes_sent()
        for _ in range(step_count):
            step()
        dist.barrier()
        return loopback_bytes_sent() - before

    barriers_only = min(sent(0, None) for _ in range(3))
    sent_per_step = {
        name: max(0.0, (sent(byte_steps, step) - barriers_only) / (byte_steps * world_size)) for name, step in steps.items()
    }
    return dict(
        params=count,
        ms=dict((name, 1e3 * statistics.median(t)) for name, t in times.items()),
        bytes_sent=sent_per_step,
    )


def payload_bytes(name: str, params: int) -> int:
    """What the step's collectives carry: for Dopamine one all-reduce of its
    losses and a failure flag, float64 (a step's forwards plus one: 6
    numbers, 32 bytes, with the default two directions); for DDP the
    float32 gradient."""
    base = CONTENDERS[SCALEOUT_CONTENDERS[name]]
    return 8 * (base.forwards_per_step + 1) if not base.gradient else 4 * params


def worker(rank: int, world_size: int, store: str, out: str, sizes, rounds: int, byte_steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300)
    )
    results = [measure(size, rank, world_size, rounds, byte_steps) for size in sizes]
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def run(sizes, ranks: int = 2, rounds: int = ROUNDS, byte_steps: int = BYTE_STEPS, timeout_s: int = 600) -> list:
    """Starts `ranks` processes; returns rank 0's measurements per size."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "results.json"
        command = [sys.executable, __file__, "--worker", "--store", str(Path(directory) / "store"), "--out", str(out),
                   "--ranks", str(ranks), "--rounds", str(rounds), "--byte-steps", str(byte_steps),
                   "--sizes", *map(str, sizes)]
        processes = [subprocess.Popen(command + ["--rank", str(rank)]) for rank in range(ranks)]
        try:
            for process in processes:
                process.wait(timeout=timeout_s)
        finally:
            for process in processes:
                process.kill()
        failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
        if failed:
            raise RuntimeError(f"scale-out: rank(s) {failed} failed")
        return json.loads(out.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10**6, 10**7])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--byte-steps", type=int, default=BYTE_STEPS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.rank, args.ranks, args.store, args.out, args.sizes, args.rounds, args.byte_steps)
    else:
        print(json.dumps(run(args.sizes, args.ranks, args.rounds, args.byte_steps), indent=1))


if __name__ == "__main__":
    sys.exit(main())
