"""The ops as torch.library ops, TorchScript, the C++ optimizer, and the
check of the torch version at import."""

import os
import subprocess
import sys
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

import torch_dopamine
from reference import XOR_INPUTS, XOR_TARGETS, same_bits, snapshot, xor_loss, xor_net


def op_cases(device):
    def params():
        return [
            torch.randn(5, 3, device=device),
            torch.randn(7, device=device, dtype=torch.float64),
            torch.randn(4, device=device, dtype=torch.bfloat16),
        ]

    return [
        (torch.ops.dopamine.perturb_.default, (params(), 3, 1, 0, 0.01, "rademacher")),
        (torch.ops.dopamine.restore_update_.default, (params(), 3, 1, 2, 0.01, 0.5, 0.001)),
        (torch.ops.dopamine.perturb_tensor_.default, (params()[0], 3, 1, 4, 0.01)),
        (torch.ops.dopamine.restore_update_tensor_.default, (params()[2], 3, 1, 4, 0.01, 0.5, 0.001)),
    ]


OPS = ["perturb_", "restore_update_", "perturb_tensor_", "restore_update_tensor_"]


@pytest.mark.parametrize("op_index", range(len(OPS)), ids=OPS)
def test_opcheck_passes(device, op_index):
    op, args = op_cases(device)[op_index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "op,args",
    [
        ("adapt_lr", ("rpe_normalized", 0.5, 1, 0.1, 0.01, 0.9, 0.9998, 2e-4, 1e-8, None, 1.0, 0.0, 0.0, 0.0)),
        ("check_options", (0.1, 0.01, "none", 0.9, 0.9998, 2e-4, 1e-8, 0.0, None, 0.0, "rademacher", "skip")),
    ],
    ids=["adapt_lr", "check_options"],
)
def test_opcheck_passes_for_the_scalar_ops(op, args):
    torch.library.opcheck(getattr(torch.ops.dopamine, op).default, args)


def test_fake_kernels_check_arguments_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params = [torch.empty(10), torch.empty(3, dtype=torch.float16)]
        torch.ops.dopamine.perturb_(params, 0, 1, 0, 0.1)
        torch.ops.dopamine.restore_update_(params, 0, 1, 0, 0.1, 0.2, 0.0)
        with pytest.raises(RuntimeError, match="must be a floating-point tensor"):
            torch.ops.dopamine.perturb_([torch.empty(3, dtype=torch.int32)], 0, 1, 0, 0.1)
    meta = [torch.empty(4, device="meta")]
    torch.ops.dopamine.perturb_(meta, 0, 1, 0, 0.1)


def test_one_tensor_ops_equal_the_list_ops(device):
    params = [torch.randn(6, device=device), torch.randn(2, 3, device=device, dtype=torch.float16)]
    singles = [p.clone() for p in params]
    torch.ops.dopamine.perturb_(params, 9, 4, 3, 0.1)
    torch.ops.dopamine.restore_update_(params, 9, 3, 3, 0.1, 0.2, 0.01)
    for offset, param in enumerate(singles):
        torch.ops.dopamine.perturb_tensor_(param, 9, 4, 3 + offset, 0.1)
        torch.ops.dopamine.restore_update_tensor_(param, 9, 3, 3 + offset, 0.1, 0.2, 0.01)
    assert same_bits(params, singles)


def test_scalar_ops_compute_the_spec_rule():
    trace, magnitude, lr = torch.ops.dopamine.adapt_lr(
        "rpe_normalized", 0.5, 1, 0.1, 0.01, 0.9, 0.9998, 2e-4, 1e-8, None, None, 0.0, 0.0, 0.0
    )
    assert trace == pytest.approx(0.1 * 0.5 / 0.01) and magnitude == 0.0
    assert lr == pytest.approx(0.1 / (trace / (1 - 0.9) + 1e-8))
    _, magnitude, lr = torch.ops.dopamine.adapt_lr(
        "rpe_tracking", -0.5, 2, 0.1, 0.01, 0.9, 0.5, 0.25, 1e-8, None, 0.06, 0.0, 1.0, 0.2
    )
    assert magnitude == pytest.approx(0.75) and lr == 0.06  # 0.75 * 0.2 + 0.25 * 0.75, clamped
    with pytest.raises(RuntimeError, match="unknown mode 'adam'"):
        torch.ops.dopamine.adapt_lr("adam", 0.5, 1, 0.1, 0.01, 0.9, 0.9, 0.1, 1e-8, None, None, 0.0, 0.0, 0.0)


class ScriptedStep(torch.nn.Module):
    """A full Dopamine step (default options, rpe_normalized) written in
    TorchScript over the ops, training the XOR MLP it holds. It calls the
    one-tensor ops: TorchScript does not track writes through a list argument
    (it drops or merges the code around them, as for torch._foreach_add_)."""

    def __init__(self, model: torch.nn.Module, seed: int, lr: float, sigma: float):
        super().__init__()
        self.model = model
        self.seed = seed
        self.lr = lr
        self.sigma = sigma

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(F.mse_loss(self.model(x), y))

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int, rpe_trace: float) -> Tuple[float, float]:
        model = self.model
        params = [model.hidden.weight, model.hidden.bias, model.output.weight, model.output.bias]
        with torch.no_grad():
            unperturbed = self.loss(x, y)
            for index, param in enumerate(params):
                torch.ops.dopamine.perturb_tensor_(param, self.seed, step, index, self.sigma)
            delta = self.loss(x, y) - unperturbed
            rpe_trace, _, lr = torch.ops.dopamine.adapt_lr(
                "rpe_normalized", delta, step, self.lr, self.sigma, 0.9, 0.9998, 2e-4, 1e-8, None, None, rpe_trace, 0.0, 0.0
            )
            for index, param in enumerate(params):
                torch.ops.dopamine.restore_update_tensor_(
                    param, self.seed, step, index, self.sigma, lr * delta / self.sigma, 0.0
                )
        return unperturbed, rpe_trace


def test_torchscript_step_matches_the_python_optimizer():
    scripted = torch.jit.script(ScriptedStep(xor_net(3), seed=5, lr=0.1, sigma=0.01))
    model = xor_net(3)
    opt = torch_dopamine.Dopamine(model.parameters(), seed=5)
    rpe_trace = 0.0
    for step in range(1, 31):
        scripted_loss, rpe_trace = scripted(XOR_INPUTS, XOR_TARGETS, step, rpe_trace)
        assert scripted_loss == opt.step(lambda: xor_loss(model)).item()
    assert same_bits(list(scripted.parameters()), list(model.parameters()))
    assert rpe_trace == opt.state[next(model.parameters())]["rpe_trace"]


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
