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

// The evaluations of a step, in plan_step's order (ops::evaluations).
struct Evaluations {
  bool antithetic = false;
  int64_t directions = 1;
  std::vector<ops::Evaluation> list;

  int64_t count() const {
    return static_cast<int64_t>(list.size());
  }
  const ops::Perturbation& at(int64_t i) const {
    return list[i].at;
  }
  // The name of evaluation i, as errors give it.
  const std::string& name(int64_t i) const {
    return list[i].name;
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
  Evaluations evaluations;
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
