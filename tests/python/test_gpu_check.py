"""scripts/gpu_check.sh on a machine without a CUDA device: it prints the
versions, says it skips the CUDA parts, and succeeds."""

import os
import subprocess

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the real check (minutes)")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=REPO,
        env=dict(os.environ, OUT=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "== torch" in result.stdout and torch.__version__ in result.stdout
    summary = (tmp_path / "summary.txt").read_text()
    assert "no CUDA device: skipped" in summary
    assert (tmp_path / "versions.txt").exists()
