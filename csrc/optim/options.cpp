// The options of a group and the state of a parameter: their checks,
// comparison and serialization. The checks are the pack_options op's, so
// that C++ and Python refuse the same values (docs/DESIGN.md, "Adding an
// option").
#include <dopamine/ops.h>
#include <dopamine/optimizer.h>

#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
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
    case LrAdaptation::LossSpread:
      return "loss_spread";
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

std::string to_string(Perturbation perturbation) {
  switch (perturbation) {
    case Perturbation::Full:
      return "full";
    case Perturbation::LowRank:
      return "lowrank";
  }
  return "Perturbation(" + std::to_string(static_cast<int64_t>(perturbation)) +
         ")";
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

void DopamineOptions::validate() const {
  ops::pack_options(*this);
}

namespace {

// Every option, under the name the pack_options schema gives it: the one C++
// list of them, from which comparison, serialization and packing follow
// (docs/DESIGN.md, "Adding an option").
template <typename Options, typename Visit>
void for_each_option(Options& o, Visit&& visit) {
  visit("lr", o.lr());
  visit("sigma", o.sigma());
  visit("lr_adaptation", o.lr_adaptation());
  visit("beta", o.beta());
  visit("beta_s", o.beta_s());
  visit("beta_eta", o.beta_eta());
  visit("eps", o.eps());
  visit("lr_min", o.lr_min());
  visit("lr_max", o.lr_max());
  visit("weight_decay", o.weight_decay());
  visit("seed", o.seed());
  visit("noise", o.noise());
  visit("non_finite_loss", o.non_finite_loss());
  visit("capturable", o.capturable());
  visit("master_weights", o.master_weights());
  visit("antithetic", o.antithetic());
  visit("num_perturbations", o.num_perturbations());
  visit("restore_rng", o.restore_rng());
  visit("perturbation", o.perturbation());
  visit("rank", o.rank());
  visit("beta_baseline", o.beta_baseline());
}

// Whether every Dopamine checkpoint holds the option: those listed before
// antithetic, the first option added since checkpoints were first written,
// are; a checkpoint without one of them is another optimizer's.
bool in_every_checkpoint(const std::string& name) {
  for (const auto& [listed, value] : DopamineOptions().named_values()) {
    if (listed == "antithetic" || listed == name) {
      return listed == name && name != "antithetic";
    }
  }
  return false;
}

// The value an option takes when a checkpoint predates it, where its
// default would change that checkpoint's behaviour: the default is four
// directions, a checkpoint without the option took one.
std::optional<c10::IValue> older_checkpoint_value(const std::string& name) {
  if (name == "num_perturbations") {
    return c10::IValue(int64_t{1});
  }
  // Nor did it restore the random generators between evaluations, nor keep
  // a baseline of the RPEs.
  if (name == "restore_rng") {
    return c10::IValue(false);
  }
  if (name == "beta_baseline") {
    return c10::IValue();
  }
  return std::nullopt;
}

template <typename T>
c10::IValue to_ivalue(const T& value) {
  if constexpr (std::is_enum_v<T>) {
    return static_cast<int64_t>(value);
  } else {
    return value;
  }
}

template <typename T>
void from_ivalue(const c10::IValue& stored, T& value) {
  if constexpr (std::is_enum_v<T>) {
    value = static_cast<T>(stored.toInt());
  } else if constexpr (std::is_same_v<T, std::optional<double>>) {
    value = stored.isNone() ? std::nullopt
                            : std::optional<double>(stored.toDouble());
  } else {
    value = stored.to<T>();
  }
}

}  // namespace

std::vector<std::pair<const char*, c10::IValue>> DopamineOptions::named_values()
    const {
  std::vector<std::pair<const char*, c10::IValue>> values;
  values.reserve(21);
  for_each_option(*this, [&](const char* name, const auto& value) {
    values.emplace_back(name, to_ivalue(value));
  });
  return values;
}

bool operator==(const DopamineOptions& lhs, const DopamineOptions& rhs) {
  const auto left = lhs.named_values(), right = rhs.named_values();
  return std::equal(
      left.begin(),
      left.end(),
      right.begin(),
      [](const auto& l, const auto& r) { return l.second == r.second; });
}

void DopamineOptions::serialize(
    torch::serialize::OutputArchive& archive) const {
  for (const auto& [name, value] : named_values()) {
    archive.write(name, value);
  }
}

void DopamineOptions::serialize(torch::serialize::InputArchive& archive) {
  const auto default_values = DopamineOptions().named_values();
  const std::unordered_map<std::string, c10::IValue> defaults(
      default_values.begin(), default_values.end());
  for_each_option(*this, [&](const char* name, auto& value) {
    c10::IValue stored;
    if (archive.try_read(name, stored)) {
      from_ivalue(stored, value);
      return;
    }
    TORCH_CHECK(!in_every_checkpoint(name),
                "Dopamine: the checkpoint's options lack ",
                name,
                "; it is not a Dopamine optimizer's");
    // A checkpoint from before the option existed.
    from_ivalue(older_checkpoint_value(name).value_or(defaults.at(name)),
                value);
  });
  validate();
}

double DopamineOptions::get_lr() const {
  return lr();
}

void DopamineOptions::set_lr(const double lr) {
  this->lr(lr);
}

namespace {

double state_entry(const torch::Tensor& group_state, int64_t field) {
  return group_state[field].item<double>();
}

}  // namespace

int64_t DopamineParamState::step() const {
  return static_cast<int64_t>(state_entry(group_state(), 0));
}
int64_t DopamineParamState::skipped_steps() const {
  return static_cast<int64_t>(state_entry(group_state(), 1));
}
double DopamineParamState::rpe_trace() const {
  return state_entry(group_state(), 2);
}
double DopamineParamState::rpe_magnitude() const {
  return state_entry(group_state(), 3);
}
double DopamineParamState::current_lr() const {
  return state_entry(group_state(), 4);
}
double DopamineParamState::rpe_baseline() const {
  return state_entry(group_state(), 5);
}

namespace {

bool same_values(const torch::Tensor& lhs, const torch::Tensor& rhs) {
  return lhs.defined() == rhs.defined() &&
         (!lhs.defined() ||
          (lhs.sizes() == rhs.sizes() && torch::equal(lhs.cpu(), rhs.cpu())));
}

}  // namespace

bool operator==(const DopamineParamState& lhs, const DopamineParamState& rhs) {
  return same_values(lhs.group_state(), rhs.group_state()) &&
         same_values(lhs.master_weight(), rhs.master_weight());
}

void DopamineParamState::serialize(
    torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(group_state);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master_weight);
}

void DopamineParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, group_state);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, master_weight);
}

}  // namespace dopamine
