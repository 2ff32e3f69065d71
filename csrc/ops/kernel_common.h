#pragma once

// What the step ops (step_ops.cpp) hand to the kernels of each backend: a
// table of parameter tensors and, beside them, the noise and element update
// of each kernel group (docs/DESIGN.md, "Kernels"). The ops check the
// arguments, bucket the tensors by device and call that device's Backend; a
// backend runs the whole table in one pass (CPU) or in launches of up to 100
// tensors per dtype (CUDA, cuda/launch.h).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

#include <dopamine/perturbation.h>

#include "engine.h"
#include "noise.h"

namespace dopamine::ops {

// The noise and element update of one tensor in one op: x' = apply(
// coefficients, x, z_direction), then x' -= other_step_size(step, j) *
// z_{other_first + j} for each j < other_directions. The finish of a step of
// several directions moves along the others (docs/DESIGN.md, "Several
// directions"); move_ from one direction to another leaves the first in the
// same pass. z_j is drawn with noise::direction_key(key, j); with `rank` >
// 0, a tensor with columns (TensorEntry::cols) takes the low-rank z of that
// stream (noise.h).
struct TensorStep {
  noise::Kind kind;
  noise::Key key;
  uint32_t rank;
  uint32_t step;
  uint32_t direction;
  engine::Coefficients coefficients;
  uint32_t other_first;
  int64_t other_directions;
  // On the device of the kernel that reads it: the plan's own memory, or a
  // copy of the host plan's step sizes for a kernel off the CPU; null when
  // every other direction moves by `other_step`.
  const double* other_step_sizes;
  double other_step;
};

// The direction a step draws in slot `slot`: its own (slot 0), or its other
// direction slot - 1.
C10_HOST_DEVICE inline uint32_t direction_of(const TensorStep& step,
                                             int64_t slot) {
  return slot == 0 ? step.direction
                   : step.other_first + static_cast<uint32_t>(slot - 1);
}

C10_HOST_DEVICE inline double other_step_size(const TensorStep& step,
                                              int64_t j) {
  return step.other_step_sizes != nullptr ? step.other_step_sizes[j]
                                          : step.other_step;
}

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
  uint32_t rank = 0;
  double sigma = 0;
  Perturbation carried = {0, 0}, to = {1, 0};
  // finish_step_'s number of directions, from the plan's size.
  int64_t directions = 1;
  bool has_master = false;
};

// move_ in one pass: theta + carried -> theta + to. A master weight is never
// perturbed, so a parameter with one becomes the rounding of master + to.
C10_HOST_DEVICE inline TensorStep perturb_tensor_step(noise::Kind kind,
                                                      noise::Key key,
                                                      uint32_t rank,
                                                      const double* state,
                                                      double sigma,
                                                      Perturbation carried,
                                                      Perturbation to,
                                                      bool has_master) {
  const bool leaves = !has_master && carried.offset != 0 && to.offset != 0 &&
                      carried.direction != to.direction;
  // Directions are counter words (checked by move_).
  const auto direction =
      static_cast<uint32_t>(to.offset != 0 ? to.direction : carried.direction);
  return {kind,
          key,
          rank,
          static_cast<uint32_t>(state[engine::kStep] + 1),
          direction,
          engine::perturb_coefficients(
              sigma, leaves ? 0 : carried.offset, to.offset, has_master),
          static_cast<uint32_t>(carried.direction),
          leaves ? 1 : 0,
          nullptr,
          static_cast<double>(carried.offset) * sigma};
}

C10_HOST_DEVICE inline TensorStep finish_tensor_step(const double* plan,
                                                     int64_t directions,
                                                     bool taken,
                                                     bool has_master) {
  return {engine::plan_noise(plan),
          engine::plan_key(plan),
          engine::plan_rank(plan),
          static_cast<uint32_t>(plan[engine::kNextState + engine::kStep]),
          static_cast<uint32_t>(directions - 1),
          engine::finish_coefficients(plan, directions, taken, has_master),
          0,
          taken ? directions - 1 : 0,
          plan + engine::kStepSizes,
          0};
}

C10_HOST_DEVICE inline TensorStep resolve(const DeviceStepSource& source) {
  if (source.plan != nullptr) {
    return finish_tensor_step(
        source.plan, source.directions, *source.taken != 0, source.has_master);
  }
  return perturb_tensor_step(source.kind,
                             source.key,
                             source.rank,
                             source.state,
                             source.sigma,
                             source.carried,
                             source.to,
                             source.has_master);
}

