// The schemas of Dopamine's ops, and the C++ entry points that call them
// through the dispatcher. Kernels are registered per backend elsewhere.
#include <dopamine/ops.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dopamine::ops {

TORCH_LIBRARY(dopamine, m) {
  m.def(
      "perturb_(Tensor(a!)[] params, int seed, int step, int first_index, "
      "float sigma) -> ()");
  m.def(
      "restore_update_(Tensor(a!)[] params, int seed, int step, "
      "int first_index, float sigma, float step_size, float decay) -> ()");
}

void perturb_(at::TensorList params,
              int64_t seed,
              int64_t step,
              int64_t first_index,
              double sigma) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dopamine::perturb_", "")
          .typed<void(at::TensorList, int64_t, int64_t, int64_t, double)>();
  op.call(params, seed, step, first_index, sigma);
}

void restore_update_(at::TensorList params,
                     int64_t seed,
                     int64_t step,
                     int64_t first_index,
                     double sigma,
                     double step_size,
                     double decay) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dopamine::restore_update_", "")
                       .typed<void(at::TensorList,
                                   int64_t,
                                   int64_t,
                                   int64_t,
                                   double,
                                   double,
                                   double)>();
  op.call(params, seed, step, first_index, sigma, step_size, decay);
}

}  // namespace dopamine::ops
