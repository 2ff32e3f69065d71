"""One rank of the multi-process tests (test_distributed.py starts them):
runs every scenario in order over gloo and saves what each rank saw to
OUT/rank{R}.pt, or the error of a scenario that failed here.

    python distributed_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR
"""

import datetime
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import torch_dopamine

ROWS = 48  # divisible by 2 and 4: equal shards


def data():
    """The whole batch: inputs and targets of a small regression."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, 5, generator=generator, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


def model():
    """The parameters of a 5-8-1 tanh network, float64."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(8, 5), (8,), (1, 8), (1,)]
    return [(0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_() for shape in shapes]


def loss_on(params, rows):
    x, y = data()
    w1, b1, w2, b2 = params
    prediction = torch.tanh(x[rows] @ w1.T + b1) @ w2.T + b2
    return ((prediction - y[rows]) ** 2).mean()


def shard(rank, world_size):
    size = ROWS // world_size
    return slice(rank * size, (rank + 1) * size)


def copies(params):
    return [p.detach().clone() for p in params]


def group_state(opt):
    return opt.group_state(0)


def error_of(action):
    """The type name and message of what action() raised, or None."""
    try:
        action()
    except Exception as error:  # noqa: BLE001: the tests check which
        return type(error).__name__, str(error)
    return None


def data_parallel(rank, world_size):
    """Training on shards; the test compares with one process on the batch."""
    results = {}
    for antithetic in (False, True):
        params = model()
        opt = torch_dopamine.Dopamine(
            params, lr=0.05, sigma=1e-3, antithetic=antithetic, process_group=dist.group.WORLD
        )
        losses = [opt.step(lambda: loss_on(params, shard(rank, world_size))) for _ in range(15)]
        results[antithetic] = dict(params=copies(params), state=group_state(opt), losses=torch.stack(losses))
    # Two directions, each evaluated by every rank on its shard.
    params = model()
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, num_perturbations=2, process_group=dist.group.WORLD)
    losses = [opt.step(lambda: loss_on(params, shard(rank, world_size))) for _ in range(15)]
    results["two directions"] = dict(params=copies(params), state=group_state(opt), losses=torch.stack(losses))
    # A closure returning a Python float gets a float back.
    params = model()
    opt = torch_dopamine.Dopamine(params, process_group=dist.group.WORLD)
    results["float"] = opt.step(lambda: loss_on(params, shard(rank, world_size)).item())
    return results


def closure_raises(rank, world_size):
    """The last rank's closure raises at the unperturbed or perturbed evaluation."""
    results = {}
    for which in ("unperturbed", "perturbed"):
        params = model()
        opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, process_group=dist.group.WORLD)
        for _ in range(2):
            opt.step(lambda: loss_on(params, shard(rank, world_size)))
        before, state = copies(params), group_state(opt)
        calls = []

        def closure():
            calls.append(1)
            if rank == world_size - 1 and len(calls) == (1 if which == "unperturbed" else 2):
                raise ValueError("boom")
            return loss_on(params, shard(rank, world_size))

        results[which] = dict(
            error=error_of(lambda: opt.step(closure)),
            before=before,
            after=copies(params),
            state_before=state,
            state_after=group_state(opt),
        )
        opt.step(lambda: loss_on(params, shard(rank, world_size)))
        results[which]["next"] = copies(params)
    return results


def non_finite(rank, world_size):
    """The last rank's loss along the first direction is NaN at the third step."""
    results = {}
    for mode in ("skip", "raise"):
        params = model()
        opt = torch_dopamine.Dopamine(params, sigma=1e-3, non_finite_loss=mode, process_group=dist.group.WORLD)
        for _ in range(2):
            opt.step(lambda: loss_on(params, shard(rank, world_size)))
        before = copies(params)
        calls = []

        def closure():
            calls.append(1)
            if rank == world_size - 1 and len(calls) == 2:
                return torch.tensor(float("nan"), dtype=torch.float64)
            return loss_on(params, shard(rank, world_size))

        results[mode] = dict(
            error=error_of(lambda: opt.step(closure)), before=before, after=copies(params), state=group_state(opt)
        )
    return results


