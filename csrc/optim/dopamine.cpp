#include <dopamine/ops.h>
#include <dopamine/optimizer.h>

#include "step_table.h"

#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace dopamine {

using detail::Evaluations;
using detail::StepTable;

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

bool is_half(const torch::Tensor& param) {
  return param.scalar_type() == torch::kHalf ||
         param.scalar_type() == torch::kBFloat16;
}

// Evaluation i's loss as a float64 scalar, after checking what the closure
// returned (its name is built only for an error).
torch::Tensor loss_tensor(const torch::Tensor& loss,
                          const Evaluations& evaluations,
                          int64_t i) {
  TORCH_CHECK(loss.defined(),
              "Dopamine: the closure returned an undefined tensor as the ",
              evaluations.name(i),
              " loss; expected a scalar floating-point tensor");
  TORCH_CHECK(loss.numel() == 1 && loss.is_floating_point(),
              "Dopamine: the closure must return a scalar floating-point "
              "tensor; the ",
              evaluations.name(i),
              " loss has shape ",
              loss.sizes(),
              " and dtype ",
              loss.scalar_type());
  // A copy: a closure may return the same buffer at every call.
  return loss.detach().reshape({}).to(
      torch::kDouble, /*non_blocking=*/false, /*copy=*/true);
}

// The evaluations of a step. One evaluation serves every group, so all must
// agree on antithetic and num_perturbations (docs/DESIGN.md, "The
// algorithm").
Evaluations evaluations_of(
    const std::vector<torch::optim::OptimizerParamGroup>& groups,
    const DopamineOptions& defaults) {
  const auto& first = groups.empty() ? defaults : options_of(groups[0], 0);
  const bool antithetic = first.antithetic();
  const int64_t directions = first.num_perturbations();
  for (const auto g : c10::irange(groups.size())) {
    const auto& options = options_of(groups[g], g);
    TORCH_CHECK(options.antithetic() == antithetic,
                "Dopamine: invalid antithetic: ",
                options.antithetic() ? "true" : "false",
                " in parameter group ",
                g,
                ", ",
                antithetic ? "true" : "false",
                " in group 0; it must be the same in every group");
    TORCH_CHECK(options.num_perturbations() == directions,
                "Dopamine: invalid num_perturbations: ",
                options.num_perturbations(),
                " in parameter group ",
                g,
                ", ",
                directions,
                " in group 0; it must be the same in every group");
  }
  return {antithetic, directions, ops::evaluations(antithetic, directions)};
}

// Where a group's state lives: on the CPU, or with capturable on the
// device of its parameters, which must then share one.
torch::Device state_device(c10::ArrayRef<torch::Tensor> params,
                           bool capturable,
                           size_t group_index) {
  if (!capturable) {
    return torch::kCPU;
  }
  for (const auto& param : params) {
    TORCH_CHECK(param.device() == params.front().device(),
                "Dopamine: with capturable every parameter of group ",
                group_index,
                " must be on one device; found ",
                params.front().device(),
                " and ",
                param.device());
  }
  return params.front().device();
}

// torch's random generators (the CPU's, and those of the CUDA devices of
// `params`) as they were when made; restore() sets them so again, so that
// every evaluation of a step draws the same numbers (restore_rng).
class Generators {
 public:
  explicit Generators(const std::vector<torch::Tensor>& params)
      : cpu_(at::detail::getDefaultCPUGenerator()) {
    // The CPU generator's engine and cached normals, copied: a few
    // kilobytes, cheaper than get_state's tensor for a small model's step.
    {
      const std::lock_guard<std::mutex> lock(cpu_.mutex());
      auto* impl = cpu_.get<at::CPUGeneratorImpl>();
      engine_ = impl->engine();
      next_float_ = impl->next_float_normal_sample();
      next_double_ = impl->next_double_normal_sample();
    }
    for (const auto& param : params) {
      if (param.is_cuda() &&
          std::none_of(cuda_.begin(), cuda_.end(), [&](const auto& saved) {
            return saved.first.device() == param.device();
          })) {
        auto generator = at::globalContext().defaultGenerator(param.device());
        const std::lock_guard<std::mutex> lock(generator.mutex());
        auto state = generator.get_state();
        cuda_.emplace_back(std::move(generator), std::move(state));
      }
    }
  }

