"""perturbation="lowrank": its noise against the oracle (noise_oracle.perturbation),
its moves and finish against the float64 reference, restore on failure, C++
and Python bit parity, state_dict resume, replay, and its refusals."""

import numpy as np
import pytest
import torch

import noise_oracle
import torch_dopamine
from parity import ParityModel, train_both
from reference import (
    LR_ADAPTATIONS,
    ReferenceDopamine,
    isclose,
    move,
    ops_noise,
    pack_options,
    quadratic,
    same_bits,
    snapshot,
    state_at,
)

SHAPES = [(7, 5), (3, 130), (300, 2, 3), (1, 9), (40,)]


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("direction", [0, 2])
def test_lowrank_noise_is_the_oracles(noise, rank, direction):
    """Every shape, tiles across rows and rows across tiles; a
    one-dimensional parameter is perturbed in full."""
    for index, shape in enumerate(SHAPES):
        if len(shape) > 1 and rank > min(shape[0], int(np.prod(shape[1:]))):
            continue
        drawn = ops_noise(torch.zeros(shape), 9, 4, index, noise, direction, rank).double().flatten().numpy()
        expected, tolerance = noise_oracle.perturbation(noise, 9, 4, index, shape, direction, rank)
        assert (np.abs(drawn - expected) <= tolerance).all(), shape
        if len(shape) == 1:
            assert np.array_equal(drawn, ops_noise(torch.zeros(shape), 9, 4, index, noise, direction).double().numpy())


def test_lowrank_noise_has_rank_r_and_unit_variance():
    z = ops_noise(torch.zeros(200, 300), 1, 1, 0, "gaussian", 0, 4).double()
    singular = torch.linalg.svdvals(z)
    assert (singular[4:] < 1e-4 * singular[0]).all() and (singular[:4] > 1e-2 * singular[0]).all()
    assert abs(z.var().item() - 1) < 0.15
    rademacher = ops_noise(torch.zeros(64, 64), 1, 1, 0, "rademacher", 0, 1)
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_a_lowrank_move_between_directions_is_one_pass(noise):
    """x' = x + sigma z_1 - sigma z_0 in float32, rounded once, as for full noise."""
    x = torch.randn(30, 20, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    z0, z1 = (ops_noise(x, 6, 2, 1, noise, d, 2) for d in (0, 1))
    sigma = torch.tensor(0.05, dtype=torch.float32).item()
    moved = x.clone()
    move([moved], state_at(2), indices=[1], seed=6, sigma=0.05, noise=noise, carried=(1, 0), to=(1, 1), rank=2)
    assert torch.equal(moved, (x.float() + z1 * sigma - z0 * sigma).to(torch.bfloat16))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
@pytest.mark.parametrize("antithetic", [False, True])
def test_lowrank_update_matches_reference(noise, mode, antithetic):
    """Three directions over a matrix, a 3-D tensor and a vector (perturbed
    in full), with weight decay: 15 steps as the float64 reference takes them."""
    params, loss = quadratic([(6, 4), (3, 2, 5), 7], "cpu")
    options = dict(
        torch_dopamine.Dopamine([torch.zeros(1, requires_grad=True)]).defaults, lr=0.05 * (0.05 if mode == "loss_spread" else 1.0), sigma=0.05, lr_adaptation=mode, weight_decay=0.1,
        seed=7, noise=noise, antithetic=antithetic, num_perturbations=3, perturbation="lowrank", rank=2,
    )
    reference = ReferenceDopamine([(params, options)])
    opt = torch_dopamine.Dopamine(params, **options)
    for _ in range(15):
        expected = reference.step(loss)
        assert opt.step(lambda: loss(params)).item() == pytest.approx(expected, rel=1e-12)
    assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)
    assert not same_bits(params, quadratic([(6, 4), (3, 2, 5), 7], "cpu")[0])


def test_lowrank_differs_from_full_and_restores_on_failure():
    """A closure failing at the third evaluation: every parameter is restored
    (a bfloat16 matrix with a master weight exactly) and the state unchanged."""
    params, loss = quadratic([(6, 4), (5, 5)], "cpu")
    half = torch.randn(4, 6).to(torch.bfloat16).requires_grad_()
    everything = params + [half]

    def full_loss(ps):
        return loss(ps[:2]) + ps[2].double().square().sum()

    full = [p.detach().clone().requires_grad_() for p in everything]
    options = dict(lr=0.05, master_weights=True)
    opt = torch_dopamine.Dopamine(everything, perturbation="lowrank", rank=2, **options)
    full_opt = torch_dopamine.Dopamine(full, **options)
    for _ in range(3):
        opt.step(lambda: full_loss(everything))
        full_opt.step(lambda: full_loss(full))
    assert not same_bits(everything, full)
    before, state = snapshot(everything), opt.group_state(0)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("closure failed")
        return full_loss(everything)

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert same_bits([half], before[2:]) and opt.group_state(0) == state


@pytest.mark.parametrize("antithetic", [False, True])
def test_cpp_and_python_take_lowrank_steps_alike(build_dir, tmp_path, antithetic):
    """The same bits in both front ends, one group low-rank, the other full."""
    groups = [
        (2, dict(lr=0.05, sigma=0.02, seed=5, num_perturbations=3, perturbation="lowrank", rank=3, noise="gaussian")),
        (2, dict(lr=0.02, sigma=0.05, seed=-9, weight_decay=0.05, num_perturbations=3)),
    ]
    (cpp_params, cpp_states), (python_params, python_states) = train_both(build_dir, tmp_path, groups, 20, antithetic)
    assert not same_bits(cpp_params, list(ParityModel().parameters()))
    assert same_bits(cpp_params, python_params)
    assert cpp_states == python_states and cpp_states[0][0] == 20