def mismatch(rank, world_size):
    """The last rank builds its optimizer with another seed, another shape,
    other initial values or other groups; every rank must refuse."""
    last = rank == world_size - 1
    results = {}
    params = model()
    results["seed"] = error_of(
        lambda: torch_dopamine.Dopamine(params, seed=1 if last else 0, process_group=dist.group.WORLD)
    )
    shaped = model()
    if last:
        shaped[1] = torch.zeros(9, dtype=torch.float64, requires_grad=True)
    results["shape"] = error_of(lambda: torch_dopamine.Dopamine(shaped, process_group=dist.group.WORLD))
    apart = model()
    if last:
        with torch.no_grad():
            apart[3] += 1e-12
    results["values"] = error_of(lambda: torch_dopamine.Dopamine(apart, process_group=dist.group.WORLD))
    results["verify_every"] = error_of(
        lambda: torch_dopamine.Dopamine(model(), process_group=dist.group.WORLD, verify_every=2 if last else 0)
    )
    # One rank refuses its arguments; the others are told, not left waiting.
    results["refused"] = error_of(
        lambda: torch_dopamine.Dopamine(model(), process_group=dist.group.WORLD, capturable=last)
    )
    results["refused_key"] = error_of(
        lambda: torch_dopamine.Dopamine([{"param": model()}] if last else model(), process_group=dist.group.WORLD)
    )
    results["groups"] = error_of(
        lambda: torch_dopamine.Dopamine(
            [{"params": params[:2]}, {"params": params[2:]}] if last else [{"params": params}],
            process_group=dist.group.WORLD,
        )
    )
    return results


def bad_options(rank, world_size):
    """Options that are refused before any collective (no rank waits)."""
    params = model()
    group = dist.group.WORLD
    return {
        "population": error_of(
            lambda: torch_dopamine.Dopamine(params, process_group=group, parallel="population", num_perturbations=3)
        ),
        "parallel": error_of(lambda: torch_dopamine.Dopamine(params, process_group=group, parallel="model")),
        "capturable": error_of(lambda: torch_dopamine.Dopamine(params, process_group=group, capturable=True)),
        "verify_every": error_of(lambda: torch_dopamine.Dopamine(params, process_group=group, verify_every=-1)),
    }


def nothing_to_train(rank, world_size):
    """Every parameter frozen: the last rank's closure raises, and no rank
    may be left in a collective (the next optimizer's steps still pair up)."""
    frozen = [p.requires_grad_(False) for p in model()]
    idle = torch_dopamine.Dopamine(frozen, process_group=dist.group.WORLD)

    def closure():
        if rank == world_size - 1:
            raise ValueError("boom")
        return loss_on(frozen, shard(rank, world_size))

    error = error_of(lambda: idle.step(closure))
    params = model()
    opt = torch_dopamine.Dopamine(params, process_group=dist.group.WORLD)
    opt.step(lambda: loss_on(params, shard(rank, world_size)))
    return dict(error=error, params=copies(params))


def verify(rank, world_size):
    """verify_every=2; the last rank's parameters change outside the
    optimizer after step 2, and step 4 must notice on every rank."""
    params = model()
    opt = torch_dopamine.Dopamine(params, sigma=1e-3, process_group=dist.group.WORLD, verify_every=2)
    errors = []
    for step in range(1, 5):
        if step == 3 and rank == world_size - 1:
            with torch.no_grad():
                params[0][0, 0] += 1e-12
        errors.append(error_of(lambda: opt.step(lambda: loss_on(params, shard(rank, world_size)))))
    return errors