  void restore() {
    {
      const std::lock_guard<std::mutex> lock(cpu_.mutex());
      auto* impl = cpu_.get<at::CPUGeneratorImpl>();
      impl->set_engine(engine_);
      impl->set_next_float_normal_sample(next_float_);
      impl->set_next_double_normal_sample(next_double_);
    }
    for (auto& [generator, state] : cuda_) {
      const std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(state);
    }
  }

 private:
  at::Generator cpu_;
  at::mt19937 engine_;
  std::optional<float> next_float_;
  std::optional<double> next_double_;
  std::vector<std::pair<at::Generator, torch::Tensor>> cuda_;
};

// The version of the layout of a checkpoint (save()): 2 added rpe_baseline
// to the group state. A checkpoint of format 1, or saved before formats were
// numbered, loads with its group states given b = 0.
constexpr int64_t kCheckpointFormat = 2;

// The losses of a step as one float64 tensor, on the first loss's device;
// 0 for a loss another rank evaluates (undefined in `values`). Without
// capturable the states are on the CPU, and moving the losses there is the
// step's one host synchronisation.
torch::Tensor stack_losses(std::vector<torch::Tensor>& values) {
  const auto device =
      std::find_if(values.begin(),
                   values.end(),
                   [](const torch::Tensor& value) { return value.defined(); })
          ->device();
  for (auto& value : values) {
    value = value.defined()
                ? value.to(device)
                : torch::zeros({}, torch::dtype(torch::kDouble).device(device));
  }
  return torch::stack(values);
}

std::string message_of(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  return c10_error ? c10_error->what_without_backtrace() : error.what();
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

Dopamine::Dopamine(
    const torch::OrderedDict<std::string, torch::Tensor>& named_params,
    DopamineOptions defaults)
    : Dopamine(named_params.values(), std::move(defaults)) {
  param_names_ = named_params.keys();
}

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
  TORCH_CHECK(param_names_.empty(),
              "Dopamine: an optimizer built from named parameters takes no "
              "further groups");
  Optimizer::add_param_group(param_group);
  // Recent torch replaces a custom optimizer's group options with the
  // defaults; a group keeps the options it was given.
  if (param_group.has_options()) {
    param_groups_.back().set_options(param_group.options().clone());
  }
}

torch::Tensor Dopamine::step(LossClosure closure) {
  TORCH_CHECK(closure != nullptr,
              "Dopamine::step() needs a closure that returns the loss: each "
              "step evaluates the model unperturbed and along each "
              "perturbation");
  torch::NoGradGuard no_grad;
  StepTable table = snapshot();
  if (table.states.empty()) {
    // Nothing to perturb, so no collective either: every rank of a process
    // group has the same trainable parameters.
    auto loss = closure();
    loss_tensor(loss, table.evaluations, 0);
    return loss;
  }
  torch::Tensor returned;
  auto losses = evaluate(table, closure, returned);
  finish(table, losses);
  commit(table);
  // The loss the step evaluated, as the closure returned it: L0, or with
  // antithetic the mean of every evaluation (from the copies: a closure may
  // return the same buffer twice); with a process group, the ranks'.
  if (table.evaluations.antithetic || collective_) {
    return (table.evaluations.antithetic
                ? losses.sum() / static_cast<double>(losses.size(0))
                : losses[0])
        .to(returned.options());
  }
  return returned;
}

