"""The optimizer against the float64 reference of docs/DESIGN.md, "The algorithm", on every device."""

import os
import subprocess
import sys

import pytest
import torch

import torch_dopamine
from reference import NOISE_CODES, XOR_INPUTS, XOR_TARGETS, ReferenceDopamine, isclose, quadratic, same_bits, snapshot, xor_net

DEFAULTS = dict(
    lr=0.1,
    sigma=0.01,
    lr_adaptation="rpe_normalized",
    beta=0.9,
    beta_s=0.9998,
    beta_eta=2e-4,
    eps=1e-8,
    lr_min=None,
    lr_max=None,
    weight_decay=0.0,
    seed=0,
    noise="gaussian",
    non_finite_loss="skip",
    capturable=False,
    master_weights=False,
)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("mode", ["none", "rpe_normalized", "rpe_tracking"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_matches_reference(device, mode, weight_decay, noise):
    params, loss = quadratic([5, 7, 3], device)
    options = dict(DEFAULTS, lr=0.05, sigma=0.05, lr_adaptation=mode, weight_decay=weight_decay, seed=7, noise=noise)
    reference = ReferenceDopamine([(params, options)])
    opt = torch_dopamine.Dopamine(params, **options)
    for _ in range(20):
        expected = reference.step(loss)
        got = opt.step(lambda: loss(params))
        assert got.item() == pytest.approx(expected, rel=1e-12)
    assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)
    state = opt.group_state(0)
    assert state["step"] == 20 and state["skipped_steps"] == 0
    assert state["current_lr"] == pytest.approx(reference.groups[0]["eta"], rel=1e-12)


def test_lr_clamps_apply_in_every_mode(device):
    params, loss = quadratic([4], device)
    for options in (dict(lr=1.0, lr_max=0.01, lr_adaptation="none"), dict(lr=1e-6, lr_min=0.02)):
        opt = torch_dopamine.Dopamine(params, **options)
        opt.step(lambda: loss(params))
        expected = options.get("lr_max", options.get("lr_min"))
        assert opt.group_state(0)["current_lr"] == expected


def test_param_groups_use_their_own_options(device):
    params, loss = quadratic([6, 4, 5], device)
    group_options = [
        dict(DEFAULTS, lr=0.02, sigma=0.1, seed=3, lr_adaptation="none"),
        dict(DEFAULTS, lr=0.05, sigma=0.02, seed=11, lr_adaptation="rpe_tracking", weight_decay=0.01),
    ]
    reference = ReferenceDopamine([(params[:2], group_options[0]), (params[2:], group_options[1])])
    opt = torch_dopamine.Dopamine(
        [dict(group_options[0], params=params[:2]), dict(group_options[1], params=params[2:])]
    )
    for _ in range(10):
        reference.step(loss)
        opt.step(lambda: loss(params))
    assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)


def test_add_param_group_inherits_defaults_and_counts_indices(device):
    params, loss = quadratic([3, 2], device)
    opt = torch_dopamine.Dopamine([params[0]], lr=0.03, sigma=0.05)
    opt.add_param_group({"params": [params[1]], "seed": 5})
    assert opt.param_groups[1]["lr"] == 0.03 and opt.param_groups[1]["seed"] == 5
    reference = ReferenceDopamine(
        [([params[0]], dict(DEFAULTS, lr=0.03, sigma=0.05)), ([params[1]], dict(DEFAULTS, lr=0.03, sigma=0.05, seed=5))]
    )
    for _ in range(5):
        reference.step(loss)
        opt.step(lambda: loss(params))
    assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)


def test_closure_may_return_a_python_float_and_runs_without_grad(device):
    params, loss = quadratic([3], device)
    grad_modes = []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        return float(loss(params))

    twin = snapshot(params)
    twin_opt = torch_dopamine.Dopamine(twin)
    result = torch_dopamine.Dopamine(params).step(closure)
    expected = twin_opt.step(lambda: loss(twin))
    assert isinstance(result, float) and result == expected.item()
    assert grad_modes == [False, False]
    assert same_bits(params, twin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_xor_trains_in_every_dtype(dtype):
    solved = 0
    for seed in range(10):
        model = xor_net(seed).to(dtype)
        opt = torch_dopamine.Dopamine(model.parameters())
        for _ in range(2000):
            loss = opt.step(lambda: xor_loss_in(model, dtype))
            if loss.item() < 0.01:
                solved += 1
                break
    assert solved >= (9 if dtype in (torch.float32, torch.float64) else 7)


def xor_loss_in(model, dtype):
    """MSE in float32 of a model whose parameters are `dtype`."""
    return torch.nn.functional.mse_loss(model(XOR_INPUTS.to(dtype)).float(), XOR_TARGETS)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_every_cpu_path_draws_the_same_bits(noise):
    """The kernels' baseline, AVX2 and AVX-512 paths (capped with
    DOPAMINE_CPU_CAPABILITY in a fresh process) give identical parameters."""
    code = (
        "import hashlib, torch, torch_dopamine\n"
        "ps = [torch.zeros(100003), torch.zeros(77, dtype=torch.float64), torch.zeros(300, dtype=torch.bfloat16)]\n"
        "state = torch.zeros(5, dtype=torch.float64)\n"
        f"torch.ops.dopamine.perturb_(ps, [], state, indices=[1, 2, 3], seed=3, sigma=0.5, noise={NOISE_CODES[noise]}, direction=1)\n"
        f"torch.ops.dopamine.perturb_(ps, [], state, indices=[4, 5, 6], seed=3, sigma=0.25, noise={NOISE_CODES[noise]}, direction=-1)\n"
        "print(hashlib.sha256(b''.join(bytes(p.view(torch.uint8).tolist()) for p in ps)).hexdigest())\n"
    )
    digests = set()
    for cap in ("baseline", "avx2", "avx512"):
        env = dict(os.environ, DOPAMINE_CPU_CAPABILITY=cap)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(result.stdout.strip())
    assert len(digests) == 1


def test_same_seed_same_trajectory_and_threads_do_not_matter():
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            params = [torch.zeros(700_000, requires_grad=True), torch.zeros(3, 5, requires_grad=True)]
            opt = torch_dopamine.Dopamine(params, seed=42)
            for _ in range(3):
                # A loss over few elements, summed in one thread: only the ops
                # see the large tensor.
                opt.step(lambda: (params[0][:1000] - 1).square().sum() + params[1].sum())
            results.append(snapshot(params))
        finally:
            torch.set_num_threads(previous)
    assert same_bits(*results)
