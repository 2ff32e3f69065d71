"""The ops as torch.library ops, TorchScript, the C++ optimizer, and the
check of the torch version at import."""

import math
import os
import statistics
import subprocess
import sys
from typing import Tuple

import pytest
import torch

import torch_dopamine
from torch_dopamine._options import op_arguments
from parity import ParityModel, train_both
from reference import LR_ADAPTATIONS, XOR_INPUTS, XOR_TARGETS, move, same_bits, snapshot, state_at, xor_loss, xor_net

# engine::kPlanHeader: the plan's entries before its step sizes (the next
# state's 6, decay, finite, sigma, the key's two words, noise and rank).
PLAN_HEADER = 13


def step_args(device):
    """Arguments of a whole step's ops over parameters of three dtypes, one
    with a master weight."""
    params = [
        torch.randn(5, 3, device=device),
        torch.randn(7, device=device, dtype=torch.float64),
        torch.randn(4, device=device, dtype=torch.bfloat16),
    ]
    masters = [params[2].float()]
    state = state_at(3, device)
    losses = torch.tensor([1.0, 1.25], dtype=torch.float64, device=device)
    return params, masters, state, losses


def option_arguments(**overrides):
    """Every argument of pack_options, by name: the optimizer's defaults as
    the op takes them (one direction, no baseline, weight decay 0.01, seed 3),
    with `overrides` in the op's terms (enum codes)."""
    defaults = torch_dopamine.Dopamine([torch.zeros(1, requires_grad=True)]).defaults
    options = op_arguments({**defaults, "num_perturbations": 1, "beta_baseline": None, "weight_decay": 0.01, "seed": 3})
    options.update(overrides)
    return options


def plan_options(**overrides):
    """plan_step's keyword arguments: the options, packed."""
    return dict(options=torch.ops.dopamine.pack_options(**option_arguments(**overrides)))


def op_cases(device):
    params, masters, state, losses = step_args(device)
    plan = torch.ops.dopamine.plan_step(state, losses, **plan_options())
    return {
        "move_": (
            torch.ops.dopamine.move_.default,
            (params, masters, [state]),
            dict(options=plan_options(noise=1)["options"], indices=[0, 1, 2], group_sizes=[3], carried=[1, 0],
                 to=[1, 1]),
        ),
        "plan_step": (torch.ops.dopamine.plan_step.default, (state, losses), plan_options(noise=1)),
        "finish_step_": (
            torch.ops.dopamine.finish_step_.default,
            (params, masters, [state.clone()], [plan]),
            dict(indices=[0, 1, 2], group_sizes=[3]),
        ),
        "check_state": (torch.ops.dopamine.check_state.default, (state,), {}),
    }


OPS = ["move_", "plan_step", "finish_step_", "check_state"]


@pytest.mark.parametrize("op_name", OPS)
def test_opcheck_passes(device, op_name):
    op, args, kwargs = op_cases(device)[op_name]
    torch.library.opcheck(op, args, kwargs)


def test_opcheck_passes_for_pack_options():
    torch.library.opcheck(
        torch.ops.dopamine.pack_options.default, (), option_arguments(lr_adaptation=0, lr_min=0.0, noise=1)
    )


def test_pack_options_names_every_option_once_and_plan_step_checks_a_packed_list():
    schema = torch.ops.dopamine.pack_options.default._schema
    names = [argument.name for argument in schema.arguments]
    assert names == sorted(option_arguments(), key=names.index) and set(names) == set(option_arguments())
    assert all(argument.kwarg_only for argument in schema.arguments)
    assert set(names) == set(torch_dopamine.Dopamine([torch.zeros(1, requires_grad=True)]).defaults)
    state, losses = state_at(1), torch.tensor([1.0, 1.5], dtype=torch.float64)
    packed = plan_options()["options"]
    with pytest.raises(RuntimeError, match=f"options must be the {len(packed)} numbers pack_options returns, got {len(packed) - 1}"):
        torch.ops.dopamine.plan_step(state, losses, options=packed[:-1])
    for field, bad, message in ((2, 4.0, "invalid lr_adaptation code 4"), (1, -1.0, "invalid sigma: -1"),
                                (19, 2.5, "invalid num_perturbations: 2.5")):
        forged = list(packed)
        forged[field] = bad
        with pytest.raises(RuntimeError, match=message):
            torch.ops.dopamine.plan_step(state, losses, options=forged)


