// The options of a group and the state of a parameter: their checks,
// comparison and serialization. The checks are the pack_options op's, so
// that C++ and Python refuse the same values (docs/DESIGN.md, "Adding an
// option").
#include <dopamine/ops.h>
#include <dopamine/optimizer.h>

#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <string>

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

void DopamineOptions::validate() const {
  ops::pack_options(*this);
}

bool operator==(const DopamineOptions& lhs, const DopamineOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.sigma() == rhs.sigma() &&
         lhs.lr_adaptation() == rhs.lr_adaptation() &&
         lhs.beta() == rhs.beta() && lhs.beta_s() == rhs.beta_s() &&
         lhs.beta_eta() == rhs.beta_eta() && lhs.eps() == rhs.eps() &&
         lhs.lr_min() == rhs.lr_min() && lhs.lr_max() == rhs.lr_max() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.seed() == rhs.seed() &&
         lhs.noise() == rhs.noise() &&
         lhs.non_finite_loss() == rhs.non_finite_loss() &&
         lhs.capturable() == rhs.capturable() &&
         lhs.master_weights() == rhs.master_weights() &&
         lhs.antithetic() == rhs.antithetic() &&
         lhs.num_perturbations() == rhs.num_perturbations();
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
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(capturable);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master_weights);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(antithetic);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(num_perturbations);
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
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, capturable);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, master_weights);
  // Checkpoints written before the option existed are not antithetic.
  c10::IValue antithetic_flag;
  antithetic(archive.try_read("antithetic", antithetic_flag) &&
             antithetic_flag.toBool());
  // ... and take one direction.
  c10::IValue directions;
  num_perturbations(archive.try_read("num_perturbations", directions)
                        ? directions.toInt()
                        : 1);
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