detail::StepTable Dopamine::snapshot() {
  const auto& defaults = static_cast<const DopamineOptions&>(this->defaults());
  packed(0, defaults);
  StepTable table;
  table.evaluations = evaluations_of(param_groups_, defaults);
  std::vector<size_t> untrained;
  int64_t index = 0;
  for (const auto g : c10::irange(param_groups_.size())) {
    const auto& all = param_groups_[g].params();
    const auto& options = options_of(param_groups_[g], g);
    const auto& group_packed = packed(g + 1, options);
    // A group changed since its last step (param_groups()) is checked again.
    if (std::any_of(all.begin(), all.end(), [&](const torch::Tensor& param) {
          return state_.find(state_key(param)) == state_.end();
        })) {
      check_params(all, g);
    }
    torch::Tensor state;
    std::vector<torch::Tensor> params, masters;
    std::vector<int64_t> indices;
    for (const auto i : c10::irange(all.size())) {
      const auto found = state_.find(state_key(all[i]));
      const auto* held =
          found == state_.end()
              ? nullptr
              : static_cast<const DopamineParamState*>(found->second.get());
      if (held != nullptr && held->group_state().defined()) {
        TORCH_CHECK(!state.defined() || state.is_same(held->group_state()),
                    "Dopamine: the parameters of group ",
                    g,
                    " hold the states of different groups (was a parameter "
                    "moved between groups?)");
        state = held->group_state();
      }
      if (!all[i].requires_grad()) {
        continue;
      }
      params.push_back(all[i]);
      indices.push_back(index + static_cast<int64_t>(i));
      if (defaults.master_weights() && is_half(all[i])) {
        masters.push_back(held != nullptr && held->master_weight().defined()
                              ? held->master_weight()
                              : all[i].detach().to(torch::kFloat).contiguous());
      }
    }
    index += static_cast<int64_t>(all.size());
    if (params.empty()) {
      if (!all.empty()) {
        untrained.push_back(g);
      }
      continue;
    }
    const auto device = state_device(params, defaults.capturable(), g);
    table.group_indices.push_back(g);
    table.add_group(
        options,
        group_packed,
        std::move(params),
        std::move(indices),
        std::move(masters),
        state.defined()
            ? state.to(device)
            : torch::zeros({ops::kGroupStateSize},
                           torch::dtype(torch::kDouble).device(device)));
  }
  if (recorder_ && !table.states.empty()) {
    recorder_->begin(table);
  }
  warn_untrained(untrained, table.states.empty());
  return table;
}

torch::Tensor Dopamine::evaluate(StepTable& table,
                                 const LossClosure& closure,
                                 torch::Tensor& returned) {
  const auto& evaluations = table.evaluations;
  const int64_t count = evaluations.count();
  if (collective_) {
    collective_->check(evaluations.directions);
  }
  // With Parallel::Population a rank evaluates some of the losses, and moves
  // through every perturbation all the same, so that every rank rounds alike
  // (docs/DESIGN.md, "Many processes"); the others stay undefined.
  std::vector<torch::Tensor> values(count);
  // The message of this rank's failure, with a process group.
  std::optional<std::string> failure;
  const auto& defaults = static_cast<const DopamineOptions&>(this->defaults());
  std::optional<Generators> generators;
  if (defaults.restore_rng()) {
    generators.emplace(table.params);
  }
  try {
    for (int64_t i = 0; i < count; ++i) {
      table.move_to(evaluations.at(i));
      if (failure ||
          (collective_ && !collective_->evaluates(evaluations.at(i)))) {
        continue;
      }
      if (generators && returned.defined()) {
        generators->restore();
      }
      try {
        auto loss = closure();
        values[i] = loss_tensor(loss, evaluations, i);
        returned = returned.defined() ? returned : loss;
      } catch (const std::exception& error) {
        if (!collective_) {
          throw;
        }
        // A rank whose closure failed still moves through every
        // perturbation the others do, so that all ranks round alike when
        // they restore (docs/DESIGN.md, "Many processes").
        failure = message_of(error);
      }
    }
  } catch (const std::exception& error) {
    table.restore();
    if (!collective_) {
      throw;
    }
    failure = message_of(error);
  } catch (...) {
    table.restore();
    throw;
  }
  if (failure) {
    table.restore();
    // The other ranks wait in the losses' all-reduce: join it, so that
    // every rank throws.
    collective_->fail(*failure, count);
  }
  auto losses = stack_losses(values);
  if (collective_) {
    try {
      losses = collective_->share_losses(losses);
    } catch (...) {
      table.restore();
      throw;
    }
  }
  return losses;
}

