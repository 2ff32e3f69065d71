// Meta kernels: the ops update their inputs in place and return nothing, so
// under meta or fake tensors (torch.compile, torch.library.opcheck) they run
// the real kernels' argument checks (TensorOps) and update nothing.
#include <torch/library.h>

#include "kernel_common.h"

namespace dopamine::ops {
namespace {

struct Meta {
  template <template <typename> class Update, typename... UpdateArgs>
  static void update_params(at::TensorList /*params*/,
                            const TensorOpArgs& /*args*/,
                            UpdateArgs... /*update_args*/) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, Meta, m) {
  TensorOps<Meta>::register_kernels(m);
}

}  // namespace dopamine::ops