def test_lowrank_resumes_bit_for_bit_and_older_states_load_as_full(tmp_path):
    params, loss = quadratic([(5, 4), (4, 6)], "cpu", dtype=torch.float32)
    opt = torch_dopamine.Dopamine(params, lr=0.05, perturbation="lowrank", rank=2, noise="gaussian")
    for _ in range(4):
        opt.step(lambda: loss(params))
    torch.save({"params": snapshot(params), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pt")
    for _ in range(5):
        opt.step(lambda: loss(params))
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed = [p.detach().clone().requires_grad_() for p in checkpoint["params"]]
    resumed_opt = torch_dopamine.Dopamine(resumed, lr=0.05)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.param_groups[0]["perturbation"] == "lowrank" and resumed_opt.param_groups[0]["rank"] == 2
    for _ in range(5):
        resumed_opt.step(lambda: loss(resumed))
    assert same_bits(params, resumed)
    # A state saved before the option existed has none: it loads as "full".
    older = checkpoint["optimizer"]
    for group in older["param_groups"]:
        del group["perturbation"], group["rank"]
    full_opt = torch_dopamine.Dopamine([p.detach().clone().requires_grad_() for p in checkpoint["params"]], lr=0.05)
    full_opt.load_state_dict(older)
    assert full_opt.param_groups[0]["perturbation"] == "full"


def test_a_lowrank_run_replays_bit_for_bit():
    params, loss = quadratic([(6, 4), 3], "cpu", dtype=torch.float32)
    initial = snapshot(params)
    opt = torch_dopamine.Dopamine(params, lr=0.05, perturbation="lowrank", rank=2, num_perturbations=3,
                                  record_trajectory=True)
    for _ in range(10):
        opt.step(lambda: loss(params))
    replayed = [p.clone() for p in initial]
    torch_dopamine.replay(replayed, opt.trajectory())
    assert same_bits(replayed, params) and not same_bits(replayed, initial)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(perturbation="low"), "invalid perturbation: 'low' .expected one of full, lowrank"),
        (dict(perturbation="lowrank", rank=0), "invalid rank: 0 .expected an int >= 1"),
        (dict(perturbation="lowrank", rank=1.5), "invalid rank: 1.5 .expected an int >= 1"),
        (dict(perturbation="lowrank", rank=True), "invalid rank: True"),
        (dict(perturbation="lowrank", rank=70000), "invalid rank: 70000 .expected an int in .1, 65536"),
        (dict(perturbation="lowrank", capturable=True), "invalid perturbation: lowrank with capturable=True"),
    ],
)
def test_bad_lowrank_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        torch_dopamine.Dopamine([torch.zeros(3, 4, requires_grad=True)], **options)


def test_a_rank_above_a_weights_smaller_side_is_refused_before_anything_moves():
    params = [torch.ones(5, 4, requires_grad=True), torch.ones(2, 8, requires_grad=True)]
    opt = torch_dopamine.Dopamine(params, perturbation="lowrank", rank=3)
    with pytest.raises(ValueError, match=r"invalid rank: 3 is above the smaller side of params\[1\] of shape \[2, 8\]"):
        opt.step(lambda: sum(p.sum() for p in params))
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert opt.group_state(0) is None


def test_lowrank_is_refused_over_shards_and_off_the_cpu():
    with pytest.raises(ValueError, match="perturbation='lowrank' over shards of a parameter is not supported"):
        move([torch.zeros(4, 5)], state_at(1), indices=[0], rank=1, element_offsets=[20])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="perturbation='lowrank' runs on the CPU only"):
            move([torch.zeros(4, 5, device="cuda")], state_at(1), indices=[0], rank=1)
    plan = torch.ops.dopamine.plan_step(
        state_at(1), torch.tensor([1.0, 2.0], dtype=torch.float64),
        options=pack_options(dict(perturbation="lowrank", rank=4, num_perturbations=1)),
    )
    with pytest.raises(ValueError, match="invalid rank: 4 is above the smaller side"):
        torch.ops.dopamine.finish_step_([torch.zeros(3, 9)], [], [state_at(1)], [plan], indices=[0], group_sizes=[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_cpu_and_cuda_draw_the_same_lowrank_perturbations(noise):
    """The factors drawn on the device and read through the launch's low-rank
    table give the CPU's bits: a move between directions, and a finish of
    three directions (the same plan on both)."""
    shapes = [(300, 7), (5, 2, 130), (9,)]
    options = pack_options(dict(lr_adaptation="none", lr=0.01, sigma=0.05, seed=4, noise=noise, num_perturbations=3,
                                perturbation="lowrank", rank=2))
    plan = torch.ops.dopamine.plan_step(state_at(3), torch.tensor([1.0, 1.5, 0.75, 1.25], dtype=torch.float64),
                                        options=options)
    results = {}
    for device in ("cpu", "cuda"):
        x = [torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(device) for i, shape in enumerate(shapes)]
        # The state on the host, as without capturable (which lowrank refuses).
        torch.ops.dopamine.move_(x, [], [state_at(3)], options=options, indices=[0, 1, 2], group_sizes=[3],
                                 carried=[1, 0], to=[1, 2])
        moved = [t.cpu().clone() for t in x]
        torch.ops.dopamine.finish_step_(x, [], [state_at(3)], [plan.clone()], indices=[0, 1, 2], group_sizes=[3])
        results[device] = moved + [t.cpu() for t in x]
    assert same_bits(results["cpu"], results["cuda"])
