"""Dopamine over torch.distributed (docs/DESIGN.md, "Many processes"): gloo on
loopback, 2 and 4 ranks started here, each running every scenario of
distributed_worker.py once; the tests read what each rank saw."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torch_dopamine
from distributed_worker import ROWS, loss_on, model

WORKER = Path(__file__).with_name("distributed_worker.py")
# Every rank gives up on a collective after 60 s; the whole run after this.
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """What each rank saw, as a list indexed by rank."""
    world_size = request.param
    directory = tmp_path_factory.mktemp(f"ranks{world_size}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world_size), str(directory / "store"), str(directory)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"the {world_size} ranks did not finish within {TIMEOUT_S} s")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output}"
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def scenario(ranks, name):
    for rank, results in enumerate(ranks):
        result = results[name]
        assert not (isinstance(result, dict) and "worker error" in result), f"rank {rank}: {result}"
    return [results[name] for results in ranks]


def same_bits(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def restored(after, before):
    """Equal within the rounding of a perturbation's round trip."""
    return all(torch.allclose(x, y, rtol=0, atol=1e-15) for x, y in zip(after, before))


@pytest.mark.parametrize("antithetic", [False, True])
def test_data_parallel_ranks_agree_and_match_one_process_on_the_batch(ranks, antithetic):
    seen = [result[antithetic] for result in scenario(ranks, "data_parallel")]
    for rank in seen[1:]:
        assert same_bits(rank["params"], seen[0]["params"])
        assert rank["state"] == seen[0]["state"]
        assert torch.equal(rank["losses"], seen[0]["losses"])
    params = model()
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, antithetic=antithetic)
    losses = torch.stack([opt.step(lambda: loss_on(params, slice(0, ROWS))) for _ in range(15)])
    # Equal within the rounding of the loss's reduction: a mean of shard
    # means is not rounded as the mean of the batch.
    for ours, theirs in zip(seen[0]["params"], params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(seen[0]["losses"], losses, rtol=1e-12, atol=0)
    assert seen[0]["state"]["step"] == 15 and seen[0]["state"]["skipped_steps"] == 0
    assert losses[-1] < losses[0] / 2  # it trained


def test_data_parallel_with_two_directions_matches_one_process_on_the_batch(ranks):
    seen = [result["two directions"] for result in scenario(ranks, "data_parallel")]
    for rank in seen[1:]:
        assert same_bits(rank["params"], seen[0]["params"]) and torch.equal(rank["losses"], seen[0]["losses"])
    params = model()
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, num_perturbations=2)
    losses = torch.stack([opt.step(lambda: loss_on(params, slice(0, ROWS))) for _ in range(15)])
    for ours, theirs in zip(seen[0]["params"], params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(seen[0]["losses"], losses, rtol=1e-12, atol=0)


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("per_rank", [1, 2])
def test_population_ranks_match_one_process_evaluating_every_direction(ranks, antithetic, per_rank):
    seen = [result[(antithetic, per_rank)] for result in scenario(ranks, "population")]
    for rank, result in enumerate(seen):
        # Bit for bit: every rank moves through every perturbation in order.
        assert same_bits(result["params"], result["reference"]), f"rank {rank}"
        assert torch.equal(result["losses"], result["reference_losses"])
        assert same_bits(result["params"], seen[0]["params"])
        # Each rank evaluates its own directions only (rank 0 also L0).
        evaluations = 2 * per_rank if antithetic else per_rank + (rank == 0)
        assert result["calls"] == 6 * evaluations
        assert result["state"]["step"] == 6 and result["state"]["skipped_steps"] == 0
    assert seen[0]["losses"][-1] < seen[0]["losses"][0]


def test_population_a_failing_or_non_finite_direction_stops_every_rank_alike(ranks):
    seen = scenario(ranks, "population")
    last = len(seen) - 1
    for result in seen:
        raised = result["raises"]
        kind, message = raised["error"]
        assert kind == "RuntimeError" and f"the closure failed on rank {last}: ValueError: boom" in message
        assert restored(raised["after"], raised["before"]) and raised["state_after"] == raised["state_before"]
        assert same_bits(raised["after"], seen[0]["raises"]["after"])
        skipped = result["nan"]
        assert skipped["error"] is None and skipped["state"]["skipped_steps"] == 1
        assert restored(skipped["after"], skipped["before"])
        assert same_bits(skipped["after"], seen[0]["nan"]["after"])


def test_sharded_parameters_draw_the_noise_of_the_unsharded_model(ranks):
    seen = scenario(ranks, "sharded")
    initial, x, y = seen[0]["initial"], seen[0]["x"], seen[0]["y"]

    def loss_of(tensors, rows=slice(0, ROWS)):
        w1, b1, w2, b2, w3 = tensors
        return ((torch.tanh(torch.tanh(x[rows] @ w1.T + b1) @ w2.T + b2) @ w3.T - y[rows]) ** 2).mean()

    for name, options in (("plain", {}), ("antithetic, k=2", dict(antithetic=True, num_perturbations=2))):
        params = [t.clone().requires_grad_() for t in initial]
        opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3, noise="gaussian", **options)
        for _ in range(8):
            opt.step(lambda: loss_of(params))
        for rank in seen:
            # Bit for bit: every shard moved by the noise of its places.
            assert same_bits(rank[name]["full"], params), name
            assert rank[name]["state"] == opt.group_state(0)
        assert not same_bits(params, initial)
    # Data parallel over sharded parameters: within the reduction's rounding
    # of one process on the whole batch, and alike on every rank.
    params = [t.clone().requires_grad_() for t in initial]
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=1e-3)
    for _ in range(8):
        opt.step(lambda: loss_of(params))
    for rank in seen:
        assert same_bits(rank["data parallel"]["full"], seen[0]["data parallel"]["full"])
    for ours, theirs in zip(seen[0]["data parallel"]["full"], params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-9, atol=1e-12)
    for name in ("empty shards", "nothing here"):
        small = initial[1][:2].clone().requires_grad_()
        other = initial[3].clone().requires_grad_()
        groups = [{"params": [small]}] + ([{"params": [other], "seed": 4}] if name == "empty shards" else [])
        opt = torch_dopamine.Dopamine(groups, lr=0.05, sigma=1e-3)
        for _ in range(3):
            opt.step(lambda: (small ** 2).sum() + (other ** 2).sum())
        for rank in seen:
            assert same_bits(rank[name]["full"], [small, other]), name
            assert rank[name]["states"] == [opt.group_state(g) for g in range(len(groups))], name
    refused = seen[0]["refused"]
    assert refused["uneven"][0] == "ValueError" and "not torch's chunk" in refused["uneven"][1]
    assert refused["population"][0] == "ValueError" and "'population' with sharded DTensor" in refused["population"][1]
    assert refused["master_weights"] == ("ValueError", "Dopamine: master_weights is not supported with DTensor parameters")
    assert refused["record_trajectory"][1] == "Dopamine: record_trajectory is not supported with DTensor parameters"
    assert refused["lowrank"] == (
        "ValueError", "Dopamine: perturbation='lowrank' over sharded DTensor parameters is not supported (group 0); "
        "use perturbation='full'"
    )
    assert refused["Shard(2)"][0] == "ValueError" and "supports Shard(0), Shard(1) and Replicate() on a 1-D mesh" in refused["Shard(2)"][1]