def test_op_arguments_after_the_tensors_are_keyword_only():
    params, masters, state, _ = step_args("cpu")
    # Every argument given, so that only the keyword-only rule can refuse it.
    options = plan_options()["options"]
    with pytest.raises(RuntimeError, match=r"takes 3 positional argument\(s\) but 8 was/were given"):
        torch.ops.dopamine.move_(params, masters, [state], options, [0, 1, 2], [3], [0, 0], [1, 0])


def test_fake_kernels_check_arguments_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params, masters, state, losses = step_args("cpu")
        move(params, state, masters=masters, indices=[0, 1, 2])
        plan = torch.ops.dopamine.plan_step(state, losses, **plan_options())
        assert plan.shape == (PLAN_HEADER + 1,) and plan.dtype == torch.float64
        taken = torch.ops.dopamine.finish_step_(params, masters, [state], [plan], indices=[0, 1, 2], group_sizes=[3])
        assert taken.shape == ()
        with pytest.raises(RuntimeError, match="must be a strided float32, float64, bfloat16 or float16"):
            move([torch.empty(3, dtype=torch.int32)], state, indices=[0])
    meta = [torch.empty(4, device="meta")]
    move(meta, state_at(1, "meta"), indices=[0])


def test_loss_spread_divides_lr_by_the_sample_deviation_of_the_perturbed_losses():
    """FZOO's normalisation: L0 is left out of the spread; with antithetic
    every loss is perturbed."""
    losses = torch.tensor([1.0, 1.5, 0.5], dtype=torch.float64)
    plan = torch.ops.dopamine.plan_step(state_at(1), losses, **plan_options(lr_adaptation=3, num_perturbations=2)).tolist()
    lr = 0.1 / (math.sqrt(0.5) + 1e-8)  # the deviation of {1.5, 0.5}
    assert plan[4] == pytest.approx(lr, rel=1e-15)
    assert plan[PLAN_HEADER:PLAN_HEADER + 2] == pytest.approx([lr * 0.5 / 0.01 / 2, -lr * 0.5 / 0.01 / 2], rel=1e-15)
    losses = torch.tensor([1.0, 2.0, 4.0, 1.0], dtype=torch.float64)
    plan = torch.ops.dopamine.plan_step(
        state_at(1), losses, **plan_options(lr_adaptation=3, num_perturbations=2, antithetic=True)
    ).tolist()
    assert plan[4] == pytest.approx(0.1 / (statistics.stdev([1.0, 2.0, 4.0, 1.0]) + 1e-8), rel=1e-15)
    lr = plan[4]
    assert plan[PLAN_HEADER:PLAN_HEADER + 2] == pytest.approx([lr * -0.5 / 0.01 / 2, lr * 1.5 / 0.01 / 2], rel=1e-15)
    # Equal perturbed losses: no scale, so no move, however far they are from L0.
    plan = torch.ops.dopamine.plan_step(
        state_at(1), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), **plan_options(lr_adaptation=3, num_perturbations=2)
    ).tolist()
    assert plan[4] == 0 and plan[PLAN_HEADER:PLAN_HEADER + 2] == [0, 0] and plan[7] == 1
    with pytest.raises(ValueError, match="invalid num_perturbations: 1 with lr_adaptation=loss_spread"):
        torch.ops.dopamine.pack_options(**option_arguments(lr_adaptation=3))
    with pytest.raises(ValueError, match="invalid num_perturbations: 1 with lr_adaptation=loss_spread"):
        torch_dopamine.Dopamine([torch.zeros(2, requires_grad=True)], lr_adaptation="loss_spread", num_perturbations=1)
    torch_dopamine.Dopamine([torch.zeros(2, requires_grad=True)], lr_adaptation="loss_spread", num_perturbations=1, antithetic=True)


