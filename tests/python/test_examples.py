"""The Python examples, run as a user runs them, for a few steps."""

import subprocess
import sys

import pytest

from conftest import REPO


def run_example(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "finetune_lm.py"), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr  # tqdm draws its bar on stderr


def test_finetune_lm_pretrains_caches_and_finetunes_with_adapters(tmp_path):
    """A few steps of examples/finetune_lm.py with a 3-step pretraining: the
    first run pretrains and caches, the second loads the cache; both
    fine-tune the bfloat16 base's adapters and write the loss curve."""
    pytest.importorskip("matplotlib")
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ("--steps", "3", "--batch", "2", "--pretrain-steps", "3", "--cache", str(cache), "--out", str(out))

    first = run_example(*args)
    assert "cached the pretrained model" in first
    assert len(list(cache.glob("tinylm-*.pt"))) == 1
    assert "over a frozen base of" in first and "in bfloat16" in first
    assert "after 3 steps" in first
    curve = out / "loss_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    curve.unlink()
    second = run_example(*args)
    assert "loading the pretrained model" in second
    assert "pretraining" not in second
    assert curve.exists()
