// The schemas of Dopamine's ops, and the typed C++ entry points that call
// them through the dispatcher. Kernels are registered elsewhere: the step ops
// in step_ops.cpp (over each backend's kernels), pack_options and
// check_state in scalar_ops.cpp (with digest), cpu_capability in
// cpu/fused_kernels.cpp. Options cross the boundary packed (pack_options),
// enums as the int codes of the C++ enums (include/dopamine/options.h);
// every argument after the tensors is keyword-only.
#include <dopamine/ops.h>

#include "engine.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace dopamine::ops {

static_assert(kGroupStateSize == engine::kStateSize);

TORCH_LIBRARY(dopamine, m) {
  // The only schema that names the options (docs/DESIGN.md, "Adding an
  // option"); the other ops take the list it returns.
  m.def(
      "pack_options(*, float lr, float sigma, int lr_adaptation, float beta, "
      "float beta_s, float beta_eta, float eps, float? lr_min, float? lr_max, "
      "float weight_decay, int seed, int noise, int non_finite_loss, "
      "bool capturable, bool master_weights, bool antithetic, "
      "int num_perturbations, bool restore_rng, int perturbation, int rank, "
      "float? beta_baseline) -> float[]");
  m.def("check_state(Tensor state) -> ()");
  // Every group's parameters come from carrying the perturbation `carried`
  // to carrying `to`, each [offset, direction]: offset * sigma * z_direction.
  m.def(
      "move_(Tensor(a!)[] params, Tensor[] master_weights, Tensor[] states, "
      "*, float[] options, int[] indices, int[] group_sizes, int[] carried, "
      "int[] to, int[] element_offsets=[]) -> ()");
  // A step's evaluations in plan_step's order: the perturbation of each,
  // offset * sigma * z_direction, and its name as errors give it.
  m.def(
      "evaluations(*, bool antithetic, int directions) -> (int[] offsets, "
      "int[] directions, str[] names)");
  m.def("plan_step(Tensor state, Tensor losses, *, float[] options) -> Tensor");
  m.def(
      "finish_step_(Tensor(a!)[] params, Tensor(b!)[] master_weights, "
      "Tensor(c!)[] states, Tensor[] plans, *, int[] indices, "
      "int[] group_sizes, int[] element_offsets=[]) -> Tensor");
  m.def("cpu_capability() -> str");
  m.def("digest(Tensor[] tensors) -> int");
}

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<Signature>();
}

}  // namespace

std::vector<double> pack_options(const DopamineOptions& o) {
  // Called by argument name, as Python calls it: the schema's order is not
  // repeated here, so no two options can be swapped.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      "dopamine::pack_options", "");
  const auto values = o.named_values();
  torch::jit::Stack stack;
  stack.reserve(values.size());
  for (const auto& argument : op.schema().arguments()) {
    const auto found =
        std::find_if(values.begin(), values.end(), [&](const auto& value) {
          return argument.name() == value.first;
        });
    TORCH_INTERNAL_ASSERT(found != values.end(),
                          "dopamine::pack_options: no value for option ",
                          argument.name());
    stack.push_back(found->second);
  }
  op.callBoxed(&stack);
  return stack.back().toDoubleVector();
}

void check_state(const at::Tensor& state) {
  static auto op = find_op<void(const at::Tensor&)>("dopamine::check_state");
  op.call(state);
}

void move_(at::TensorList params,
           at::TensorList master_weights,
           at::TensorList states,
           c10::ArrayRef<double> options,
           c10::IntArrayRef indices,
           c10::IntArrayRef group_sizes,
           Perturbation carried,
           Perturbation to,
           c10::IntArrayRef element_offsets) {
  static auto op = find_op<void(at::TensorList,
                                at::TensorList,
                                at::TensorList,
                                c10::ArrayRef<double>,
                                c10::IntArrayRef,
                                c10::IntArrayRef,
                                c10::IntArrayRef,
                                c10::IntArrayRef,
                                c10::IntArrayRef)>("dopamine::move_");
  const std::array<int64_t, 2> from{carried.offset, carried.direction};
  const std::array<int64_t, 2> target{to.offset, to.direction};
  op.call(params,
          master_weights,
          states,
          options,
          indices,
          group_sizes,
          from,
          target,
          element_offsets);
}

std::vector<Evaluation> evaluations(bool antithetic, int64_t directions) {
  static auto op = find_op<std::tuple<std::vector<int64_t>,
                                      std::vector<int64_t>,
                                      std::vector<std::string>>(bool, int64_t)>(
      "dopamine::evaluations");
  const auto [offsets, indices, names] = op.call(antithetic, directions);
  std::vector<Evaluation> list;
  list.reserve(names.size());
  for (const auto i : c10::irange(names.size())) {
    list.push_back({{offsets[i], indices[i]}, names[i]});
  }
  return list;
}

at::Tensor plan_step(const at::Tensor& state,
                     const at::Tensor& losses,
                     c10::ArrayRef<double> options) {
  static auto op = find_op<at::Tensor(
      const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>)>(
      "dopamine::plan_step");
  return op.call(state, losses, options);
}

at::Tensor finish_step_(at::TensorList params,
                        at::TensorList master_weights,
                        at::TensorList states,
                        at::TensorList plans,
                        c10::IntArrayRef indices,
                        c10::IntArrayRef group_sizes,
                        c10::IntArrayRef element_offsets) {
  static auto op =
      find_op<at::Tensor(at::TensorList,
                         at::TensorList,
                         at::TensorList,
                         at::TensorList,
                         c10::IntArrayRef,
                         c10::IntArrayRef,
                         c10::IntArrayRef)>("dopamine::finish_step_");
  return op.call(params,
                 master_weights,
                 states,
                 plans,
                 indices,
                 group_sizes,
                 element_offsets);
}

std::string cpu_capability() {
  static auto op = find_op<std::string()>("dopamine::cpu_capability");
  return op.call();
}

int64_t digest(at::TensorList tensors) {
  static auto op = find_op<int64_t(at::TensorList)>("dopamine::digest");
  return op.call(tensors);
}

}  // namespace dopamine::ops