def test_plan_computes_the_spec_rule():
    state = state_at(1)
    losses = torch.tensor([1.0, 1.5], dtype=torch.float64)
    plan = torch.ops.dopamine.plan_step(state, losses, **plan_options(lr_adaptation=1)).tolist()
    trace = 0.1 * 0.5 / 0.01
    lr = 0.1 / (trace / (1 - 0.9) + 1e-8)
    assert plan[:6] == pytest.approx([1, 0, trace, 0, lr, 0])
    assert plan[PLAN_HEADER] == pytest.approx(lr * 0.5 / 0.01) and plan[6] == pytest.approx(0.1 * 0.01) and plan[7] == 1
    state = torch.tensor([1, 0, 0, 1.0, 0.2, 0], dtype=torch.float64)
    losses = torch.tensor([1.0, 0.5], dtype=torch.float64)
    plan = torch.ops.dopamine.plan_step(state, losses, **plan_options(lr_adaptation=2, beta_s=0.5, beta_eta=0.25, lr_max=0.06))
    # s = 0.5 * 1 + 0.5 * 0.5 = 0.75; eta = 0.75 * 0.2 + 0.25 * 0.75 = 0.3375, clamped.
    assert plan[3].item() == pytest.approx(0.75) and plan[4].item() == 0.06
    with pytest.raises(RuntimeError, match="invalid lr_adaptation code 4"):
        torch.ops.dopamine.pack_options(**option_arguments(lr_adaptation=4))
    for bad in ([1.0, math.nan], [math.inf, 1.0]):
        plan = torch.ops.dopamine.plan_step(state, torch.tensor(bad, dtype=torch.float64), **plan_options())
        assert plan[7].item() == 0


@pytest.mark.parametrize("antithetic", [False, True])
def test_evaluations_list_the_losses_in_the_order_plan_step_reads_them(antithetic):
    offsets, directions, names = torch.ops.dopamine.evaluations(antithetic=antithetic, directions=3)
    if antithetic:
        assert list(zip(offsets, directions)) == [(1, 0), (-1, 0), (1, 1), (-1, 1), (1, 2), (-1, 2)]
        assert names[:2] == ["theta + sigma z_0", "theta - sigma z_0"]
    else:
        assert list(zip(offsets, directions)) == [(0, 0), (1, 0), (1, 1), (1, 2)]
        assert names == ["unperturbed", "theta + sigma z_0", "theta + sigma z_1", "theta + sigma z_2"]
    # Each loss a function of where it was evaluated: direction j's RPE is
    # 0.125 (j + 1) whichever way it is formed, so its step size is j + 1
    # times direction 0's only if plan_step reads the losses in this order.
    losses = torch.tensor([1 + 0.125 * offset * (j + 1) for offset, j in zip(offsets, directions)], dtype=torch.float64)
    plan = torch.ops.dopamine.plan_step(
        state_at(1), losses, **plan_options(antithetic=antithetic, num_perturbations=3, lr_adaptation=0)
    ).tolist()
    step_sizes = plan[-3:]
    assert step_sizes[0] != 0
    assert [size / step_sizes[0] for size in step_sizes] == pytest.approx([1.0, 2.0, 3.0], rel=1e-12)
    assert torch.ops.dopamine.evaluations(antithetic=False, directions=1)[2] == ["unperturbed", "perturbed"]
    with pytest.raises(RuntimeError, match="directions must be at least 1, got 0"):
        torch.ops.dopamine.evaluations(antithetic=antithetic, directions=0)


def test_finish_checks_everything_before_it_writes():
    params, masters, state, losses = step_args("cpu")
    plan = torch.ops.dopamine.plan_step(state, losses, **plan_options())
    before, state_before = snapshot(params), state.clone()
    with pytest.raises(RuntimeError, match="group sizes add up to 2"):
        torch.ops.dopamine.finish_step_(params, masters, [state], [plan], indices=[0, 1, 2], group_sizes=[2])
    with pytest.raises(RuntimeError, match="master weight of params"):
        torch.ops.dopamine.finish_step_(
            params, [torch.zeros(3)], [state], [plan], indices=[0, 1, 2], group_sizes=[3]
        )
    assert same_bits(params, before) and torch.equal(state, state_before)


