"""The optimizer against the float64 reference of docs/DESIGN.md, "The algorithm", on every device."""

import inspect
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import torch_dopamine
from reference import (
    LR_ADAPTATIONS,
    XOR_INPUTS,
    XOR_TARGETS,
    UNIT_ROUNDOFF,
    ReferenceDopamine,
    isclose,
    noise_of,
    non_finite_at,
    quadratic,
    same_bits,
    snapshot,
    xor_net,
)

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
    noise="rademacher",
    non_finite_loss="skip",
    capturable=False,
    master_weights=False,
    antithetic=False,
    num_perturbations=2,
    beta_baseline=0.98,
)


def test_the_tests_defaults_are_the_optimizers():
    signature = inspect.signature(torch_dopamine.Dopamine).parameters
    assert {name: signature[name].default for name in DEFAULTS} == DEFAULTS


# Steps 1 (a NaN perturbed loss) and 4 (an infinite unperturbed loss) are
# skipped, by the reference too: a bias correction or a tracking start that
# counted skipped steps would show.
SKIPPED = [(1, 1, math.nan), (4, 0, math.inf)]


def train_beside_reference(device, **overrides):
    """20 steps of the optimizer and of the reference on a quadratic, over
    the SKIPPED steps, with `overrides` of the test's options (lr_adaptation
    among them): every step's returned loss, rate and baseline, and the
    parameters at the end, compared. Returns the optimizer."""
    params, loss = quadratic([5, 7, 3], device)
    # loss_spread's lr is about sigma times the others' (docs/DESIGN.md, "The algorithm").
    scale = 0.05 if overrides["lr_adaptation"] == "loss_spread" else 1.0
    options = dict(DEFAULTS, lr=0.05 * scale, sigma=0.05, seed=7, **overrides)
    reference = ReferenceDopamine([(params, options)])
    opt = torch_dopamine.Dopamine(params, **options)
    directions = options["num_perturbations"]
    per_step = 2 * directions if options["antithetic"] else directions + 1
    reference_loss, optimizer_loss = non_finite_at(loss, SKIPPED, per_step), non_finite_at(loss, SKIPPED, per_step)
    for _ in range(20):
        expected = reference.step(reference_loss)
        got = opt.step(lambda: optimizer_loss(params)).item()
        assert got == pytest.approx(expected, rel=1e-12, nan_ok=True)
        assert opt.group_state(0)["current_lr"] == pytest.approx(reference.groups[0]["eta"], rel=1e-12)
        assert opt.group_state(0)["rpe_baseline"] == pytest.approx(reference.groups[0]["b"], rel=1e-12)
    assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)
    state = opt.group_state(0)
    assert state["step"] == 20 and state["skipped_steps"] == 2 and reference.groups[0]["n"] == 18
    return opt


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("directions", [1, 3])
def test_update_matches_reference(device, mode, weight_decay, noise, antithetic, directions):
    """The paper's RPE (no baseline). With antithetic the skipped evaluations
    are the second and the first, and step() returns the mean of the losses;
    with several directions the update is the mean of each direction's."""
    if mode == "loss_spread" and directions == 1 and not antithetic:
        pytest.skip("loss_spread needs two perturbed losses; test_interop tests the refusal")
    train_beside_reference(
        device,
        lr_adaptation=mode,
        weight_decay=weight_decay,
        noise=noise,
        antithetic=antithetic,
        num_perturbations=directions,
        beta_baseline=None,
    )


@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("directions", [1, 3])
def test_the_baseline_matches_reference(device, mode, antithetic, directions):
    """beta_baseline: the update's RPEs less the bias-corrected mean RPE of
    the earlier updates (skipped steps not counted), in every mode; the trace
    still takes |delta_j|. With antithetic it is unused and b stays 0."""
    if mode == "loss_spread" and directions == 1 and not antithetic:
        pytest.skip("loss_spread needs two perturbed losses; test_interop tests the refusal")
    opt = train_beside_reference(
        device, lr_adaptation=mode, antithetic=antithetic, num_perturbations=directions, beta_baseline=0.7
    )
    assert (opt.group_state(0)["rpe_baseline"] == 0) == antithetic


