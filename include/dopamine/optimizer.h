#pragma once

#include <dopamine/options.h>
#include <dopamine/perturbation.h>

#include <ATen/core/Dict.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/ordered_dict.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

namespace dopamine {

namespace detail {
struct StepTable;
class TrajectoryRecorder;
}  // namespace detail

// The state of one parameter. Every parameter of a group holds the group's
// state tensor (ops.h: step, skipped_steps, rpe_trace, rpe_magnitude,
// current_lr, rpe_baseline), one tensor shared by all of them, so that
// reordering the group or replacing some of its parameters keeps it
// (docs/DESIGN.md, "State"). O(1) per parameter, but for the master weight of a
// bfloat16/float16 parameter under master_weights.
struct DopamineParamState
    : public torch::optim::OptimizerCloneableParamState<DopamineParamState> {
  // float64 [ops::kGroupStateSize], on the CPU, or on the parameters' device
  // when capturable.
  TORCH_ARG(torch::Tensor, group_state);
  // float32 copy of a bfloat16/float16 parameter; undefined otherwise.
  TORCH_ARG(torch::Tensor, master_weight);

 public:
  // The entries of group_state (a host synchronisation when it is on a GPU).
  int64_t step() const;
  int64_t skipped_steps() const;
  double rpe_trace() const;
  double rpe_magnitude() const;
  double current_lr() const;
  double rpe_baseline() const;

  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  // Equal group states and master weights.
  friend bool operator==(const DopamineParamState& lhs,
                         const DopamineParamState& rhs);
};

// The collectives of a distributed step (docs/DESIGN.md, "Many processes");
// dopamine/distributed.h makes them over a c10d process group.
class StepCollective {
 public:
  virtual ~StepCollective() = default;
  // Throws unless a step of `num_perturbations` directions can be shared
  // among the ranks.
  virtual void check(int64_t num_perturbations) const = 0;
  // Whether this rank evaluates the loss at perturbation `at` (one of
  // ops::evaluations).
  virtual bool evaluates(const ops::Perturbation& at) const = 0;
  // Every rank's losses from this rank's (float64, one per evaluation, 0
  // where this rank evaluates none); throws on every rank if any rank's
  // evaluation failed (that rank called fail).
  virtual torch::Tensor share_losses(const torch::Tensor& losses) = 0;
  // What the shared losses are, as errors name them.
  virtual std::string describe_losses() const = 0;
  // This rank's evaluation failed with `error` (its parameters restored):
  // joins the step's collective, as a step of `loss_count` losses, then
  // throws naming every failing rank.
  [[noreturn]] virtual void fail(const std::string& error,
                                 int64_t loss_count) = 0;
  // Called after every completed step with the parameters and master
  // weights it wrote and the first group's state (its step count on the
  // CPU): the step's hot path, so it reads them only when it needs to.
  virtual void after_step(const std::vector<torch::Tensor>& params,
                          const std::vector<torch::Tensor>& masters,
                          const torch::Tensor& state) = 0;
};

// Dopamine: derivative-free, forward-only weight perturbation whose step size
// is adapted by the reward prediction error delta = L(theta + sigma z) -
// L(theta). See docs/DESIGN.md for the rule, the step protocol and the
// guarantees.
class Dopamine : public torch::optim::Optimizer {
 public:
  explicit Dopamine(
      const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
      DopamineOptions defaults = {});
  explicit Dopamine(std::vector<torch::Tensor> params,
                    DopamineOptions defaults = {});
  // A module's named_parameters(); the names are kept (param_names) and
  // saved, and a checkpoint whose names differ is refused by load().
  explicit Dopamine(
      const torch::OrderedDict<std::string, torch::Tensor>& named_params,
      DopamineOptions defaults = {});

