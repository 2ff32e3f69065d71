import os
from pathlib import Path

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # test_properties.py skips itself (a GPU machine may lack it)
    settings = None

# Property tests (test_properties.py): `ci` runs in `make test`, bounded and
# derandomized so that a failure reproduces; `nightly` draws many more
# examples: HYPOTHESIS_PROFILE=nightly python -m pytest tests/python/test_properties.py
if settings is not None:
    settings.register_profile(
        "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "nightly", max_examples=500, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
