#pragma once

#include <dopamine/options.h>

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <cstdint>
#include <vector>

namespace dopamine {

// O(1) state of one parameter group. It is kept in the optimizer's state map
// under the group's first parameter, so torch's serializer saves and restores
// it like any per-parameter state.
struct DopamineParamState
    : public torch::optim::OptimizerCloneableParamState<DopamineParamState> {
  // Steps taken by the group, skipped ones included; keys the noise.
  TORCH_ARG(int64_t, step) = 0;
  // Steps skipped because a loss was NaN or infinite.
  TORCH_ARG(int64_t, skipped_steps) = 0;
  // m_t, EMA of |delta| / sigma (rpe_normalized).
  TORCH_ARG(double, rpe_trace) = 0;
  // s_t, EMA of |delta| (rpe_tracking).
  TORCH_ARG(double, rpe_magnitude) = 0;
  // eta_t of the last completed step; eta_{t-1} of rpe_tracking.
  TORCH_ARG(double, current_lr) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const DopamineParamState& lhs,
                         const DopamineParamState& rhs);
};

// Dopamine: derivative-free, forward-only weight perturbation whose step size
// is adapted by the reward prediction error delta = L(theta + sigma z) -
// L(theta). See SPEC.md §2 for the rule and §3 for the guarantees.
class Dopamine : public torch::optim::Optimizer {
 public:
  explicit Dopamine(
      const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
      DopamineOptions defaults = {});
  explicit Dopamine(std::vector<torch::Tensor> params,
                    DopamineOptions defaults = {});

  // Evaluates `closure` exactly twice under NoGradGuard (unperturbed, then
  // perturbed) and returns the unperturbed loss. The closure is required.
  torch::Tensor step(LossClosure closure = nullptr) override;

  // Checks the group's parameters and options, then adds it. Its
  // DopamineOptions are used as given (no field is inherited from the
  // defaults); a group without options gets a copy of the defaults.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  // The state of group `group_index`, or nullptr before its first step.
  const DopamineParamState* group_state(size_t group_index) const;

 private:
  template <typename Self, typename Archive>
  static void serialize(Self& self, Archive& archive) {
    torch::optim::serialize<DopamineParamState, DopamineOptions>(archive, self);
  }
};

}  // namespace dopamine