  // Evaluates `closure` under NoGradGuard, unperturbed and then perturbed
  // along each of the num_perturbations directions (k + 1 times), and returns
  // the unperturbed loss; with antithetic at theta + sigma z_j and theta -
  // sigma z_j for each j (2k times), returning their mean. Made data parallel
  // (set_collective), it returns the mean over the ranks. The closure is
  // required.
  // Parameters with requires_grad() false are left untouched.
  torch::Tensor step(LossClosure closure = nullptr) override;

  // Checks the group's parameters and options, then adds it. Its
  // DopamineOptions are used as given (no field is inherited from the
  // defaults); a group without options gets a copy of the defaults.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  void save(torch::serialize::OutputArchive& archive) const override;
  // Loads a checkpoint and checks it: its parameter names (when both have
  // them), its group states (dopamine::ops::check_state) and that the
  // parameters of a group agree on their group's state. A checkpoint that
  // fails leaves the optimizer as it was.
  void load(torch::serialize::InputArchive& archive) override;

  // The state of a parameter of group `group_index`, or nullptr before the
  // group's first step.
  const DopamineParamState* group_state(size_t group_index) const;

  // The names given with named parameters, in order; empty otherwise.
  const std::vector<std::string>& param_names() const {
    return param_names_;
  }

  // Records every later step as a few scalars, for trajectory() and
  // dopamine::replay (dopamine/trajectory.h); called before the first step,
  // so that a replay starts from the parameters the optimizer was given.
  void record_trajectory();
  // The steps recorded since record_trajectory(): the dict that
  // torch_dopamine's Dopamine.trajectory() returns, with the same keys and
  // values (docs/DESIGN.md, "Trajectory and replay"). torch::jit::pickle_save
  // writes it for Python's torch.load.
  c10::impl::GenericDict trajectory() const;

  // Every later step exchanges its losses through `collective` (nullptr:
  // none); dopamine::make_parallel (dopamine/distributed.h) sets it.
  void set_collective(std::shared_ptr<StepCollective> collective) {
    collective_ = std::move(collective);
  }

 private:
  std::vector<std::string> param_names_;
  std::shared_ptr<StepCollective> collective_;
  // Set by record_trajectory().
  std::shared_ptr<detail::TrajectoryRecorder> recorder_;
  // The defaults' and each group's options as last packed, with their
  // packed form: a step packs (and checks) only options that changed.
  std::vector<std::pair<DopamineOptions, std::vector<double>>> packed_;

  // Options `options` packed, from slot `slot` of packed_ while they stay
  // the same.
  const std::vector<double>& packed(size_t slot,
                                    const DopamineOptions& options);
  // The groups already warned about having no trainable parameter.
  std::unordered_set<size_t> warned_untrained_;

  // A step in its four phases (docs/DESIGN.md, "The step protocol"): the
  // snapshot of every group that has a trainable parameter; the
  // evaluations, returning the losses (float64, in plan_step's order; with a
  // process group, the ranks' mean) and the first loss as the closure
  // returned it; the finish, which plans, updates or skips, and raises for a
  // skipped step under NonFiniteLoss::Raise; and the commit of the states.
  using StepTable = detail::StepTable;
  StepTable snapshot();
  torch::Tensor evaluate(StepTable& table,
                         const LossClosure& closure,
                         torch::Tensor& returned);
  void finish(StepTable& table, const torch::Tensor& losses);
  void commit(const StepTable& table);

  // Warns, once per group, that the groups `untrained` (which have
  // parameters, none requiring grad) are not trained.
  void warn_untrained(const std::vector<size_t>& untrained,
                      bool step_trains_nothing);

  // Gives the group states of a checkpoint of format 1 (five entries) the
  // baseline b = 0.
  void pad_loaded_states();
  // Checks the group states just loaded and lets each group's parameters
  // share one state tensor again.
  void check_loaded_states();

  template <typename Self, typename Archive>
  static void serialize(Self& self, Archive& archive) {
    torch::optim::serialize<DopamineParamState, DopamineOptions>(archive, self);
  }
};

}  // namespace dopamine
