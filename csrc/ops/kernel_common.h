#pragma once

// What the step ops (step_ops.cpp) hand to the kernels of each backend: a
// table of parameter tensors, each with the noise and the element update it
// takes (docs/DESIGN.md, "Kernels"). The ops check the arguments, bucket the
// tensors by device and call that device's Backend; a backend runs the whole
// table in one pass (CPU) or one launch per dtype (CUDA).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

#include "engine.h"
#include "noise.h"

namespace dopamine::ops {

// The noise and element update of one tensor in one op: x' = apply(
// coefficients, x, z_direction), then x' -= other_step_sizes[j] * z_j for
// each j < other_directions (the finish of a step of several directions,
// docs/DESIGN.md, "Several directions"). z_j is drawn with
// noise::direction_key(key, j).
struct TensorStep {
  noise::Kind kind;
  noise::Key key;
  uint32_t step;
  uint32_t direction;
  engine::Coefficients coefficients;
  int64_t other_directions;
  // On the device of the kernel that reads it: the plan's own memory, or a
  // copy of the host plan's step sizes for a kernel off the CPU.
  const double* other_step_sizes;
};

// Where a TensorStep comes from when the host cannot read it (a capturable
// step's state on a GPU): the kernel reads the step from `state` (move_)
// or everything from `plan` and `taken` (finish_step_).
struct DeviceStepSource {
  const double* state = nullptr;
  const double* plan = nullptr;
  const double* taken = nullptr;
  // move_'s options, known on the host.
  noise::Kind kind = noise::Kind::Gaussian;
  noise::Key key = {0, 0};
  double sigma = 0;
  int64_t previous = 0, offset = 1;
  uint32_t direction = 0;
  // finish_step_'s number of directions, from the plan's size.
  int64_t directions = 1;
  bool has_master = false;
};

C10_HOST_DEVICE inline TensorStep perturb_tensor_step(noise::Kind kind,
                                                      noise::Key key,
                                                      uint32_t direction,
                                                      const double* state,
                                                      double sigma,
                                                      int64_t previous,
                                                      int64_t offset,
                                                      bool has_master) {
  return {kind,
          key,
          static_cast<uint32_t>(state[engine::kStep] + 1),
          direction,
          engine::perturb_coefficients(sigma, previous, offset, has_master),
          0,
          nullptr};
}

C10_HOST_DEVICE inline TensorStep finish_tensor_step(const double* plan,
                                                     int64_t directions,
                                                     bool taken,
                                                     bool has_master) {
  return {engine::plan_noise(plan),
          engine::plan_key(plan),
          static_cast<uint32_t>(plan[engine::kNextState + engine::kStep]),
          static_cast<uint32_t>(directions - 1),
          engine::finish_coefficients(plan, directions, taken, has_master),
          taken ? directions - 1 : 0,
          plan + engine::kStepSizes};
}

C10_HOST_DEVICE inline TensorStep resolve(const DeviceStepSource& source) {
  if (source.plan != nullptr) {
    return finish_tensor_step(
        source.plan, source.directions, *source.taken != 0, source.has_master);
  }
  return perturb_tensor_step(source.kind,
                             source.key,
                             source.direction,
                             source.state,
                             source.sigma,
                             source.previous,
                             source.offset,
                             source.has_master);
}

// One tensor of an op: its contiguous data (the parameter, or a contiguous
// copy written back afterwards), its float32 master weight or nullptr, its
// global index (which keys its noise), the element of the parameter its first
// element is (a shard of a sharded parameter draws the noise of its elements'
// places in the whole; docs/DESIGN.md, "Many processes"), and its step.
struct UpdateEntry {
  void* data;
  float* master;
  int64_t numel;
  at::ScalarType dtype;
  uint32_t index;
  int64_t offset;
  // Read on the host when `resolved`, else by the kernel from `source`.
  bool resolved;
  TensorStep step;
  DeviceStepSource source;
};

// The noise tiles an entry's elements lie in: [first, first + count).
C10_HOST_DEVICE inline int64_t first_tile_of(const UpdateEntry& entry) {
  return entry.offset / noise::kTile;
}
C10_HOST_DEVICE inline int64_t tile_count(const UpdateEntry& entry) {
  return (entry.offset + entry.numel + noise::kTile - 1) / noise::kTile -
         first_tile_of(entry);
}

// x' = keep * (x - shift * z) - move * z in the arithmetic type T.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T apply(const engine::Coefficients& c,
                                          T x,
                                          T z) {
  return static_cast<T>(c.keep) * (x - static_cast<T>(c.shift) * z) -
         static_cast<T>(c.move) * z;
}

// A backend's kernels. `update` runs the entries of one device; `plan` and
// `settle` run the state arithmetic (engine.h) where the state lives.
struct Backend {
  void (*update)(c10::ArrayRef<UpdateEntry> entries);
  // plan = engine::plan_group(state, losses, options).
  void (*plan)(const at::Tensor& state,
               const at::Tensor& losses,
               const engine::GroupOptions& options,
               const at::Tensor& plan);
  // taken = all plans finite; commits every state; returns `taken` as a
  // float64 scalar on the states' device.
  at::Tensor (*settle)(at::TensorList states, at::TensorList plans);
};

// The options that pack_options returned, checked again (a list made by hand
// is held to the same rules) and unpacked; errors name `op`.
engine::GroupOptions unpack_options(c10::ArrayRef<double> options,
                                    const char* op);

// The backend of a device type; registered by the file that defines it.
void register_backend(c10::DeviceType type, const Backend& backend);
const Backend& backend_for(c10::DeviceType type);

struct BackendRegistrar {
  BackendRegistrar(c10::DeviceType type, const Backend& backend) {
    register_backend(type, backend);
  }
};

}  // namespace dopamine::ops
