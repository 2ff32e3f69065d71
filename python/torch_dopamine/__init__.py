"""torch_dopamine: Dopamine, a forward-only, derivative-free optimizer.

Each step perturbs every weight with seeded Gaussian noise, compares the loss
of the perturbed and the unperturbed model (the reward prediction error), moves
the weights along the noise and lets that error adapt the learning rate. No
backward pass, no gradients, no per-element state.

The numerics are the compiled ops ``torch.ops.dopamine.*``, the same ones the
C++ optimizer ``dopamine::Dopamine`` calls; they are loaded on import.
"""

from . import _library

LIBRARY_PATH = _library.load()
"""Path of the loaded ops library."""

from .optimizer import STATE_FIELDS, Dopamine  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Dopamine", "LIBRARY_PATH", "STATE_FIELDS", "__version__"]
