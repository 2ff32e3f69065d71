#include <dopamine/ops.h>
#include <dopamine/optimizer.h>

#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <c10/util/irange.h>

#include <cmath>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace dopamine {

std::string to_string(LrAdaptation mode) {
  switch (mode) {
    case LrAdaptation::None:
      return "none";
    case LrAdaptation::RpeNormalized:
      return "rpe_normalized";
    case LrAdaptation::RpeTracking:
      return "rpe_tracking";
  }
  return "LrAdaptation(" + std::to_string(static_cast<int64_t>(mode)) + ")";
}

std::string to_string(Noise noise) {
  switch (noise) {
    case Noise::Gaussian:
      return "gaussian";
    case Noise::Rademacher:
      return "rademacher";
  }
  return "Noise(" + std::to_string(static_cast<int64_t>(noise)) + ")";
}

std::string to_string(NonFiniteLoss policy) {
  switch (policy) {
    case NonFiniteLoss::Skip:
      return "skip";
    case NonFiniteLoss::Raise:
      return "raise";
  }
  return "NonFiniteLoss(" + std::to_string(static_cast<int64_t>(policy)) + ")";
}

DopamineOptions::DopamineOptions(double lr) : lr_(lr) {}

namespace {

ops::LrAdaptationParams lr_adaptation_params(const DopamineOptions& options) {
  return {options.lr(),
          options.sigma(),
          options.beta(),
          options.beta_s(),
          options.beta_eta(),
          options.eps(),
          options.lr_min(),
          options.lr_max()};
}

}  // namespace

void DopamineOptions::validate() const {
  ops::check_options(lr_adaptation_params(*this),
                     to_string(lr_adaptation()),
                     weight_decay(),
                     to_string(noise()),
                     to_string(non_finite_loss()));
}

bool operator==(const DopamineOptions& lhs, const DopamineOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.sigma() == rhs.sigma() &&
         lhs.lr_adaptation() == rhs.lr_adaptation() &&
         lhs.beta() == rhs.beta() && lhs.beta_s() == rhs.beta_s() &&
         lhs.beta_eta() == rhs.beta_eta() && lhs.eps() == rhs.eps() &&
         lhs.lr_min() == rhs.lr_min() && lhs.lr_max() == rhs.lr_max() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.seed() == rhs.seed() &&
         lhs.noise() == rhs.noise() &&
         lhs.non_finite_loss() == rhs.non_finite_loss();
}

void DopamineOptions::serialize(
    torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(sigma);
  archive.write("lr_adaptation", static_cast<int64_t>(lr_adaptation()));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(beta);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(beta_s);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(beta_eta);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr_min);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr_max);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  archive.write("noise", static_cast<int64_t>(noise()));
  archive.write("non_finite_loss", static_cast<int64_t>(non_finite_loss()));
}

void DopamineOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, sigma);
  c10::IValue mode;
  archive.read("lr_adaptation", mode);
  lr_adaptation(static_cast<LrAdaptation>(mode.toInt()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, beta);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, beta_s);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, beta_eta);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG_OPTIONAL(double, lr_min);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG_OPTIONAL(double, lr_max);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
  c10::IValue noise_kind;
  archive.read("noise", noise_kind);
  noise(static_cast<Noise>(noise_kind.toInt()));
  c10::IValue policy;
  archive.read("non_finite_loss", policy);
  non_finite_loss(static_cast<NonFiniteLoss>(policy.toInt()));
  validate();
}

double DopamineOptions::get_lr() const {
  return lr();
}

void DopamineOptions::set_lr(const double lr) {
  this->lr(lr);
}

bool operator==(const DopamineParamState& lhs, const DopamineParamState& rhs) {
  return lhs.step() == rhs.step() &&
         lhs.skipped_steps() == rhs.skipped_steps() &&
         lhs.rpe_trace() == rhs.rpe_trace() &&
         lhs.rpe_magnitude() == rhs.rpe_magnitude() &&
         lhs.current_lr() == rhs.current_lr();
}

void DopamineParamState::serialize(
    torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skipped_steps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rpe_trace);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rpe_magnitude);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(current_lr);
}

void DopamineParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, skipped_steps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, rpe_trace);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, rpe_magnitude);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, current_lr);
}