void Dopamine::finish(StepTable& table, const torch::Tensor& losses) {
  const auto& defaults = static_cast<const DopamineOptions&>(this->defaults());
  const bool raises = defaults.non_finite_loss() == NonFiniteLoss::Raise;
  const auto on_state_device = losses.to(table.states.front().device());
  std::vector<torch::Tensor> plans, saved;
  torch::Tensor taken;
  try {
    for (const auto g : c10::irange(table.states.size())) {
      plans.push_back(ops::plan_step(
          table.states[g], on_state_device, table.packed_options(g)));
      saved.push_back(raises ? table.states[g].clone() : torch::Tensor());
    }
    taken = table.finish(plans);
  } catch (...) {
    // finish_step_ checks everything before it writes: the parameters are
    // still perturbed.
    table.restore();
    throw;
  }
  if (!raises || taken.item<double>() != 0) {
    return;
  }
  for (const auto g : c10::irange(table.states.size())) {
    table.states[g].copy_(saved[g]);
  }
  const std::string where =
      collective_ ? " (" + collective_->describe_losses() + ")" : "";
  const auto values = losses.cpu();
  std::ostringstream all;
  for (int64_t i = 0; i < values.size(0); ++i) {
    const double value = values[i].item<double>();
    TORCH_CHECK(std::isfinite(value),
                "Dopamine: the ",
                table.evaluations.name(i),
                " loss is ",
                value,
                where,
                "; parameters restored, step not taken "
                "(non_finite_loss=Raise)");
    all << (i == 0 ? "" : i + 1 == values.size(0) ? " and " : ", ") << value;
  }
  TORCH_CHECK(false,
              "Dopamine: the step size is not finite (losses ",
              all.str(),
              "); parameters restored, step not taken "
              "(non_finite_loss=Raise)");
}

void Dopamine::commit(const StepTable& table) {
  // Every parameter of a group holds the group's state.
  size_t master = 0;
  for (const auto t : c10::irange(table.states.size())) {
    for (const auto& param : param_groups_[table.group_indices[t]].params()) {
      auto& slot = state_[state_key(param)];
      if (!slot) {
        slot = std::make_unique<DopamineParamState>();
      }
      static_cast<DopamineParamState&>(*slot).group_state(table.states[t]);
    }
  }
  for (const auto& param : table.params) {
    if (master < table.masters.size() && is_half(param)) {
      static_cast<DopamineParamState&>(*state_[state_key(param)])
          .master_weight(table.masters[master++]);
    }
  }
  if (collective_) {
    collective_->after_step(table.params, table.masters, table.states.front());
  }
}

const std::vector<double>& Dopamine::packed(size_t slot,
                                            const DopamineOptions& options) {
  if (packed_.size() <= slot) {
    packed_.resize(slot + 1);
  }
  auto& [cached, packed_options] = packed_[slot];
  if (packed_options.empty() || !(cached == options)) {
    packed_options = ops::pack_options(options);
    cached = options;
  }
  return packed_options;
}

void Dopamine::warn_untrained(const std::vector<size_t>& untrained,
                              bool step_trains_nothing) {
  for (const auto g : untrained) {
    if (!warned_untrained_.insert(g).second) {
      continue;
    }
    // A plain tensor does not require grad, and forward-only users have no
    // reason to set it: without this warning the optimizer silently trains
    // nothing (docs/DESIGN.md, "The step protocol").
    TORCH_WARN("Dopamine: none of the ",
               param_groups_[g].params().size(),
               " parameter(s) of group ",
               g,
               " requires grad, so ",
               step_trains_nothing ? "step() trains nothing"
                                   : "that group is not trained",
               ". Dopamine needs no gradients, but like torch's optimizers "
               "it trains only parameters with requires_grad: call "
               "requires_grad_() on them (a plain tensor, such as "
               "torch::zeros({8}) or one registered on a TorchScript "
               "module, does not require grad).");
  }
}

void Dopamine::save(torch::serialize::OutputArchive& archive) const {
  serialize(*this, archive);
  archive.write("dopamine_format", kCheckpointFormat);
  archive.write("param_names",
                c10::IValue(c10::List<std::string>(param_names_)));
}