def state_dict(rank, world_size):
    """A distributed optimizer's state continues in one process, and one
    process's state continues distributed."""
    whole = slice(0, ROWS)
    params = model()
    distributed = torch_dopamine.Dopamine(params, sigma=1e-3, process_group=dist.group.WORLD)
    for _ in range(5):
        distributed.step(lambda: loss_on(params, shard(rank, world_size)))
    single_params = copies(params)
    for p in single_params:
        p.requires_grad_()
    single = torch_dopamine.Dopamine(single_params, sigma=1e-3)
    single.load_state_dict(distributed.state_dict())
    for _ in range(3):
        single.step(lambda: loss_on(single_params, whole))
        distributed.step(lambda: loss_on(params, shard(rank, world_size)))
    from_distributed = dict(single=copies(single_params), distributed=copies(params), state=group_state(single))

    params = model()
    single = torch_dopamine.Dopamine(params, sigma=1e-3)
    for _ in range(5):
        single.step(lambda: loss_on(params, whole))
    distributed_params = copies(params)
    for p in distributed_params:
        p.requires_grad_()
    distributed = torch_dopamine.Dopamine(distributed_params, sigma=1e-3, process_group=dist.group.WORLD)
    distributed.load_state_dict(single.state_dict())
    for _ in range(3):
        single.step(lambda: loss_on(params, whole))
        distributed.step(lambda: loss_on(distributed_params, shard(rank, world_size)))
    from_single = dict(single=copies(params), distributed=copies(distributed_params), state=group_state(distributed))
    return dict(from_distributed=from_distributed, from_single=from_single)


def population(rank, world_size):
    """The directions divided among the ranks, every rank's closure on the
    whole batch; each rank also runs one process that evaluates every
    direction itself (the reference). Then the last rank's first evaluation
    raises, and later its first loss is NaN."""
    results = {}
    batch = slice(0, ROWS)
    for antithetic in (False, True):
        for per_rank in (1, 2):
            options = dict(lr=0.05, sigma=1e-3, antithetic=antithetic, num_perturbations=per_rank * world_size)
            params, reference = model(), model()
            calls = []

            def closure():
                calls.append(1)
                return loss_on(params, batch)

            opt = torch_dopamine.Dopamine(params, **options, process_group=dist.group.WORLD, parallel="population")
            losses = [opt.step(closure) for _ in range(6)]
            alone = torch_dopamine.Dopamine(reference, **options)
            reference_losses = [alone.step(lambda: loss_on(reference, batch)) for _ in range(6)]
            results[(antithetic, per_rank)] = dict(
                params=copies(params), reference=copies(reference), losses=torch.stack(losses),
                reference_losses=torch.stack(reference_losses), calls=len(calls), state=group_state(opt),
            )
    params = model()
    # The last rank's first direction is in the middle of the step's.
    opt = torch_dopamine.Dopamine(
        params, sigma=1e-3, num_perturbations=2 * world_size, process_group=dist.group.WORLD, parallel="population"
    )
    opt.step(lambda: loss_on(params, batch))
    before, state = copies(params), group_state(opt)
    last = rank == world_size - 1

    def raising():
        if last:
            raise ValueError("boom")
        return loss_on(params, batch)

    results["raises"] = dict(error=error_of(lambda: opt.step(raising)), before=before, after=copies(params),
                             state_before=state, state_after=group_state(opt))

    def nan_on_the_last_rank():
        return torch.tensor(float("nan"), dtype=torch.float64) if last else loss_on(params, batch)

    before = copies(params)
    results["nan"] = dict(error=error_of(lambda: opt.step(nan_on_the_last_rank)), before=before,
                          after=copies(params), state=group_state(opt))
    return results