def test_cpp_optimizer_trains_a_python_saved_module_bit_identically(build_dir, tmp_path):
    """Parity: 50 steps of dopamine::Dopamine in C++ (examples/torchscript)
    on a module saved by torch.jit.save equal 50 steps of the Python optimizer."""
    trainer = build_dir / "examples" / "train_torchscript"
    assert trainer.exists(), f"{trainer} not built; run `make build` (or set DOPAMINE_BUILD_DIR)"
    model = xor_net(1)
    torch.jit.save(torch.jit.script(model), tmp_path / "xor.pt")
    subprocess.run([str(trainer), str(tmp_path / "xor.pt"), "50", str(tmp_path / "trained.pt")], check=True, capture_output=True)
    trained_in_cpp = list(torch.jit.load(tmp_path / "trained.pt").parameters())

    opt = torch_dopamine.Dopamine(model.parameters(), lr=0.1, sigma=0.01)
    before = snapshot(model.parameters())
    for _ in range(50):
        opt.step(lambda: xor_loss(model))
    assert not same_bits(before, list(model.parameters()))
    assert same_bits(trained_in_cpp, list(model.parameters()))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("antithetic", [False, True])
def test_cpp_and_python_optimizers_compute_the_same_bits(build_dir, tmp_path, mode, noise, weight_decay, antithetic):
    """Two groups with their own options, in every mode, noise, with and
    without weight decay and antithetic: 30 steps of each optimizer give the
    same parameters and group states, bit for bit. loss_spread's lr is about
    sigma times the others' (docs/DESIGN.md, "The algorithm")."""
    scale = {"loss_spread": 0.02}.get(mode, 1.0)
    groups = [
        (2, dict(lr=0.05 * scale, sigma=0.02, lr_adaptation=mode, noise=noise, weight_decay=weight_decay, seed=5)),
        (2, dict(lr=0.02 * scale, sigma=0.05, lr_adaptation=mode, noise=noise, weight_decay=weight_decay, seed=-9,
                 beta=0.8, beta_s=0.9, beta_eta=0.01, lr_min=1e-3, lr_max=0.5, beta_baseline=0.9)),
    ]
    (cpp_params, cpp_states), (python_params, python_states) = train_both(build_dir, tmp_path, groups, 30, antithetic)
    assert not same_bits(cpp_params, list(ParityModel().parameters()))
    assert same_bits(cpp_params, python_params)
    assert cpp_states == python_states and cpp_states[0][0] == 30


@pytest.mark.parametrize("antithetic", [False, True])
def test_cpp_and_python_take_several_directions_alike(build_dir, tmp_path, antithetic):
    """num_perturbations = 3, with weight decay in one group: the same bits in
    both front ends."""
    groups = [
        (2, dict(lr=0.05, sigma=0.02, seed=5, num_perturbations=3)),
        (2, dict(lr=0.02, sigma=0.05, seed=-9, weight_decay=0.05, noise="rademacher", num_perturbations=3)),
    ]
    (cpp_params, cpp_states), (python_params, python_states) = train_both(build_dir, tmp_path, groups, 20, antithetic)
    assert not same_bits(cpp_params, list(ParityModel().parameters()))
    assert same_bits(cpp_params, python_params)
    assert cpp_states == python_states and cpp_states[0][0] == 20


def test_torch_version_mismatch_is_a_clear_import_error():
    from torch_dopamine import _library

    with pytest.raises(ImportError, match=r"built against torch 2\.4\.1, but torch 2\.13\.0\+cpu is imported"):
        _library.check_torch_version("2.4.1", "2.13.0+cpu")
    _library.check_torch_version("2.13.0", "2.13.0+cpu")
    # The whole import path, in a fresh interpreter whose torch claims another version.
    code = "import torch; torch.__version__ = '9.9.9'; import torch_dopamine"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode != 0
    assert "ImportError: torch_dopamine was built against torch" in result.stderr
    assert "but torch 9.9.9 is imported" in result.stderr
    assert "Segmentation" not in result.stderr and "undefined symbol" not in result.stderr