namespace {

// torch keys optimizer state by TensorImpl* since 2.x and by the pointer's
// text before; the key follows the map's own type.
using StateKey = std::decay_t<
    decltype(std::declval<const torch::optim::Optimizer&>().state())>::key_type;

template <typename Key = StateKey>
Key state_key(const torch::Tensor& param) {
  void* impl = param.unsafeGetTensorImpl();
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream text;
    text << impl;
    return text.str();
  } else {
    return impl;
  }
}

const DopamineOptions& options_of(
    const torch::optim::OptimizerParamGroup& group, size_t group_index) {
  const auto* options = dynamic_cast<const DopamineOptions*>(&group.options());
  TORCH_CHECK(options != nullptr,
              "Dopamine: parameter group ",
              group_index,
              " has options of another optimizer; expected DopamineOptions");
  return *options;
}

void check_params(const std::vector<torch::Tensor>& params,
                  size_t group_index) {
  for (const auto i : c10::irange(params.size())) {
    const auto& param = params[i];
    TORCH_CHECK(param.defined(),
                "Dopamine: parameter ",
                i,
                " of group ",
                group_index,
                " is an undefined tensor");
    TORCH_CHECK(param.is_floating_point(),
                "Dopamine: parameter ",
                i,
                " of group ",
                group_index,
                " has dtype ",
                param.scalar_type(),
                "; expected a floating-point tensor");
    TORCH_CHECK(param.layout() == torch::kStrided,
                "Dopamine: parameter ",
                i,
                " of group ",
                group_index,
                " has layout ",
                param.layout(),
                "; sparse parameters are not supported");
    TORCH_CHECK(param.is_leaf(),
                "Dopamine: parameter ",
                i,
                " of group ",
                group_index,
                " is not a leaf tensor; optimize the tensor it was computed "
                "from");
  }
}

double loss_value(const torch::Tensor& loss, const char* which) {
  TORCH_CHECK(loss.defined(),
              "Dopamine: the closure returned an undefined tensor as the ",
              which,
              " loss; expected a scalar floating-point tensor");
  TORCH_CHECK(loss.numel() == 1 && loss.is_floating_point(),
              "Dopamine: the closure must return a scalar floating-point "
              "tensor; the ",
              which,
              " loss has shape ",
              loss.sizes(),
              " and dtype ",
              loss.scalar_type());
  return loss.item<double>();
}

// eta_t for this step (SPEC §2.5); advances the group's traces in `state`,
// whose step() already counts this step.
double adapt_lr(const DopamineOptions& options,
                DopamineParamState& state,
                double delta) {
  const auto next = ops::adapt_lr(
      to_string(options.lr_adaptation()),
      delta,
      state.step() - state.skipped_steps(),
      lr_adaptation_params(options),
      {state.rpe_trace(), state.rpe_magnitude(), state.current_lr()});
  state.rpe_trace(next.rpe_trace);
  state.rpe_magnitude(next.rpe_magnitude);
  state.current_lr(next.lr);
  return next.lr;
}

}  // namespace

Dopamine::Dopamine(
    const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
    DopamineOptions defaults)
    : Optimizer(std::vector<torch::optim::OptimizerParamGroup>{},
                std::make_unique<DopamineOptions>(defaults)) {
  defaults.validate();
  for (const auto& group : param_groups) {
    add_param_group(group);
  }
}

Dopamine::Dopamine(std::vector<torch::Tensor> params, DopamineOptions defaults)
    : Dopamine({torch::optim::OptimizerParamGroup(std::move(params))},
               std::move(defaults)) {}

void Dopamine::add_param_group(
    const torch::optim::OptimizerParamGroup& param_group) {
  const size_t g = param_groups_.size();
  if (param_group.has_options()) {
    options_of(param_group, g).validate();
  }
  check_params(param_group.params(), g);
  std::unordered_set<const void*> seen;
  for (const auto& group : param_groups_) {
    for (const auto& param : group.params()) {
      seen.insert(param.unsafeGetTensorImpl());
    }
  }
  for (const auto& param : param_group.params()) {
    TORCH_CHECK(seen.insert(param.unsafeGetTensorImpl()).second,
                "Dopamine: a parameter of group ",
                g,
                " appears more than once among the parameter groups");
  }
  Optimizer::add_param_group(param_group);
  // Recent torch replaces a custom optimizer's group options with the
  // defaults; a group keeps the options it was given.
  if (param_group.has_options()) {
    param_groups_.back().set_options(param_group.options().clone());
  }
}

namespace {

// One parameter group's share of a step: what it perturbs and its next state,
// committed only when the step completes.
struct GroupStep {
  const DopamineOptions& options;
  const std::vector<torch::Tensor>& params;
  int64_t first_index;
  DopamineParamState next;

