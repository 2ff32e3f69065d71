"""Trajectory and replay (docs/DESIGN.md, "Trajectory and replay"): a
recorded run rebuilt from its initial parameters, bit for bit, without a
forward pass."""

import copy
import json
import pickle
import subprocess

import pytest
import torch

import torch_dopamine
from parity import ParityModel, group_argument
from reference import LR_ADAPTATIONS, same_bits


def network(dtype=torch.float32, seed=0):
    """A 5-8-1 tanh network's parameters, a frozen one in the middle (it
    still counts in the indices that key the noise), and its loss."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (8,), (1, 8), (1,)]
    params = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]
    params[1].requires_grad_(False)
    x = torch.randn(32, 5, generator=generator)
    y = torch.sin(x.sum(1, keepdim=True))

    def loss():
        w1, b1, w2, b2 = (p.float() for p in params)
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return params, loss


def copies(params):
    return [p.detach().clone() for p in params]


def run_and_replay(params, loss, steps, **options):
    """Trains, then replays the trajectory on a copy of the initial
    parameters; returns both, and the trajectory. Every step must finish:
    a failed one would be recorded and replayed all the same."""
    initial = copies(params)
    opt = torch_dopamine.Dopamine(params, record_trajectory=True, **options)
    for _ in range(steps):
        opt.step(loss)
    trajectory = opt.trajectory()
    assert all(record["plans"] is not None for record in trajectory["steps"])
    torch_dopamine.replay(initial, trajectory)
    return initial, trajectory


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("lr_adaptation", LR_ADAPTATIONS)
def test_replay_rebuilds_the_parameters_bit_for_bit(lr_adaptation, noise, antithetic):
    params, loss = network()
    replayed, trajectory = run_and_replay(
        params, loss, 30, lr=0.05 * (1e-2 if lr_adaptation == "loss_spread" else 1.0), sigma=1e-2, lr_adaptation=lr_adaptation, noise=noise,
        antithetic=antithetic, weight_decay=0.01, seed=11,
    )
    assert len(trajectory["steps"]) == 30
    assert same_bits(replayed, params)
    assert not same_bits(replayed, network()[0])  # the run moved them


@pytest.mark.parametrize("antithetic", [False, True])
def test_replay_of_several_directions_is_bit_for_bit(antithetic):
    params, loss = network()
    replayed, trajectory = run_and_replay(
        params, loss, 15, lr=0.05, sigma=1e-2, num_perturbations=3, antithetic=antithetic, weight_decay=0.01
    )
    assert same_bits(replayed, params)
    assert not same_bits(replayed, network()[0])
    assert {direction for step in trajectory["steps"] for _, direction, _ in step["moves"]} == {0, 1, 2}


def test_replay_of_groups_with_their_own_options():
    params, loss = network(torch.float64)
    groups = [{"params": params[:2], "seed": 3, "sigma": 1e-3}, {"params": params[2:], "lr": 0.01, "noise": "rademacher"}]
    initial = copies(params)
    opt = torch_dopamine.Dopamine(groups, record_trajectory=True, lr=0.05)
    for _ in range(20):
        opt.step(loss)
    torch_dopamine.replay(initial, opt.trajectory())
    assert same_bits(initial, params)
    assert len(opt.trajectory()["layouts"]) == 1  # stored once, not per step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_replay_with_master_weights(dtype):
    params, loss = network(dtype)
    replayed, _ = run_and_replay(params, loss, 25, lr=0.05, sigma=1e-2, master_weights=True)
    assert same_bits(replayed, params)
    assert not same_bits(replayed, network(dtype)[0])  # the run moved them


def test_replay_repeats_the_round_trips_of_failed_and_skipped_steps():
    """A step abandoned at its perturbed evaluation leaves each parameter at
    (theta + sigma z) - sigma z, rounded, and so does a skipped step; the
    next step's perturbation mostly rounds back, so each is checked as the
    last step replayed."""
    params, loss = network()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) in (4, 10):  # the perturbed evaluations of steps 2 and 5
            raise RuntimeError("the data loader failed")
        if len(calls) == 14:  # step 7's perturbed loss
            return torch.tensor(float("nan"))
        return loss()

    initial = copies(params)
    # One direction: the call numbers above count two evaluations a step.
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=0.3, num_perturbations=1, record_trajectory=True)
    opt.step(closure)
    before_failure = copies(params)
    for step in range(2, 9):
        try:
            opt.step(closure)
        except RuntimeError:
            assert step in (2, 5)
        if step in (2, 7):  # after the failed step and after the skipped one
            # Not an exact round trip, so replay has something to repeat.
            assert step != 2 or not same_bits(params, before_failure)
            replayed = copies(initial)
            torch_dopamine.replay(replayed, opt.trajectory())
            assert same_bits(replayed, params), f"after step {step}"
    trajectory = opt.trajectory()
    assert [record["plans"] is None for record in trajectory["steps"]].count(True) == 2
    assert opt.group_state(0)["skipped_steps"] == 1
    torch_dopamine.replay(initial, trajectory)
    assert same_bits(initial, params)


def test_a_trajectory_survives_pickle_and_json():
    params, loss = network()
    replayed, trajectory = run_and_replay(params, loss, 10, antithetic=True)
    for text in (pickle.loads(pickle.dumps(trajectory)), json.loads(json.dumps(trajectory))):
        again = copies(network()[0])
        torch_dopamine.replay(again, text)
        assert same_bits(again, params)


def test_trajectory_and_replay_refuse_what_they_cannot_use():
    params, loss = network()
    with pytest.raises(RuntimeError, match="record_trajectory=True"):
        torch_dopamine.Dopamine(params).trajectory()
    with pytest.raises(ValueError, match="invalid record_trajectory: 1"):
        torch_dopamine.Dopamine(params, record_trajectory=1)
    with pytest.raises(ValueError, match="not a trajectory"):
        torch_dopamine.replay(params, {"steps": []})
    opt = torch_dopamine.Dopamine(params, record_trajectory=True)
    opt.step(loss)
    before = copies(params)
    with pytest.raises(ValueError, match="the trajectory moves parameter 3, but 2 parameters were given"):
        torch_dopamine.replay(params[:2], opt.trajectory())
    with pytest.raises(ValueError, match="not a trajectory of format 4 .*; got format 3"):
        torch_dopamine.replay(params, {**opt.trajectory(), "format": 3})
    # A move that stopped part-way (per-group moves of earlier versions).
    partial = copy.deepcopy(opt.trajectory())
    partial["steps"][0]["moves"][0] = (1, 0, 0)
    with pytest.raises(ValueError, match="step 0 of the trajectory moved 0 of its 1 groups"):
        torch_dopamine.replay(params, partial)
    assert same_bits(params, before)


@pytest.mark.parametrize("antithetic", [False, True])
def test_a_trajectory_recorded_by_one_front_end_replays_in_the_other(build_dir, tmp_path, antithetic):
    """The C++ optimizer (tests/cpp/parity_train.cpp) and this one record the
    same trajectory for the same run; each front end's replay of the other's
    rebuilds the other's parameters bit for bit."""
    trainer = build_dir / "tests" / "cpp" / "dopamine_parity_train"
    assert trainer.exists(), f"{trainer} not built; run `make build` (or set DOPAMINE_BUILD_DIR)"
    module_path, trained_path = tmp_path / "parity.pt", tmp_path / "trained.pt"
    torch.jit.save(torch.jit.script(ParityModel()), module_path)
    groups = [(2, dict(lr=0.05, seed=3)), (2, dict(lr=0.02, sigma=0.02, noise="rademacher", seed=9))]
    cpp_path = tmp_path / "cpp_trajectory.pt"
    subprocess.run(
        [str(trainer), str(module_path), "8", str(trained_path)] + (["--antithetic"] if antithetic else [])
        + ["--record", str(cpp_path)] + [group_argument(size, options) for size, options in groups],
        check=True, capture_output=True, text=True,
    )
    cpp_params = [p.detach() for p in torch.jit.load(trained_path).parameters()]
    cpp_trajectory = torch_dopamine.load_trajectory(cpp_path)

    module = torch.jit.load(module_path)
    params = list(module.parameters())
    opt = torch_dopamine.Dopamine(
        [dict(options, params=params[:2]) if g == 0 else dict(options, params=params[2:])
         for g, (_, options) in enumerate(groups)],
        antithetic=antithetic, record_trajectory=True,
    )
    for _ in range(8):
        opt.step(lambda: module())
    assert same_bits(params, cpp_params)
    assert cpp_trajectory == opt.trajectory()

    # C++ to Python.
    replayed = [p.detach().clone() for p in torch.jit.load(module_path).parameters()]
    torch_dopamine.replay(replayed, cpp_trajectory)
    assert same_bits(replayed, cpp_params)
    # Python to C++.
    python_path, replayed_path = tmp_path / "python_trajectory.pt", tmp_path / "replayed.pt"
    torch.save(opt.trajectory(), python_path)
    subprocess.run([str(trainer), "--replay", str(module_path), str(python_path), str(replayed_path)],
                   check=True, capture_output=True, text=True)
    assert torch_dopamine.load_trajectory(python_path) == opt.trajectory()
    assert same_bits([p.detach() for p in torch.jit.load(replayed_path).parameters()], params)
