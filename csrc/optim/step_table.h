#pragma once

// What the C++ optimizer's step and dopamine::replay share: a step's table of
// groups as the step ops take it, moved between perturbations and finished
// (docs/DESIGN.md, "The step protocol"), and the recorder of a trajectory
// ("Trajectory and replay"). Internal: not installed.
#include <dopamine/ops.h>
#include <dopamine/options.h>

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dopamine::detail {

// The evaluations of a step (docs/DESIGN.md, "The algorithm"): L0, then
// L(theta + sigma z_j) for each direction j; or with antithetic L(theta +
// sigma z_j) and L(theta - sigma z_j) for each j, in plan_step's order.
struct Evaluations {
  bool antithetic;
  int64_t directions;

  int64_t count() const {
    return antithetic ? 2 * directions : directions + 1;
  }
  // Evaluation i is at offset(i) * sigma * z_direction(i).
  int64_t offset(int64_t i) const {
    return antithetic ? (i % 2 == 0 ? 1 : -1) : (i > 0);
  }
  int64_t direction(int64_t i) const {
    return antithetic ? i / 2 : std::max<int64_t>(i - 1, 0);
  }
  ops::Perturbation at(int64_t i) const {
    return {offset(i), direction(i)};
  }
  // The name of evaluation i, as errors give it.
  std::string name(int64_t i) const {
    const std::string z =
        directions == 1 ? "z" : "z_" + std::to_string(direction(i));
    if (offset(i) == 0) {
      return "unperturbed";
    }
    if (!antithetic) {
      return directions == 1 ? "perturbed" : "theta + sigma " + z;
    }
    return std::string("theta ") + (offset(i) > 0 ? "+" : "-") + " sigma " + z;
  }
};

// A step's share of every group that has a trainable parameter, taken when
// the step starts (the snapshot), as the ops take it: the groups' options,
// also packed one after the other; their trainable parameters with their
// global indices (which key their noise), master weights and states; the
// perturbation the parameters carry; and the trajectory's record of the
// step, when one is kept.
struct StepTable {
  std::vector<size_t> group_indices;
  std::vector<DopamineOptions> options;
  std::vector<double> packed;
  std::vector<at::Tensor> params, masters, states;
  std::vector<int64_t> indices, group_sizes;
  ops::Perturbation carried;
  Evaluations evaluations{false, 1};
  std::optional<c10::impl::GenericDict> record;

  // Adds a group of these options (`packed` as pack_options returns them)
  // and tensors.
  void add_group(const DopamineOptions& group_options,
                 const std::vector<double>& group_packed,
                 std::vector<at::Tensor> group_params,
                 std::vector<int64_t> group_indices_of_params,
                 std::vector<at::Tensor> group_masters,
                 at::Tensor state);
  // Group t's packed options.
  c10::ArrayRef<double> packed_options(size_t t) const;
  // Every group comes to carry `to` (nothing to do if it does).
  void move_to(ops::Perturbation to);
  void restore() {
    move_to({0, 0});
  }
  // finish_step_ over every group; returns whether the step was taken. The
  // parameters then carry no perturbation.
  at::Tensor finish(const std::vector<at::Tensor>& plans);
};

// Records the steps of one optimizer into a trajectory: the dict
// torch_dopamine's Dopamine.trajectory() returns, with the same keys and
// values (docs/DESIGN.md, "Trajectory and replay").
class TrajectoryRecorder {
 public:
  explicit TrajectoryRecorder(bool master_weights);
  // Starts the record of a step over `table`'s groups, numbered by their
  // states (a host synchronisation where a state is on a GPU).
  void begin(StepTable& table);
  const c10::impl::GenericDict& trajectory() const {
    return trajectory_;
  }

 private:
  c10::impl::GenericDict trajectory_;
  c10::impl::GenericList layouts_, steps_;
  // Each layout as text, to find one already stored.
  std::vector<std::string> layout_keys_;
};

}  // namespace dopamine::detail