  void perturb(double sigma) const {
    ops::perturb_(params,
                  options.seed(),
                  next.step(),
                  first_index,
                  sigma,
                  to_string(options.noise()));
  }
};

}  // namespace

torch::Tensor Dopamine::step(LossClosure closure) {
  TORCH_CHECK(closure != nullptr,
              "Dopamine::step() needs a closure that returns the loss: each "
              "step evaluates the model twice, unperturbed and perturbed");
  torch::NoGradGuard no_grad;

  std::vector<GroupStep> groups;
  groups.reserve(param_groups_.size());
  int64_t first_index = 0;
  for (const auto g : c10::irange(param_groups_.size())) {
    const auto& params = param_groups_[g].params();
    const auto& options = options_of(param_groups_[g], g);
    options.validate();
    if (!params.empty()) {
      const auto found = state_.find(state_key(params.front()));
      DopamineParamState next;
      if (found != state_.end()) {
        next = static_cast<const DopamineParamState&>(*found->second);
      } else {
        // Catches a group added through Optimizer::add_param_group, which
        // bypasses Dopamine::add_param_group.
        check_params(params, g);
      }
      next.step(next.step() + 1);
      groups.push_back({options, params, first_index, std::move(next)});
    }
    first_index += static_cast<int64_t>(params.size());
  }

  auto commit = [this](const GroupStep& group) {
    auto& slot = state_[state_key(group.params.front())];
    if (slot) {
      static_cast<DopamineParamState&>(*slot) = group.next;
    } else {
      slot = std::make_unique<DopamineParamState>(group.next);
    }
  };
  auto restore = [&groups](size_t count) {
    for (const auto g : c10::irange(count)) {
      groups[g].perturb(-groups[g].options.sigma());
    }
  };
  // A non-finite loss leaves the parameters as they were before the step.
  auto non_finite =
      [&](const torch::Tensor& loss, double value, const char* which) {
        const auto policy =
            static_cast<const DopamineOptions&>(defaults()).non_finite_loss();
        TORCH_CHECK(policy == NonFiniteLoss::Skip,
                    "Dopamine: the ",
                    which,
                    " loss is ",
                    value,
                    "; parameters restored, step not taken "
                    "(non_finite_loss=Raise)");
        for (auto& group : groups) {
          group.next.skipped_steps(group.next.skipped_steps() + 1);
          commit(group);
        }
        return loss;
      };

  const torch::Tensor loss = closure();
  const double unperturbed = loss_value(loss, "unperturbed");
  if (!std::isfinite(unperturbed)) {
    return non_finite(loss, unperturbed, "unperturbed");
  }

  size_t perturbed_groups = 0;
  double perturbed = 0;
  try {
    for (; perturbed_groups < groups.size(); ++perturbed_groups) {
      groups[perturbed_groups].perturb(
          groups[perturbed_groups].options.sigma());
    }
    perturbed = loss_value(closure(), "perturbed");
  } catch (...) {
    restore(perturbed_groups);
    throw;
  }
  if (!std::isfinite(perturbed)) {
    restore(groups.size());
    return non_finite(loss, perturbed, "perturbed");
  }

  const double delta = perturbed - unperturbed;
  for (auto& group : groups) {
    const auto& options = group.options;
    const double lr = adapt_lr(options, group.next, delta);
    ops::restore_update_(group.params,
                         options.seed(),
                         group.next.step(),
                         group.first_index,
                         options.sigma(),
                         lr * delta / options.sigma(),
                         options.lr() * options.weight_decay(),
                         to_string(options.noise()));
    commit(group);
  }
  return loss;
}

void Dopamine::save(torch::serialize::OutputArchive& archive) const {
  serialize(*this, archive);
}

void Dopamine::load(torch::serialize::InputArchive& archive) {
  serialize(*this, archive);
}

const DopamineParamState* Dopamine::group_state(size_t group_index) const {
  TORCH_CHECK(group_index < param_groups_.size(),
              "Dopamine: no parameter group ",
              group_index,
              " (there are ",
              param_groups_.size(),
              ")");
  const auto& params = param_groups_[group_index].params();
  if (params.empty()) {
    return nullptr;
  }
  const auto found = state_.find(state_key(params.front()));
  return found == state_.end()
             ? nullptr
             : static_cast<const DopamineParamState*>(found->second.get());
}

}  // namespace dopamine