void Dopamine::load(torch::serialize::InputArchive& archive) {
  // A checkpoint saved before formats were numbered has format 1's layout.
  c10::IValue saved_format;
  const int64_t format = !archive.try_read("dopamine_format", saved_format) ? 1
                         : saved_format.isInt() ? saved_format.toInt()
                                                : -1;
  TORCH_CHECK(format == 1 || format == kCheckpointFormat,
              "Dopamine::load: the checkpoint is of format ",
              format,
              "; this version reads formats 1 to ",
              kCheckpointFormat,
              " (and checkpoints saved before formats were numbered)");
  c10::IValue names;
  if (archive.try_read("param_names", names) && !param_names_.empty()) {
    std::vector<std::string> saved_names;
    for (const c10::IValue name : names.toList()) {
      saved_names.push_back(name.toStringRef());
    }
    TORCH_CHECK(saved_names.empty() || saved_names == param_names_,
                "Dopamine::load: the checkpoint's parameter names differ from "
                "this optimizer's (were the parameters reordered or renamed?)");
  }
  // A checkpoint that fails a check leaves the optimizer as it was.
  std::decay_t<decltype(state_)> saved_state;
  for (const auto& [key, value] : state_) {
    saved_state[key] = value->clone();
  }
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> saved_options;
  for (const auto& group : param_groups_) {
    saved_options.push_back(group.options().clone());
  }
  try {
    serialize(*this, archive);
    if (format == 1) {
      pad_loaded_states();
    }
    check_loaded_states();
  } catch (...) {
    state_ = std::move(saved_state);
    for (const auto g : c10::irange(param_groups_.size())) {
      param_groups_[g].set_options(std::move(saved_options[g]));
    }
    throw;
  }
}

void Dopamine::pad_loaded_states() {
  for (auto& [key, value] : state_) {
    auto& state = static_cast<DopamineParamState&>(*value);
    const auto& group_state = state.group_state();
    // Any other shape is check_state's to refuse.
    if (group_state.defined() && group_state.dim() == 1 &&
        group_state.size(0) == ops::kGroupStateSize - 1) {
      state.group_state(torch::cat({group_state, group_state.new_zeros({1})}));
    }
  }
}

void Dopamine::check_loaded_states() {
  // Each parameter was loaded with a copy of its group's state: check it,
  // and let the group's parameters share one again.
  for (const auto g : c10::irange(param_groups_.size())) {
    torch::Tensor shared;
    for (const auto& param : param_groups_[g].params()) {
      const auto found = state_.find(state_key(param));
      if (found == state_.end()) {
        continue;
      }
      auto& state = static_cast<DopamineParamState&>(*found->second);
      TORCH_CHECK(state.group_state().defined(),
                  "Dopamine::load: a parameter of group ",
                  g,
                  " has a state without group_state; not a Dopamine "
                  "checkpoint");
      ops::check_state(state.group_state());
      if (!shared.defined()) {
        shared = state.group_state();
      }
      TORCH_CHECK(torch::equal(shared.cpu(), state.group_state().cpu()),
                  "Dopamine::load: the parameters of group ",
                  g,
                  " hold different group states");
      state.group_state(shared);
      if (state.master_weight().defined()) {
        TORCH_CHECK(state.master_weight().scalar_type() == torch::kFloat &&
                        state.master_weight().numel() == param.numel(),
                    "Dopamine::load: a master weight of group ",
                    g,
                    " is not a float32 tensor of its parameter's size");
        state.master_weight(state.master_weight().to(param.device()));
      }
    }
  }
}

const DopamineParamState* Dopamine::group_state(size_t group_index) const {
  TORCH_CHECK(group_index < param_groups_.size(),
              "Dopamine: no parameter group ",
              group_index,
              " (there are ",
              param_groups_.size(),
              ")");
  for (const auto& param : param_groups_[group_index].params()) {
    const auto found = state_.find(state_key(param));
    if (found != state_.end()) {
      return static_cast<const DopamineParamState*>(found->second.get());
    }
  }
  return nullptr;
}

}  // namespace dopamine
