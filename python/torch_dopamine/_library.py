"""Loads the compiled ops (libdopamine) into torch, after checking that the
torch imported now is the torch the library was built against: LibTorch has
no stable ABI, and a mismatch otherwise ends in a crash or an undefined
symbol."""

import os
from pathlib import Path

import torch


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'."""
    return version.split("+", 1)[0]


def check_torch_version(built: str, running: str) -> None:
    """Raises ImportError naming both versions unless they are the same release."""
    if _release(built) != _release(running):
        raise ImportError(
            f"torch_dopamine was built against torch {built}, but torch {running} "
            "is imported. Rebuild it against this torch: "
            "pip install --no-build-isolation <torch-dopamine checkout>"
        )


def load() -> Path:
    """Loads the library once; returns its path. TORCH_DOPAMINE_LIBRARY, when
    set, names a library to load instead of the installed one (a CMake build
    tree's, say, with PYTHONPATH=python); its torch version is then the
    caller's responsibility."""
    override = os.environ.get("TORCH_DOPAMINE_LIBRARY")
    if override:
        path = Path(override)
        built = "unknown (TORCH_DOPAMINE_LIBRARY)"
    else:
        from . import _build_info

        built = _build_info.TORCH_VERSION
        check_torch_version(built, torch.__version__)
        path = Path(__file__).with_name(_build_info.LIBRARY)
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise ImportError(
            f"torch_dopamine could not load its ops library {path}: {error}. "
            f"It was built against torch {built}; torch "
            f"{torch.__version__} is imported."
        ) from error
    return path
