#pragma once

// A run as a few scalars per step, and its replay (docs/DESIGN.md,
// "Trajectory and replay"). A trajectory is the dict that
// Dopamine::trajectory() and torch_dopamine's Dopamine.trajectory() return,
// in either front end: torch::jit::pickle_save writes one for Python's
// torch.load, and torch::jit::pickle_load reads what Python's torch.save wrote.
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <vector>

namespace dopamine {

// Applies a recorded trajectory to `params`, in place: every parameter the
// optimizer was given, in its order (frozen ones included, since the order
// keys the noise), as they were before the first recorded step. The result
// is the recorded run's parameters, bit for bit, with no forward pass.
// Bfloat16/float16 parameters of a master_weights run start from their
// float32 copies, as the optimizer's master weights do. A trajectory that is
// not of the format this version writes, or that moves a parameter beyond
// `params`, is refused before anything is written.
void replay(const std::vector<at::Tensor>& params,
            const c10::IValue& trajectory);

}  // namespace dopamine
