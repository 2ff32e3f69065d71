// The schemas of Dopamine's ops, and the C++ entry points that call them
// through the dispatcher. Kernels are registered elsewhere: per backend for
// the tensor ops, once for the scalar ops.
#include <dopamine/ops.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dopamine::ops {

TORCH_LIBRARY(dopamine, m) {
  m.def(
      "perturb_(Tensor(a!)[] params, int seed, int step, int first_index, "
      "float sigma, str noise=\"gaussian\") -> ()");
  m.def(
      "restore_update_(Tensor(a!)[] params, int seed, int step, "
      "int first_index, float sigma, float step_size, float decay, "
      "str noise=\"gaussian\") -> ()");
  // One tensor each: what TorchScript code calls. Its alias analysis does not
  // see the writes through a Tensor(a!)[] (it drops or merges code around
  // them, as it does for torch._foreach_add_), but it tracks a Tensor(a!).
  m.def(
      "perturb_tensor_(Tensor(a!) param, int seed, int step, int index, "
      "float sigma, str noise=\"gaussian\") -> ()");
  m.def(
      "restore_update_tensor_(Tensor(a!) param, int seed, int step, "
      "int index, float sigma, float step_size, float decay, "
      "str noise=\"gaussian\") -> ()");
  m.def(
      "adapt_lr(str mode, float delta, int updates, float lr, float sigma, "
      "float beta, float beta_s, float beta_eta, float eps, float? lr_min, "
      "float? lr_max, float rpe_trace, float rpe_magnitude, "
      "float current_lr) -> (float, float, float)");
  m.def(
      "check_options(float lr, float sigma, str lr_adaptation, float beta, "
      "float beta_s, float beta_eta, float eps, float? lr_min, "
      "float? lr_max, float weight_decay, str noise, str non_finite_loss) "
      "-> ()");
}

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<Signature>();
}

}  // namespace

void perturb_(at::TensorList params,
              int64_t seed,
              int64_t step,
              int64_t first_index,
              double sigma,
              const std::string& noise) {
  static auto op = find_op<void(
      at::TensorList, int64_t, int64_t, int64_t, double, c10::string_view)>(
      "dopamine::perturb_");
  op.call(params, seed, step, first_index, sigma, noise);
}

void restore_update_(at::TensorList params,
                     int64_t seed,
                     int64_t step,
                     int64_t first_index,
                     double sigma,
                     double step_size,
                     double decay,
                     const std::string& noise) {
  static auto op = find_op<void(at::TensorList,
                                int64_t,
                                int64_t,
                                int64_t,
                                double,
                                double,
                                double,
                                c10::string_view)>("dopamine::restore_update_");
  op.call(params, seed, step, first_index, sigma, step_size, decay, noise);
}

LrAdaptationState adapt_lr(const std::string& mode,
                           double delta,
                           int64_t updates,
                           const LrAdaptationParams& params,
                           const LrAdaptationState& state) {
  static auto op =
      find_op<std::tuple<double, double, double>(c10::string_view,
                                                 double,
                                                 int64_t,
                                                 double,
                                                 double,
                                                 double,
                                                 double,
                                                 double,
                                                 double,
                                                 std::optional<double>,
                                                 std::optional<double>,
                                                 double,
                                                 double,
                                                 double)>("dopamine::adapt_lr");
  const auto [rpe_trace, rpe_magnitude, lr] = op.call(mode,
                                                      delta,
                                                      updates,
                                                      params.lr,
                                                      params.sigma,
                                                      params.beta,
                                                      params.beta_s,
                                                      params.beta_eta,
                                                      params.eps,
                                                      params.lr_min,
                                                      params.lr_max,
                                                      state.rpe_trace,
                                                      state.rpe_magnitude,
                                                      state.lr);
  return {rpe_trace, rpe_magnitude, lr};
}

void check_options(const LrAdaptationParams& params,
                   const std::string& lr_adaptation,
                   double weight_decay,
                   const std::string& noise,
                   const std::string& non_finite_loss) {
  static auto op = find_op<void(double,
                                double,
                                c10::string_view,
                                double,
                                double,
                                double,
                                double,
                                std::optional<double>,
                                std::optional<double>,
                                double,
                                c10::string_view,
                                c10::string_view)>("dopamine::check_options");
  op.call(params.lr,
          params.sigma,
          lr_adaptation,
          params.beta,
          params.beta_s,
          params.beta_eta,
          params.eps,
          params.lr_min,
          params.lr_max,
          weight_decay,
          noise,
          non_finite_loss);
}

}  // namespace dopamine::ops
