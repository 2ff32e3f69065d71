"""torch_dopamine: Dopamine, a forward-only, derivative-free optimizer.

Each step perturbs every weight with seeded noise (+-1 by default, or
Gaussian, the paper's), compares the loss of the perturbed and the unperturbed
model (the reward prediction error), moves the weights along the noise and lets
that error adapt the learning rate. No backward pass, no gradients, no
per-element state.

The numerics are the compiled ops ``torch.ops.dopamine.*``, the same ones the
C++ optimizer ``dopamine::Dopamine`` calls; they are loaded on import.
"""

import torch

from . import _library

LIBRARY_PATH = _library.load()
"""Path of the loaded ops library."""

from .optimizer import STATE_FIELDS, Dopamine  # noqa: E402
from .trajectory import load_trajectory, replay  # noqa: E402


def cpu_capability() -> str:
    """The instruction set the CPU kernels run: ``"baseline"``, ``"avx2"`` or
    ``"avx512"``, the widest this CPU has, capped by the environment variable
    ``DOPAMINE_CPU_CAPABILITY`` (read once; an unknown value is ignored with a
    warning). Every path computes the same bits."""
    return torch.ops.dopamine.cpu_capability()


__version__ = "0.1.0"
__all__ = ["Dopamine", "LIBRARY_PATH", "STATE_FIELDS", "cpu_capability", "load_trajectory", "replay", "__version__"]
