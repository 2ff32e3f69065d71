"""Dopamine over a process group on real devices: the GPU check runs it with
NCCL on two GPUs (scripts/gpu_check.sh); with gloo it runs on CPUs too.

    torchrun --standalone --nproc_per_node=2 tests/python/ranks_check.py [--backend gloo --device cpu]

Every rank trains data parallel (its own shard) and population parallel (k =
2W directions on the whole batch), then checks that every rank holds the same
bits and that population parallel equals one process evaluating every
direction itself. Prints one line per check and exits 1 if any failed.
"""

import argparse
import sys

import torch
import torch.distributed as dist

import torch_dopamine

ROWS = 64


def batch(device):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, 16, generator=generator)
    return x.to(device), torch.sin(x.sum(1, keepdim=True)).to(device)


def model(device):
    generator = torch.Generator().manual_seed(3)
    shapes = [(32, 16), (32,), (1, 32), (1,)]
    return [(0.3 * torch.randn(shape, generator=generator)).to(device).requires_grad_() for shape in shapes]


def loss_on(params, rows, data):
    x, y = data
    w1, b1, w2, b2 = params
    return ((torch.tanh(x[rows] @ w1.T + b1) @ w2.T + b2 - y[rows]) ** 2).mean()


def same_on_every_rank(tensors, device):
    digest = torch.tensor([torch.ops.dopamine.digest([t.detach() for t in tensors])], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    data = batch(device)
    size = ROWS // world_size
    shard = slice(rank * size, (rank + 1) * size)
    checks = {}

    params = model(device)
    opt = torch_dopamine.Dopamine(params, lr=0.02, sigma=1e-3, process_group=dist.group.WORLD, verify_every=10)
    losses = [opt.step(lambda: loss_on(params, shard, data)).item() for _ in range(60)]
    checks["data parallel: ranks agree"] = same_on_every_rank(params, device)
    checks["data parallel: the loss halved"] = losses[-1] < losses[0] / 2

    options = dict(lr=0.05, sigma=1e-3, num_perturbations=2 * world_size)
    params, alone = model(device), model(device)
    opt = torch_dopamine.Dopamine(params, **options, process_group=dist.group.WORLD, parallel="population")
    single = torch_dopamine.Dopamine(alone, **options)
    for _ in range(10):
        opt.step(lambda: loss_on(params, slice(0, ROWS), data))
        single.step(lambda: loss_on(alone, slice(0, ROWS), data))
    checks["population: ranks agree"] = same_on_every_rank(params, device)
    checks["population: equals one process"] = all(torch.equal(p, q) for p, q in zip(params, alone))

    failed = [name for name, passed in checks.items() if not passed]
    if rank == 0:
        for name, passed in checks.items():
            print(f"{'pass' if passed else 'FAIL'}  {name} ({world_size} ranks, {args.backend}, {device.type})", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
