import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def build_dir():
    """The CMake build tree that holds the C++ examples (make test sets it)."""
    return Path(os.environ.get("DOPAMINE_BUILD_DIR", REPO / "build")).resolve()
