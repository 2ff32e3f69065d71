// A step's table of groups, the recorder of a trajectory and its replay
// (docs/DESIGN.md, "The step protocol" and "Trajectory and replay"). The
// trajectory has the layout of torch_dopamine's, so that either front end
// replays what the other recorded.
#include <dopamine/ops.h>
#include <dopamine/optimizer.h>
#include <dopamine/trajectory.h>

#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <c10/util/irange.h>

#include <cmath>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "step_table.h"

namespace dopamine {
namespace {

// 4: plans carry the next state's rpe_baseline (3: layouts give each
// group's perturbation and rank, and plans their rank; 2: moves name their
// direction, and plans end with one step size per direction); the same
// number as torch_dopamine's.
constexpr int64_t kTrajectoryFormat = 4;

c10::impl::GenericList any_list() {
  return c10::impl::GenericList(c10::AnyType::get());
}

// The items of a list or a tuple (a trajectory that went through JSON has
// lists where the recorder wrote tuples).
std::vector<c10::IValue> items(const c10::IValue& value, const char* what) {
  if (value.isTuple()) {
    const auto& elements = value.toTupleRef().elements();
    // Not braces: an initializer list of IValues would take the iterators.
    return std::vector<c10::IValue>(elements.begin(), elements.end());
  }
  TORCH_CHECK(value.isList(),
              "dopamine::replay: ",
              what,
              " must be a list or a tuple, got ",
              value.tagKind());
  const auto list = value.toList();
  return std::vector<c10::IValue>(list.begin(), list.end());
}

double number(const c10::IValue& value) {
  return value.isInt() ? static_cast<double>(value.toInt()) : value.toDouble();
}

}  // namespace

namespace detail {

void StepTable::add_group(const DopamineOptions& group_options,
                          const std::vector<double>& group_packed,
                          std::vector<at::Tensor> group_params,
                          std::vector<int64_t> group_indices_of_params,
                          std::vector<at::Tensor> group_masters,
                          at::Tensor state) {
  options.push_back(group_options);
  packed.insert(packed.end(), group_packed.begin(), group_packed.end());
  group_sizes.push_back(static_cast<int64_t>(group_params.size()));
  params.insert(params.end(), group_params.begin(), group_params.end());
  indices.insert(indices.end(),
                 group_indices_of_params.begin(),
                 group_indices_of_params.end());
  masters.insert(masters.end(), group_masters.begin(), group_masters.end());
  states.push_back(std::move(state));
}

c10::ArrayRef<double> StepTable::packed_options(size_t t) const {
  const size_t size = packed.size() / states.size();
  return c10::ArrayRef<double>(packed).slice(t * size, size);
}

void StepTable::move_to(ops::Perturbation to) {
  if (to.offset == carried.offset &&
      (to.offset == 0 || to.direction == carried.direction)) {
    return;
  }
  ops::move_(
      params, masters, states, packed, indices, group_sizes, carried, to);
  carried = to;
  if (record) {
    record->at("moves").toList().push_back(c10::ivalue::Tuple::create(
        {to.offset, to.direction, static_cast<int64_t>(states.size())}));
  }
}

at::Tensor StepTable::finish(const std::vector<at::Tensor>& plans) {
  auto taken =
      ops::finish_step_(params, masters, states, plans, indices, group_sizes);
  carried = {0, 0};
  if (record) {
    auto recorded = any_list();
    for (const auto& plan : plans) {
      const auto values = plan.cpu();
      recorded.push_back(c10::List<double>(c10::ArrayRef<double>(
          values.data_ptr<double>(), static_cast<size_t>(values.numel()))));
    }
    record->insert_or_assign("plans", recorded);
  }
  return taken;
}

TrajectoryRecorder::TrajectoryRecorder(bool master_weights)
    : trajectory_(c10::StringType::get(), c10::AnyType::get()),
      layouts_(any_list()),
      steps_(any_list()) {
  trajectory_.insert("format", kTrajectoryFormat);
  trajectory_.insert("master_weights", master_weights);
  trajectory_.insert("layouts", layouts_);
  trajectory_.insert("steps", steps_);
}

void TrajectoryRecorder::begin(StepTable& table) {
  // A group's layout: its parameters' global indices, seed, sigma, noise
  // code, perturbation code and rank; a layout is stored once, and steps
  // refer to it.
  auto layout = any_list();
  std::ostringstream key;
  key << std::hexfloat;
  size_t first = 0;
  for (const auto t : c10::irange(table.states.size())) {
    const auto& o = table.options[t];
    const std::vector<int64_t> group_indices(
        table.indices.begin() + first,
        table.indices.begin() + first + table.group_sizes[t]);
    first += table.group_sizes[t];
    // As Python records it: [indices as a tuple, seed, sigma, noise code,
    // perturbation code, rank].
    std::vector<c10::IValue> index_values(group_indices.begin(),
                                          group_indices.end());
    auto group = any_list();
    group.push_back(c10::ivalue::Tuple::create(std::move(index_values)));
    group.push_back(o.seed());
    group.push_back(o.sigma());
    group.push_back(static_cast<int64_t>(o.noise()));
    group.push_back(static_cast<int64_t>(o.perturbation()));
    group.push_back(o.rank());
    layout.push_back(group);
    key << '[';
    for (const auto index : group_indices) {
      key << index << ',';
    }
    key << ']' << o.seed() << ',' << o.sigma() << ','
        << static_cast<int64_t>(o.noise()) << ','
        << static_cast<int64_t>(o.perturbation()) << ',' << o.rank() << ';';
  }
  auto found = std::find(layout_keys_.begin(), layout_keys_.end(), key.str());
  if (found == layout_keys_.end()) {
    layout_keys_.push_back(key.str());
    layouts_.push_back(layout);
    found = std::prev(layout_keys_.end());
  }
  c10::List<int64_t> steps;
  for (const auto& state : table.states) {
    steps.push_back(static_cast<int64_t>(state[0].item<double>()) + 1);
  }
  c10::impl::GenericDict record(c10::StringType::get(), c10::AnyType::get());
  record.insert("layout", static_cast<int64_t>(found - layout_keys_.begin()));
  record.insert("steps", steps);
  record.insert("moves", any_list());
  record.insert("plans", c10::IValue());
  steps_.push_back(record);
  table.record = record;
}

}  // namespace detail

void Dopamine::record_trajectory() {
  TORCH_CHECK(state_.empty(),
              "Dopamine::record_trajectory: call it before the first step, "
              "so that a replay starts from the parameters the optimizer "
              "was given");
  const auto& defaults = static_cast<const DopamineOptions&>(this->defaults());
  recorder_ =
      std::make_shared<detail::TrajectoryRecorder>(defaults.master_weights());
}

c10::impl::GenericDict Dopamine::trajectory() const {
  TORCH_CHECK(recorder_ != nullptr,
              "Dopamine::trajectory() needs record_trajectory() called "
              "before the first step");
  return recorder_->trajectory();
}

void replay(const std::vector<at::Tensor>& params,
            const c10::IValue& trajectory) {
  const c10::NoGradGuard no_grad;
  const bool has_format = trajectory.isGenericDict() &&
                          trajectory.toGenericDict().contains("format") &&
                          trajectory.toGenericDict().at("format").isInt();
  TORCH_CHECK(has_format && trajectory.toGenericDict().at("format").toInt() ==
                                kTrajectoryFormat,
              "dopamine::replay: not a trajectory of format ",
              kTrajectoryFormat,
              " (from Dopamine::trajectory()); got ",
              has_format
                  ? "format " +
                        std::to_string(
                            trajectory.toGenericDict().at("format").toInt()) +
                        " (an earlier version's: replay it with that version)"
                  : std::string("no format"));
  const auto dict = trajectory.toGenericDict();
  const bool master_weights = dict.at("master_weights").toBool();
  const auto layouts = items(dict.at("layouts"), "layouts");
  const auto steps = items(dict.at("steps"), "steps");
  // Checked before anything is written.
  for (const auto& layout : layouts) {
    for (const auto& group : items(layout, "a layout")) {
      for (const auto& index : items(items(group, "a group")[0], "indices")) {
        TORCH_CHECK(index.toInt() >= 0 &&
                        index.toInt() < static_cast<int64_t>(params.size()),
                    "dopamine::replay: the trajectory moves parameter ",
                    index.toInt(),
                    ", but ",
                    params.size(),
                    " parameters were given");
      }
    }
  }
  for (const auto number_of_step : c10::irange(steps.size())) {
    const auto record = steps[number_of_step].toGenericDict();
    const auto groups =
        items(layouts.at(record.at("layout").toInt()), "a layout").size();
    for (const auto& move : items(record.at("moves"), "moves")) {
      const auto moved = items(move, "a move")[2].toInt();
      TORCH_CHECK(moved == static_cast<int64_t>(groups),
                  "dopamine::replay: step ",
                  number_of_step,
                  " of the trajectory moved ",
                  moved,
                  " of its ",
                  groups,
                  " groups (a move that failed part-way); it cannot be "
                  "replayed");
    }
  }
  std::unordered_map<int64_t, at::Tensor> masters;
  for (const auto& step : steps) {
    const auto record = step.toGenericDict();
    const auto layout = items(layouts.at(record.at("layout").toInt()), "");
    const auto numbers = items(record.at("steps"), "step numbers");
    detail::StepTable table;
    for (const auto t : c10::irange(layout.size())) {
      const auto group = items(layout[t], "a group");
      const auto options =
          DopamineOptions()
              .seed(group[1].toInt())
              .sigma(number(group[2]))
              .noise(static_cast<Noise>(group[3].toInt()))
              .perturbation(static_cast<Perturbation>(group[4].toInt()))
              .rank(group[5].toInt());
      std::vector<at::Tensor> group_params, group_masters;
      std::vector<int64_t> group_indices;
      for (const auto& index_value : items(group[0], "indices")) {
        const int64_t index = index_value.toInt();
        const auto& param = params[index];
        group_params.push_back(param);
        group_indices.push_back(index);
        const auto dtype = param.scalar_type();
        if (master_weights && (dtype == at::kHalf || dtype == at::kBFloat16)) {
          auto& master = masters[index];
          if (!master.defined()) {
            master = param.detach().to(at::kFloat).contiguous();
          }
          group_masters.push_back(master);
        }
      }
      // move_ keys the noise by the state's step + 1.
      auto state = at::zeros({ops::kGroupStateSize}, at::kDouble);
      state.data_ptr<double>()[0] = static_cast<double>(numbers[t].toInt() - 1);
      table.add_group(options,
                      ops::pack_options(options),
                      std::move(group_params),
                      std::move(group_indices),
                      std::move(group_masters),
                      state);
    }
    for (const auto& move : items(record.at("moves"), "moves")) {
      const auto parts = items(move, "a move");
      table.move_to(ops::Perturbation{parts[0].toInt(), parts[1].toInt()});
    }
    if (!record.at("plans").isNone()) {
      std::vector<at::Tensor> plans;
      for (const auto& plan : items(record.at("plans"), "plans")) {
        std::vector<double> values;
        for (const auto& value : items(plan, "a plan")) {
          values.push_back(number(value));
        }
        plans.push_back(at::tensor(values, at::kDouble));
      }
      table.finish(plans);
    }
  }
}

}  // namespace dopamine
