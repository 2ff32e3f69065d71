#pragma once

// The CUDA backend's kernels run on the CPU (docs/DESIGN.md, "Kernels"): the
// same launch plan and kernel bodies as csrc/ops/cuda/fused_kernels.cu
// (csrc/ops/cuda/launch.h), compiled by the host compiler, over an emulated
// grid.
#include <cstdint>
#include <vector>

#include "ops/kernel_common.h"

namespace dopamine::testing {

// The update kernel's launches for a device of `sms` SMs, each block and each
// thread of a block in an order drawn from `order_seed`, one __syncthreads
// phase of every thread before the next; shared memory starts as garbage.
void emulate_update(const ops::KernelTable& table,
                    int64_t sms,
                    uint64_t order_seed);

// The settle kernel's body: taken = every plan finite; commits each state.
double emulate_settle(const std::vector<double*>& states,
                      const std::vector<const double*>& plans);

}  // namespace dopamine::testing
