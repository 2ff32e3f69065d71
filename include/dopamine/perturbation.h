#pragma once

// The perturbation parameters carry between a step's evaluations; a plain
// struct, so that the kernels (csrc/ops) take the same type as the public
// ops.h.
#include <cstdint>

namespace dopamine::ops {

// offset * sigma * z_direction, offset -1, 0 or 1 (0: none, whatever the
// direction).
struct Perturbation {
  int64_t offset = 0;
  int64_t direction = 0;
};

}  // namespace dopamine::ops