def test_a_float_loss_comes_back_as_the_mean_float(ranks):
    returned = scenario(ranks, "data_parallel")
    assert all(isinstance(r["float"], float) for r in returned)
    assert len({r["float"] for r in returned}) == 1
    assert returned[0]["float"] == pytest.approx(loss_on(model(), slice(0, ROWS)).item(), rel=1e-12)


@pytest.mark.parametrize("which", ["unperturbed", "perturbed"])
def test_a_closure_failing_on_one_rank_raises_on_every_rank_and_restores(ranks, which):
    seen = [result[which] for result in scenario(ranks, "closure_raises")]
    last = len(seen) - 1
    for rank in seen:
        kind, message = rank["error"]
        assert kind == "RuntimeError"
        assert f"the closure failed on rank {last}: ValueError: boom" in message
        assert "parameters restored on every rank" in message
        assert restored(rank["after"], rank["before"])
        assert rank["state_after"] == rank["state_before"]
    # The failing rank moved through the perturbation the others evaluated
    # before restoring, so every rank rounded alike.
    for rank in seen:
        assert same_bits(rank["after"], seen[0]["after"])
    for rank in seen:
        # The next step is taken alike everywhere.
        assert same_bits(rank["next"], seen[0]["next"])
    assert seen[0]["state_before"]["step"] == 2


def test_a_non_finite_loss_on_one_rank_skips_or_raises_on_every_rank(ranks):
    seen = scenario(ranks, "non_finite")
    for rank in seen:
        assert rank["skip"]["error"] is None
        assert rank["skip"]["state"]["skipped_steps"] == 1 and rank["skip"]["state"]["step"] == 3
        assert restored(rank["skip"]["after"], rank["skip"]["before"])
        assert same_bits(rank["skip"]["after"], seen[0]["skip"]["after"])
        kind, message = rank["raise"]["error"]
        assert kind == "RuntimeError"
        assert "the theta + sigma z_0 loss is nan (the mean over the process group's ranks)" in message
        assert restored(rank["raise"]["after"], rank["raise"]["before"])
        assert same_bits(rank["raise"]["after"], seen[0]["raise"]["after"])
        assert rank["raise"]["state"]["step"] == 2 and rank["raise"]["state"]["skipped_steps"] == 0


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("seed", "group 0 options seed: 1 there, 0 on rank 0"),
        ("shape", "group 0 parameter 1: '[9] torch.float64' there, '[8] torch.float64' on rank 0"),
        ("groups", "parameter groups: 2 there, 1 on rank 0"),
        ("values", "the parameters' digest: "),
        ("verify_every", "verify_every: 2 there, 0 on rank 0"),
    ],
)
def test_ranks_built_differently_are_refused_on_every_rank(ranks, kind, expected):
    last = len(ranks) - 1
    for rank in scenario(ranks, "mismatch"):
        error, message = rank[kind]
        assert error == "ValueError"
        assert f"rank {last} of the process group was built differently from rank 0 ({expected}" in message