def test_the_baseline_removes_the_curvature_offset_at_a_minimum(device):
    """At the minimum of a quadratic every one-sided RPE is the curvature
    offset sigma^2/2 z^T H z > 0, and the update without a baseline moves
    along the mean of the directions, away from the minimum; the baseline
    predicts the offset, so after its first step the update follows the
    gradient alone (the loss ends 44 times lower here)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(200, generator=generator, dtype=torch.float64).to(device) + 0.5
    final_loss = {}
    for beta_baseline in (None, 0.9):
        param = torch.zeros(200, dtype=torch.float64, device=device, requires_grad=True)
        opt = torch_dopamine.Dopamine([param], lr=0.01, sigma=0.1, lr_adaptation="none", beta_baseline=beta_baseline)
        for _ in range(40):
            opt.step(lambda: (weights * param.square()).sum())
        final_loss[beta_baseline] = (weights * param.detach().square()).sum().item()
    assert final_loss[0.9] < 0.1 * final_loss[None]


@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
def test_lr_clamps_apply_in_every_mode(device, mode):
    """The clamped rate is the one used and, in rpe_tracking, the one the next
    step tracks from; the last case tracks fast (|delta| ~ 0.1), so the rate
    moves between the clamps."""
    cases = [dict(lr=1.0, lr_max=0.01), dict(lr=1e-6, lr_min=0.02)]
    if mode == "rpe_tracking":
        cases.append(dict(lr=0.5, beta_s=0.5, beta_eta=0.5, lr_min=0.1, lr_max=0.2))
    for case in cases:
        params, loss = quadratic([4], device)
        options = dict(DEFAULTS, lr_adaptation=mode, **case)
        reference = ReferenceDopamine([(params, options)])
        opt = torch_dopamine.Dopamine(params, **options)
        rates = []
        for _ in range(6):
            reference.step(loss)
            opt.step(lambda: loss(params))
            rates.append(opt.group_state(0)["current_lr"])
            assert rates[-1] == pytest.approx(reference.groups[0]["eta"], rel=1e-12)
        assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)
        # The first step's rate is clamped (tracking starts from lr); the fast
        # case reaches both clamps.
        assert rates[0] == case.get("lr_max", case.get("lr_min"))
        assert "lr_min" not in case or min(rates) == case["lr_min"]


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
    assert grad_modes == [False] * (1 + DEFAULTS["num_perturbations"])
    assert same_bits(params, twin)


@pytest.mark.parametrize(
    "dtype,master,antithetic",
    [
        (torch.float32, False, False),
        (torch.bfloat16, False, False),
        (torch.float16, False, False),
        (torch.bfloat16, True, False),
        (torch.float16, True, False),
        (torch.bfloat16, True, True),
        (torch.float16, True, True),
    ],
    ids=["float32", "bfloat16", "float16", "bfloat16-master", "float16-master", "bfloat16-master-antithetic",
         "float16-master-antithetic"],
)
def test_each_step_in_reduced_precision_follows_the_reference(device, dtype, master, antithetic):
    """Every step, from where the optimizer stands (its parameters, or master
    weights), against the float64 reference: the closure sees the same
    rounded values, so the losses agree exactly, and the update is within
    the roundings of its arithmetic (float32, then the parameter's dtype).
    With master weights and antithetic, theta - sigma z is the master
    weight's, rounded, as the reference computes it."""
    params, loss = quadratic([300, 77], device)
    params = [p.detach().to(dtype).requires_grad_() for p in params]
    # One direction: the bound below counts the roundings of one.
    options = dict(DEFAULTS, lr=0.05, sigma=0.05, weight_decay=0.5, seed=3, master_weights=master, antithetic=antithetic, num_perturbations=1)
    opt = torch_dopamine.Dopamine(params, **options)
    reference = ReferenceDopamine([(params, options)], storage=dtype)
    group = reference.groups[0]
    # Per element, without a master weight: the roundings of x + sigma z and
    # of the result to the dtype (unit roundoff u each), and in every case a
    # few float32 roundings (and float16's subnormal spacing, 2^-24).
    u = 0.0 if master else UNIT_ROUNDOFF[dtype]
    for _ in range(10):
        start = [(opt.state[p]["master_weight"] if master and p in opt.state else p).detach().clone() for p in params]
        group["theta"] = [x.double() for x in start]
        expected_l0 = reference.step(loss)
        assert opt.step(lambda: loss(params)).item() == expected_l0
        # The trace, an EMA of |L1 - L0| / sigma, and the rate agree: so do L1.
        assert opt.group_state(0)["rpe_trace"] == pytest.approx(group["m"], rel=1e-12)
        assert opt.group_state(0)["current_lr"] == pytest.approx(group["eta"], rel=1e-12)
        new = [opt.state[p]["master_weight"] if master else p for p in params]
        for i, (x0, x1, expected) in enumerate(zip(start, new, group["theta"])):
            z = noise_of(expected, 3, group["t"], i, options["noise"]).abs()
            x0 = x0.double().abs()
            movement = group["eta"] * abs(reference.delta) / options["sigma"] * z + options["lr"] * options["weight_decay"] * x0
            perturbed = x0 + options["sigma"] * z
            bound = u * (perturbed + expected.abs()) * (1 + 4 * u) + 8 * 2.0**-24 * (perturbed + movement) + 2.0**-24
            assert ((x1.double() - expected).abs() <= bound).all()
            if master:
                assert torch.equal(params[i], x1.to(dtype))


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


CPU_PATHS = ("baseline", "avx2", "avx512")
PRINT_PATH = "import torch_dopamine; print(torch_dopamine.cpu_capability())"


def run_with_capability(code, capability):
    """Runs `code` in a fresh interpreter with DOPAMINE_CPU_CAPABILITY set."""
    # The code imports this suite's reference module.
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, DOPAMINE_CPU_CAPABILITY=capability, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_every_cpu_path_draws_the_same_bits(noise):
    """The kernels' baseline, AVX2 and AVX-512 paths (capped with
    DOPAMINE_CPU_CAPABILITY in a fresh process) give identical parameters,
    and each process reports the path it ran: the cap, or the widest path
    this CPU has where that is narrower."""
    code = (
        "import hashlib, torch, torch_dopamine\n"
        "ps = [torch.zeros(100003), torch.zeros(77, dtype=torch.float64), torch.zeros(300, dtype=torch.bfloat16)]\n"
        "from reference import move, state_at\n"
        f"move(ps, state_at(1), indices=[1, 2, 3], seed=3, sigma=0.5, noise='{noise}')\n"
        f"move(ps, state_at(1), indices=[4, 5, 6], seed=3, sigma=0.25, noise='{noise}', carried=(1, 0), to=(0, 0))\n"
        "print(torch_dopamine.cpu_capability())\n"
        "print(hashlib.sha256(b''.join(bytes(p.view(torch.uint8).tolist()) for p in ps)).hexdigest())\n"
    )
    widest = run_with_capability(PRINT_PATH, "").stdout.strip()
    digests, ran = set(), set()
    for cap in CPU_PATHS:
        path, digest = run_with_capability(code, cap).stdout.split()
        assert path == CPU_PATHS[min(CPU_PATHS.index(cap), CPU_PATHS.index(widest))]
        digests.add(digest)
        ran.add(path)
    assert len(digests) == 1
    # On x86-64 at least the baseline and the AVX2 paths are compared.
    assert len(ran) >= 2 or widest == "baseline"


def test_an_unknown_cpu_capability_is_ignored_with_a_warning():
    result = run_with_capability(PRINT_PATH, "avx3")
    widest = run_with_capability(PRINT_PATH, "").stdout
    assert result.stdout == widest
    assert "ignoring invalid value for DOPAMINE_CPU_CAPABILITY: 'avx3' (expected baseline, avx2 or avx512)" in result.stderr


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


def test_the_cpu_kernels_can_use_more_than_one_thread():
    """at::parallel_for is inline: with an OpenMP ATen, code compiled without
    OpenMP runs it on the calling thread alone, and the thread tests above
    then compare one thread with one thread. The library must call OpenMP's
    runtime itself where torch does (GCC's GOMP_parallel, or LLVM's
    __kmpc_fork_call)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch's ATen does not parallelise with OpenMP")
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    nm = subprocess.run(["nm", "-D", "--undefined-only", torch_dopamine.LIBRARY_PATH], capture_output=True, text=True)
    if nm.returncode != 0:
        pytest.skip(f"nm cannot read the library: {nm.stderr.strip()}")
    assert "GOMP_parallel" in nm.stdout or "__kmpc_fork_call" in nm.stdout