def sharded(rank, world_size):
    """Parameters as DTensors (Shard(0), Shard(1), Replicate() on a 1-D mesh)
    draw the noise of the unsharded model: each rank's closure computes the
    whole model's loss from the full tensors; the test compares with one
    process training plain tensors. Then the same over the process group in
    data parallel, each rank on its shard of the batch."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(5)
    # 6 rows over 4 ranks leave one rank an empty shard; 7 columns split 4/3
    # or 2/2/2/1; no shard starts at a multiple of 128 elements.
    shapes = [(6, 5), (6,), (7, 6), (7,), (1, 7)]
    placements = [Shard(0), Shard(0), Shard(1), Replicate(), Shard(1)]
    initial = [0.5 * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    x = torch.randn(ROWS, 5, generator=generator, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))

    def loss_of(tensors, rows=slice(0, ROWS)):
        w1, b1, w2, b2, w3 = tensors
        return ((torch.tanh(torch.tanh(x[rows] @ w1.T + b1) @ w2.T + b2) @ w3.T - y[rows]) ** 2).mean()

    results = {}
    for name, options in (("plain", {}), ("antithetic, k=2", dict(antithetic=True, num_perturbations=2))):
        params = [distribute_tensor(t.clone(), mesh, [p]).requires_grad_() for t, p in zip(initial, placements)]
        opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, noise="gaussian", **options)
        for _ in range(8):
            opt.step(lambda: loss_of([p.full_tensor() for p in params]))
        results[name] = dict(full=[p.full_tensor().detach().clone() for p in params], state=group_state(opt))
    params = [distribute_tensor(t.clone(), mesh, [p]).requires_grad_() for t, p in zip(initial, placements)]
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, process_group=dist.group.WORLD, verify_every=1)
    size = ROWS // world_size
    for _ in range(8):
        opt.step(lambda: loss_of([p.full_tensor() for p in params], slice(rank * size, (rank + 1) * size)))
    results["data parallel"] = dict(full=[p.full_tensor().detach().clone() for p in params], state=group_state(opt))
    results["initial"], results["x"], results["y"] = initial, x, y
    # A group of which some ranks hold nothing (2 rows over 4 ranks), alone
    # and beside another group: every rank still takes its steps.
    for name, with_other in (("empty shards", True), ("nothing here", False)):
        small = distribute_tensor(initial[1][:2].clone(), mesh, [Shard(0)]).requires_grad_()
        other = distribute_tensor(initial[3].clone(), mesh, [Replicate()]).requires_grad_()
        groups = [{"params": [small]}] + ([{"params": [other], "seed": 4}] if with_other else [])
        opt = torch_dopamine.Dopamine(groups, lr=0.05, sigma=1e-3)
        for _ in range(3):
            opt.step(lambda: (small.full_tensor() ** 2).sum() + (other.full_tensor() ** 2).sum())
        results[name] = dict(full=[small.full_tensor().detach().clone(), other.full_tensor().detach().clone()],
                             states=[opt.group_state(g) for g in range(len(groups))])
    sharded_weight = distribute_tensor(initial[0].clone(), mesh, [Shard(0)]).requires_grad_()
    from torch.distributed.tensor import DTensor

    uneven = DTensor.from_local(torch.zeros(1 + 2 * rank, 3, dtype=torch.float64), mesh, [Shard(0)],
                                shape=torch.Size([sum(1 + 2 * r for r in range(world_size)), 3]),
                                stride=(3, 1)).requires_grad_()
    results["refused"] = {
        "uneven": error_of(lambda: torch_dopamine.Dopamine([uneven]).step(lambda: torch.tensor(0.0))),
        "population": error_of(
            lambda: torch_dopamine.Dopamine([sharded_weight], process_group=dist.group.WORLD, parallel="population",
                                            num_perturbations=world_size)
        ),
        "master_weights": error_of(lambda: torch_dopamine.Dopamine([sharded_weight], master_weights=True)),
        "record_trajectory": error_of(lambda: torch_dopamine.Dopamine([sharded_weight], record_trajectory=True)),
        "lowrank": error_of(
            lambda: torch_dopamine.Dopamine([sharded_weight], perturbation="lowrank").step(lambda: torch.tensor(0.0))
        ),
        "Shard(2)": error_of(
            lambda: torch_dopamine.Dopamine([distribute_tensor(torch.zeros(2, 2, 8), mesh, [Shard(2)]).requires_grad_()])
        ),
    }
    return results


SCENARIOS = [
    data_parallel, closure_raises, non_finite, mismatch, bad_options, nothing_to_train, verify, state_dict, population,
    sharded,
]


def main():
    rank, world_size, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    for scenario in SCENARIOS:
        try:
            results[scenario.__name__] = scenario(rank, world_size)
        except Exception:  # noqa: BLE001: reported by the test that reads it
            results[scenario.__name__] = {"worker error": traceback.format_exc()}
        # A failed scenario must not leave a rank behind in a collective.
        dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