def test_one_rank_refusing_its_arguments_is_named_on_every_rank(ranks):
    last = len(ranks) - 1
    for rank, seen in enumerate(scenario(ranks, "mismatch")):
        error, message = seen["refused"]
        assert error == "ValueError"
        if rank == last:
            assert message.startswith("Dopamine: capturable=True with a process_group is not supported")
        else:
            assert f"rank {last} refused its arguments (Dopamine: capturable=True with a process_group" in message


def test_a_rank_failing_in_the_constructor_with_any_error_is_named_on_every_rank(ranks):
    last = len(ranks) - 1
    for rank, seen in enumerate(scenario(ranks, "mismatch")):
        error, message = seen["refused_key"]
        if rank == last:
            assert (error, message) == ("KeyError", "'params'")
        else:
            assert error == "ValueError" and f"rank {last} refused its arguments ('params')" in message


def test_with_nothing_to_train_a_failing_closure_makes_no_collective(ranks):
    seen = scenario(ranks, "nothing_to_train")
    for rank, result in enumerate(seen):
        assert result["error"] == (("ValueError", "boom") if rank == len(seen) - 1 else None)
        assert same_bits(result["params"], seen[0]["params"])


def test_bad_distributed_options_raise_value_errors(ranks):
    for rank in scenario(ranks, "bad_options"):
        assert rank["population"][0] == "ValueError" and (
            "invalid num_perturbations: 3 with parallel='population' (expected a multiple of the process "
            f"group's {len(ranks)} ranks" in rank["population"][1]
        )
        assert rank["parallel"][0] == "ValueError" and "invalid parallel: 'model' (expected 'data' or 'population')" in rank["parallel"][1]
        assert rank["capturable"][0] == "ValueError" and "capturable=True with a process_group" in rank["capturable"][1]
        assert rank["verify_every"][0] == "ValueError" and "invalid verify_every: -1" in rank["verify_every"][1]


def test_verify_every_finds_ranks_that_drifted_apart(ranks):
    last = len(ranks) - 1
    for errors in scenario(ranks, "verify"):
        assert errors[:3] == [None, None, None]
        kind, message = errors[3]
        assert kind == "RuntimeError"
        assert f"after step 4 the parameters of rank(s) [{last}] differ from rank 0's" in message


@pytest.mark.parametrize("direction", ["from_distributed", "from_single"])
def test_a_state_dict_moves_between_distributed_and_single_process_runs(ranks, direction):
    for rank in scenario(ranks, "state_dict"):
        run = rank[direction]
        assert run["state"]["step"] == 8
        for a, b in zip(run["single"], run["distributed"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(process_group="world"), "invalid process_group: 'world'"),
        (dict(parallel="model"), "invalid parallel: 'model' (expected 'data' or 'population')"),
        (dict(verify_every=2), "verify_every needs a process_group"),
        (dict(verify_every=True), "invalid verify_every: True"),
    ],
)
def test_distributed_options_without_a_process_group_raise(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_dopamine.Dopamine(model(), **options)


def test_the_digest_changes_with_any_word_and_only_with_the_bits():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1001, generator=generator), torch.randn(7, 3, dtype=torch.float64, generator=generator)]
    digest = torch.ops.dopamine.digest(tensors)
    assert digest == torch.ops.dopamine.digest([t.clone() for t in tensors])
    assert torch.ops.dopamine.digest([]) == 0
    # A non-contiguous tensor digests its logical order.
    assert torch.ops.dopamine.digest([tensors[0], tensors[1].T.contiguous().T]) == digest
    for i in (0, 500, 1000):  # the first, a middle and the tail word
        flipped = tensors[0].clone()
        flipped.view(torch.int32)[i] ^= 1
        assert torch.ops.dopamine.digest([flipped, tensors[1]]) != digest
    assert torch.ops.dopamine.digest(tensors[::-1]) != digest
    # The sizes count: the same bytes split differently differ.
    flat = torch.cat([tensors[0], tensors[1].float().reshape(-1)])
    assert torch.ops.dopamine.digest([flat[:500], flat[500:]]) != torch.ops.dopamine.digest([flat[:501], flat[501:]])