// A kernel group: the tensors of one parameter group that share a
// TensorStep in one op (with or without a master weight, which changes the
// coefficients). Read on the host when `resolved`, else by the kernel from
// `source` (a capturable step's state on its device).
struct GroupEntry {
  bool resolved;
  TensorStep step;
  DeviceStepSource source;
};

C10_HOST_DEVICE inline TensorStep step_of(const GroupEntry& group) {
  return group.resolved ? group.step : resolve(group.source);
}

// The kernel group entries of move_ and finish_step_: resolved here when the
// host can read the state, plan and `taken` (`on_host`), else read by the
// kernel where they live.
inline GroupEntry group_entry(const DeviceStepSource& source, bool on_host) {
  GroupEntry entry{};
  entry.resolved = on_host;
  if (on_host) {
    entry.step = resolve(source);
  } else {
    entry.source = source;
  }
  return entry;
}

// move_: parameters carrying `carried` come to carry `to`, in one pass.
inline GroupEntry move_group(const engine::GroupOptions& options,
                             const double* state,
                             Perturbation carried,
                             Perturbation to,
                             bool has_master,
                             bool on_host) {
  DeviceStepSource source;
  source.state = state;
  source.kind = options.noise;
  source.key = options.key;
  source.rank = static_cast<uint32_t>(options.rank);
  source.sigma = options.sigma;
  source.carried = carried;
  source.to = to;
  source.has_master = has_master;
  return group_entry(source, on_host);
}

// finish_step_ of a plan of `directions` directions.
inline GroupEntry finish_group(const double* plan,
                               int64_t directions,
                               const double* taken,
                               bool has_master,
                               bool on_host) {
  DeviceStepSource source;
  source.plan = plan;
  source.directions = directions;
  source.taken = taken;
  source.has_master = has_master;
  return group_entry(source, on_host);
}

// One tensor of an op: its contiguous data (the parameter, or a contiguous
// copy written back afterwards), its float32 master weight or nullptr, the
// element of the parameter its first element is (a shard of a sharded
// parameter draws the noise of its elements' places in the whole;
// docs/DESIGN.md, "Many processes"), its global index (which keys its
// noise) and its kernel group. Then what a low-rank perturbation needs: the
// parameter's columns (the product of its sizes after the first; 0 for one
// dimension, which is perturbed in full) and, when its group's step has a
// rank, its rows and its factors (noise.h) on its device: for each direction
// the step draws (its own, then the others), rank (rows + cols) floats.
struct TensorEntry {
  void* data;
  float* master;
  int64_t numel;
  int64_t offset;
  uint32_t index;
  uint32_t group;
  at::ScalarType dtype;
  int64_t cols = 0;
  int64_t rows = 0;
  const float* factors = nullptr;
};

// The factors of a low-rank perturbation along a step's own direction (slot
// 0) or its other direction slot - 1, in a TensorEntry's `factors`.
C10_HOST_DEVICE C10_ALWAYS_INLINE const float* factors_of(const float* factors,
                                                          int64_t rows,
                                                          int64_t cols,
                                                          uint32_t rank,
                                                          int64_t slot) {
  return factors + slot * static_cast<int64_t>(rank) * (rows + cols);
}

// What a backend runs: one entry per tensor and, beside them, one per kernel
// group (docs/DESIGN.md, "Kernels").
struct KernelTable {
  std::vector<TensorEntry> tensors;
  std::vector<GroupEntry> groups;
};

// The noise tiles of a tensor whose first element is element `offset` of its
// parameter: [first, first + count).
C10_HOST_DEVICE inline int64_t first_tile_of(int64_t offset) {
  return offset / noise::kTile;
}
C10_HOST_DEVICE inline int64_t tile_count(int64_t offset, int64_t numel) {
  return (offset + numel + noise::kTile - 1) / noise::kTile -
         first_tile_of(offset);
}

// x' = keep * (x - shift * z) - move * z in the arithmetic type T.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T apply(const engine::Coefficients& c,
                                          T x,
                                          T z) {
  return static_cast<T>(c.keep) * (x - static_cast<T>(c.shift) * z) -
         static_cast<T>(c.move) * z;
}

// A backend's kernels. `update` runs the table of one device; `plan` and
// `settle` run the state arithmetic (engine.h) where the state lives.
struct Backend {
  void (*update)(const KernelTable& table);
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
