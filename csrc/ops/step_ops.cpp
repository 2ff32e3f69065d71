// The kernels of the step ops (schemas in dopamine_ops.cpp): one function
// per op for every dispatch key, which checks the arguments, buckets the
// parameters by device and hands each bucket to that device's Backend
// (kernel_common.h). A list may so mix devices and dtypes; under Meta (fake
// tensors, torch.compile, opcheck) the checks run and nothing is computed.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "engine.h"
#include "kernel_common.h"

namespace dopamine::ops {

namespace {

std::array<std::optional<Backend>,
           static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>&
backends() {
  static std::array<std::optional<Backend>,
                    static_cast<size_t>(
                        c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
      table;
  return table;
}

}  // namespace

void register_backend(c10::DeviceType type, const Backend& backend) {
  backends()[static_cast<size_t>(type)] = backend;
}

const Backend& backend_for(c10::DeviceType type) {
  const auto& backend = backends()[static_cast<size_t>(type)];
  TORCH_CHECK(
      backend.has_value(),
      "dopamine: no kernels for device type ",
      type,
      " (this build has CPU",
      backends()[static_cast<size_t>(c10::DeviceType::CUDA)] ? " and CUDA" : "",
      " kernels)");
  return *backend;
}

namespace {

uint32_t counter_word(double value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<uint32_t>::max(),
              "dopamine: ",
              name,
              " must be in [0, 2^32), got ",
              value);
  return static_cast<uint32_t>(value);
}

bool is_half(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_state_tensor(const at::Tensor& tensor,
                        int64_t size,
                        const char* op,
                        const char* what) {
  TORCH_CHECK(tensor.defined() && tensor.scalar_type() == at::kDouble &&
                  tensor.dim() == 1 && tensor.sym_size(0) == size &&
                  tensor.is_contiguous(),
              "dopamine::",
              op,
              ": ",
              what,
              " must be a contiguous float64 tensor of shape [",
              size,
              "]");
}

// The kernel table of one device: kernel group `k` is the tensors of
// parameter group `group_keys[k].first` with (second = true) or without a
// master weight.
struct DeviceTable {
  c10::Device device;
  KernelTable table;
  std::vector<std::pair<size_t, bool>> group_keys;
};

// The checked parameters of a tensor op, contiguous working copies of those
// that are not contiguous, and master weights, ready to become kernel
// tables. Per parameter it copies no defined tensor but those: an op may
// take thousands (docs/NOISE_AND_KERNELS.md, "Many small tensors").
struct ParamTable {
  at::TensorList params;
  std::vector<at::Tensor> copies;   // undefined where a parameter is contiguous
  std::vector<at::Tensor> masters;  // undefined where a parameter has none

  std::vector<int64_t> offsets;  // each tensor's first element's place

  ParamTable(at::TensorList params,
             at::TensorList master_weights,
             c10::IntArrayRef indices,
             c10::IntArrayRef element_offsets,
             const char* op)
      : params(params) {
    offsets.reserve(params.size());
    copies.reserve(params.size());
    masters.reserve(params.size());
    TORCH_CHECK(
        element_offsets.empty() || element_offsets.size() == params.size(),
        "dopamine::",
        op,
        ": element_offsets must be empty or hold one offset per "
        "parameter (",
        params.size(),
        "), got ",
        element_offsets.size());
    for (const auto i : c10::irange(params.size())) {
      const int64_t offset = element_offsets.empty() ? 0 : element_offsets[i];
      TORCH_CHECK(offset >= 0 && offset <= (int64_t{1} << 62),
                  "dopamine::",
                  op,
                  ": element_offsets[",
                  i,
                  "] must be in [0, 2^62], got ",
                  offset);
      offsets.push_back(offset);
    }
    TORCH_CHECK(indices.size() == params.size(),
                "dopamine::",
                op,
                ": ",
                params.size(),
                " parameters but ",
                indices.size(),
                " indices");
    size_t halves = 0;
    for (const auto i : c10::irange(params.size())) {
      const auto& param = params[i];
      TORCH_CHECK(param.defined() && param.layout() == at::kStrided &&
                      (param.scalar_type() == at::kFloat ||
                       param.scalar_type() == at::kDouble ||
                       is_half(param.scalar_type())),
                  "dopamine::",
                  op,
                  ": params[",
                  i,
                  "] must be a strided float32, float64, bfloat16 or float16 "
                  "tensor, got ",
                  param.defined() ? c10::toString(param.scalar_type())
                                  : "an undefined tensor");
      // Written in place, each element on its own: a view whose elements
      // share memory (an expanded tensor, never contiguous) cannot be.
      TORCH_CHECK(param.is_contiguous() ||
                      at::has_internal_overlap(param) != at::MemOverlap::Yes,
                  "dopamine::",
                  op,
                  ": params[",
                  i,
                  "] has elements that share memory (an expanded view?); "
                  "each element of a parameter must have its own");
      counter_word(static_cast<double>(indices[i]), "a parameter's index");
      halves += is_half(param.scalar_type()) ? 1 : 0;
    }
    TORCH_CHECK(master_weights.empty() || master_weights.size() == halves,
                "dopamine::",
                op,
                ": master_weights must be empty or hold one tensor per "
                "bfloat16/float16 parameter (",
                halves,
                "), got ",
                master_weights.size());
    size_t next_master = 0;
    for (const auto i : c10::irange(params.size())) {
      const auto& param = params[i];
      at::Tensor master;
      if (!master_weights.empty() && is_half(param.scalar_type())) {
        master = master_weights[next_master++];
        TORCH_CHECK(master.defined() && master.scalar_type() == at::kFloat &&
                        master.is_contiguous() &&
                        master.sym_numel() == param.sym_numel() &&
                        master.device() == param.device(),
                    "dopamine::",
                    op,
                    ": the master weight of params[",
                    i,
                    "] must be a contiguous float32 tensor of its size on its "
                    "device");
      }
      masters.push_back(master);
      copies.push_back(param.is_contiguous() ? at::Tensor()
                                             : param.contiguous());
    }
  }

  // The tensor the kernels update for parameter i.
  const at::Tensor& work(size_t i) const {
    return copies[i].defined() ? copies[i] : params[i];
  }

  // The tensors' kernel tables, one per device in order of first appearance;
  // `group_of[i]` is tensor i's parameter group and `group_entry(g,
  // has_master, device)` the entry of a kernel group.
  template <typename GroupEntryOf>
  std::vector<DeviceTable> tables(c10::IntArrayRef indices,
                                  const std::vector<size_t>& group_of,
                                  const GroupEntryOf& group_entry) const {
    std::vector<DeviceTable> tables;
    for (const auto i : c10::irange(params.size())) {
      const at::Tensor& work = this->work(i);
      if (work.numel() == 0) {
        continue;
      }
      const c10::Device device = work.device();
      auto table =
          std::find_if(tables.begin(), tables.end(), [&](const auto& t) {
            return t.device == device;
          });
      if (table == tables.end()) {
        tables.push_back({device, {}, {}});
        table = std::prev(tables.end());
        table->table.tensors.reserve(params.size() - i);
      }
      const std::pair<size_t, bool> key{group_of[i], masters[i].defined()};
      auto group =
          std::find(table->group_keys.begin(), table->group_keys.end(), key);
      if (group == table->group_keys.end()) {
        table->group_keys.push_back(key);
        table->table.groups.push_back(
            group_entry(key.first, key.second, device));
        group = std::prev(table->group_keys.end());
      }
      table->table.tensors.push_back(
          {work.data_ptr(),
           masters[i].defined() ? masters[i].data_ptr<float>() : nullptr,
           work.numel(),
           offsets[i],
           static_cast<uint32_t>(indices[i]),
           static_cast<uint32_t>(group - table->group_keys.begin()),
           work.scalar_type(),
           work.dim() >= 2 ? work.numel() / work.size(0) : 0});
    }
    return tables;
  }

  void write_back() const {
    for (const auto i : c10::irange(params.size())) {
      if (copies[i].defined()) {
        params[i].copy_(copies[i]);
      }
    }
  }
};

// The low-rank factors of a table's tensors (noise.h), on their device: for
// each tensor of a group whose step has a rank, and each direction the step
// draws, the first rank (rows + cols) elements of that direction's noise,
// drawn by the backend's own pass into zeros (x' = x + z, exact). Returns
// the buffers, which must live until the table's pass is queued.
std::vector<at::Tensor> draw_factors(KernelTable& table,
                                     c10::Device device,
                                     const Backend& backend) {
  std::vector<at::Tensor> buffers;
  KernelTable draws;
  // draws.groups[k] draws slot draw_keys[k].second of kernel group first.
  std::vector<std::pair<uint32_t, int64_t>> draw_keys;
  for (auto& entry : table.tensors) {
    const GroupEntry& group = table.groups[entry.group];
    if (!group.resolved || group.step.rank == 0 || entry.cols == 0) {
      continue;
    }
    const TensorStep& step = group.step;
    entry.rows = entry.numel / entry.cols;  // whole: check_lowrank
    const int64_t count = step.rank * (entry.rows + entry.cols);
    buffers.push_back(at::zeros({(1 + step.other_directions) * count},
                                at::TensorOptions(device).dtype(at::kFloat)));
    entry.factors = buffers.back().data_ptr<float>();
    for (int64_t slot = 0; slot <= step.other_directions; ++slot) {
      const std::pair<uint32_t, int64_t> key{entry.group, slot};
      auto found = std::find(draw_keys.begin(), draw_keys.end(), key);
      if (found == draw_keys.end()) {
        GroupEntry draw{};
        draw.resolved = true;
        draw.step = step;
        draw.step.rank = 0;
        draw.step.direction = direction_of(step, slot);
        draw.step.coefficients = engine::Coefficients{1, -1, 0, false};
        draw.step.other_directions = 0;
        draw.step.other_step_sizes = nullptr;
        draws.groups.push_back(draw);
        draw_keys.push_back(key);
        found = std::prev(draw_keys.end());
      }
      draws.tensors.push_back({buffers.back().data_ptr<float>() + slot * count,
                               nullptr,
                               count,
                               0,
                               entry.index,
                               static_cast<uint32_t>(found - draw_keys.begin()),
                               at::kFloat});
    }
  }
  if (!draws.tensors.empty()) {
    backend.update(draws);
  }
  return buffers;
}

void run(std::vector<DeviceTable> tables) {
  for (auto& table : tables) {
    const c10::OptionalDeviceGuard guard(table.device);
    const Backend& backend = backend_for(table.device.type());
    const auto factors = draw_factors(table.table, table.device, backend);
    backend.update(table.table);
  }
}

// Whether the host reads the state (it is on the CPU); otherwise the kernels
// read it on its device, and every parameter must be on that device.
bool host_readable(const at::Tensor& state,
                   at::TensorList params,
                   const char* op) {
  if (state.is_cpu()) {
    return true;
  }
  for (const auto i : c10::irange(params.size())) {
    TORCH_CHECK(params[i].device() == state.device(),
                "dopamine::",
                op,
                ": params[",
                i,
                "] is on ",
                params[i].device(),
                " but the state on ",
                state.device(),
                "; a state off the CPU (capturable) serves parameters of its "
                "own device only");
  }
  return false;
}

// The states of a step's groups, checked: one per group, on one device,
// with `group_sizes` covering the `count` tensors. Returns each tensor's
// group.
std::vector<size_t> group_of_tensors(at::TensorList states,
                                     c10::IntArrayRef group_sizes,
                                     size_t count,
                                     const char* op) {
  TORCH_CHECK(!states.empty() && states.size() == group_sizes.size(),
              "dopamine::",
              op,
              ": one state and one size per group; got ",
              states.size(),
              " and ",
              group_sizes.size());
  std::vector<size_t> group_of;
  for (const auto g : c10::irange(states.size())) {
    check_state_tensor(states[g], engine::kStateSize, op, "state");
    TORCH_CHECK(states[g].device() == states[0].device(),
                "dopamine::",
                op,
                ": every state must be on one device");
    TORCH_CHECK(group_sizes[g] >= 0, "dopamine::", op, ": negative group size");
    group_of.insert(group_of.end(), group_sizes[g], g);
  }
  TORCH_CHECK(group_of.size() == count,
              "dopamine::",
              op,
              ": the group sizes add up to ",
              group_of.size(),
              ", but there are ",
              count,
              " parameters");
  return group_of;
}

// The rules of a low-rank perturbation (docs/DESIGN.md, "The noise"), for
// the groups whose `ranks` are not 0: every parameter of two or more
// dimensions has both sides at least the rank and is whole (a shard would
// draw its own rows' factors, not the whole parameter's), and the host reads
// the state (the factors are sized there).
void check_lowrank(at::TensorList params,
                   const std::vector<size_t>& group_of,
                   const std::vector<int64_t>& ranks,
                   c10::IntArrayRef element_offsets,
                   bool on_host) {
  for (const auto i : c10::irange(params.size())) {
    const int64_t rank = ranks[group_of[i]];
    const auto& param = params[i];
    if (rank == 0 || param.dim() < 2 || param.numel() == 0) {
      continue;
    }
    const int64_t rows = param.size(0), cols = param.numel() / rows;
    TORCH_CHECK_VALUE(rank <= std::min(rows, cols),
                      "Dopamine: invalid rank: ",
                      rank,
                      " is above the smaller side of params[",
                      i,
                      "] of shape ",
                      param.sizes(),
                      " (",
                      rows,
                      " x ",
                      cols,
                      " as rows by the rest); perturbation='lowrank' needs a "
                      "rank of at most ",
                      std::min(rows, cols));
    TORCH_CHECK_VALUE(on_host,
                      "Dopamine: perturbation='lowrank' needs the state on "
                      "the CPU (not capturable)");
    TORCH_CHECK_VALUE(element_offsets.empty() || element_offsets[i] == 0,
                      "Dopamine: perturbation='lowrank' over shards of a "
                      "parameter is not supported (params[",
                      i,
                      "] starts at element ",
                      element_offsets.empty() ? 0 : element_offsets[i],
                      "; use perturbation='full')");
  }
}

Perturbation perturbation_of(c10::IntArrayRef perturbation, const char* name) {
  TORCH_CHECK(perturbation.size() == 2 && std::abs(perturbation[0]) <= 1,
              "dopamine::move_: ",
              name,
              " must be [offset, direction] with offset -1, 0 or 1, got ",
              perturbation);
  return {perturbation[0],
          counter_word(static_cast<double>(perturbation[1]), "a direction")};
}

void move(at::TensorList params,
          at::TensorList master_weights,
          at::TensorList states,
          c10::ArrayRef<double> options,
          c10::IntArrayRef indices,
          c10::IntArrayRef group_sizes,
          c10::IntArrayRef carried_now,
          c10::IntArrayRef to,
          c10::IntArrayRef element_offsets) {
  const ParamTable table(
      params, master_weights, indices, element_offsets, "move_");
  const auto group_of =
      group_of_tensors(states, group_sizes, params.size(), "move_");
  TORCH_CHECK(options.size() == states.size() * engine::packed::kSize,
              "dopamine::move_: options must hold the packed options of each "
              "group (",
              states.size(),
              " x ",
              engine::packed::kSize,
              " numbers), got ",
              options.size());
  std::vector<engine::GroupOptions> group_options;
  for (const auto g : c10::irange(states.size())) {
    group_options.push_back(unpack_options(
        options.slice(g * engine::packed::kSize, engine::packed::kSize),
        "move_"));
  }
  const Perturbation from = perturbation_of(carried_now, "carried");
  const Perturbation target = perturbation_of(to, "to");
  std::vector<int64_t> ranks;
  for (const auto& o : group_options) {
    ranks.push_back(o.rank);
  }
  const bool on_host = host_readable(states[0], params, "move_");
  check_lowrank(params, group_of, ranks, element_offsets, on_host);
  if (states[0].is_meta()) {
    return;
  }
  if (on_host) {
    for (const auto& state : states) {
      counter_word(state.data_ptr<double>()[engine::kStep] + 1, "step");
    }
  }
  // Nothing is written before this point. One pass from any perturbation to
  // any other (docs/DESIGN.md, "The step protocol").
  if (from.offset == target.offset &&
      (from.offset == 0 || from.direction == target.direction)) {
    return;
  }
  run(table.tables(
      indices, group_of, [&](size_t g, bool has_master, c10::Device) {
        return move_group(group_options[g],
                          states[g].data_ptr<double>(),
                          from,
                          target,
                          has_master,
                          on_host);
      }));
  table.write_back();
}

at::Tensor plan_step(const at::Tensor& state,
                     const at::Tensor& losses,
                     c10::ArrayRef<double> packed_options) {
  check_state_tensor(state, engine::kStateSize, "plan_step", "state");
  const engine::GroupOptions options =
      unpack_options(packed_options, "plan_step");
  const int64_t count =
      engine::loss_count(options.antithetic, options.directions);
  TORCH_CHECK(
      losses.defined() && losses.dim() == 1 && losses.sym_size(0) == count,
      "dopamine::plan_step: losses must be a tensor of shape [",
      count,
      "] (one per evaluation, in dopamine::evaluations' order), got shape ",
      losses.sym_sizes());
  auto plan =
      at::empty({engine::kPlanHeader + options.directions}, state.options());
  if (state.is_meta()) {
    return plan;
  }
  const auto on_state_device =
      losses.to(state.device(), at::kDouble).contiguous();
  const c10::OptionalDeviceGuard guard(state.device());
  backend_for(state.device().type())
      .plan(state, on_state_device, options, plan);
  return plan;
}

at::Tensor finish_step(at::TensorList params,
                       at::TensorList master_weights,
                       at::TensorList states,
                       at::TensorList plans,
                       c10::IntArrayRef indices,
                       c10::IntArrayRef group_sizes,
                       c10::IntArrayRef element_offsets) {
  const ParamTable table(
      params, master_weights, indices, element_offsets, "finish_step_");
  const auto group_of =
      group_of_tensors(states, group_sizes, params.size(), "finish_step_");
  TORCH_CHECK(plans.size() == states.size(),
              "dopamine::finish_step_: one plan per group; got ",
              plans.size(),
              " plans and ",
              states.size(),
              " states");
  for (const auto g : c10::irange(states.size())) {
    TORCH_CHECK(plans[g].defined() && plans[g].scalar_type() == at::kDouble &&
                    plans[g].dim() == 1 &&
                    plans[g].sym_size(0) > engine::kPlanHeader &&
                    plans[g].sym_size(0) <=
                        engine::kPlanHeader + engine::kMaxDirections &&
                    plans[g].is_contiguous(),
                "dopamine::finish_step_: plan must be a contiguous float64 "
                "tensor of shape [",
                engine::kPlanHeader,
                " + num_perturbations], as plan_step returns it");
    TORCH_CHECK(plans[g].device() == states[0].device(),
                "dopamine::finish_step_: every plan must be on the states' "
                "device");
  }
  const bool on_host = host_readable(states[0], params, "finish_step_");
  if (states[0].is_meta()) {
    return at::empty({}, states[0].options());
  }
  if (on_host) {
    std::vector<int64_t> ranks;
    for (const auto& plan : plans) {
      counter_word(plan.data_ptr<double>()[engine::kNextState + engine::kStep],
                   "step");
      const double rank = plan.data_ptr<double>()[engine::kRank];
      TORCH_CHECK(
          rank >= 0 && rank <= engine::kMaxRank && rank == std::floor(rank),
          "dopamine::finish_step_: a plan's rank must be an int in "
          "[0, ",
          engine::kMaxRank,
          "], got ",
          rank);
      ranks.push_back(static_cast<int64_t>(rank));
    }
    check_lowrank(params, group_of, ranks, element_offsets, on_host);
  }
  // A kernel reads the other directions' step sizes where it runs: a
  // parameter off the states' device gets a copy of them on its own, one per
  // group and device, made before anything is written (a failed copy leaves
  // everything as it was) and kept until the kernels are queued.
  std::vector<std::pair<std::pair<size_t, c10::Device>, at::Tensor>> copies;
  auto copy_of = [&](size_t g, c10::Device device) {
    return std::find_if(copies.begin(), copies.end(), [&](const auto& c) {
      return c.first == std::make_pair(g, device);
    });
  };
  if (on_host) {
    for (const auto i : c10::irange(params.size())) {
      const auto& plan = plans[group_of[i]];
      const auto device = table.work(i).device();
      if (plan.size(0) > engine::kPlanHeader + 1 && device != plan.device() &&
          copy_of(group_of[i], device) == copies.end()) {
        copies.emplace_back(
            std::make_pair(group_of[i], device),
            plan.narrow(
                    0, engine::kStepSizes, plan.size(0) - engine::kStepSizes)
                .to(device));
      }
    }
  }
  // Nothing is written before this point: a step whose arguments fail a
  // check leaves everything as it was.
  const c10::OptionalDeviceGuard guard(states[0].device());
  const at::Tensor taken =
      backend_for(states[0].device().type()).settle(states, plans);
  run(table.tables(
      indices, group_of, [&](size_t g, bool has_master, c10::Device device) {
        auto entry = finish_group(plans[g].data_ptr<double>(),
                                  plans[g].size(0) - engine::kPlanHeader,
                                  taken.data_ptr<double>(),
                                  has_master,
                                  on_host);
        const auto copy = copy_of(g, device);
        if (on_host && copy != copies.end()) {
          entry.step.other_step_sizes = copy->second.data_ptr<double>();
        }
        return entry;
      }));
  table.write_back();
  return taken;
}

void register_step_kernels(torch::Library& m) {
  m.impl("move_", &move);
  m.impl("plan_step", &plan_step);
  m.impl("finish_step_", &finish_step);
}

}  // namespace

// One kernel for every key: a list that mixes CPU and CUDA tensors
// dispatches to CUDA, and the kernel routes each tensor to its own device.
// Under Meta the checks run and nothing is computed.
TORCH_LIBRARY_IMPL(dopamine, CPU, m) {
  register_step_kernels(m);
}
TORCH_LIBRARY_IMPL(dopamine, CUDA, m) {
  register_step_kernels(m);
}
TORCH_LIBRARY_IMPL(dopamine, Meta, m) {
  register_step_kernels(m);
}
// The step ops have no derivative and run under no_grad. Past autograd's
// fallback, which would box every call and visit each tensor of its lists,
// a C++ call stays unboxed (docs/NOISE_AND_KERNELS.md, "Many small
// tensors").
TORCH_LIBRARY_IMPL(dopamine, Autograd, m) {
  for (const char* op : {"move_", "plan_step", "finish_step_"}) {
    m.impl(op, torch::CppFunction::makeFallthrough());
  }
}

}  // namespace dopamine::ops
