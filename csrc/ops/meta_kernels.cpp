// Meta kernels: the ops update their inputs in place and return nothing, so
// under meta or fake tensors (torch.compile, torch.library.opcheck) they only
// check their arguments.
#include <torch/library.h>

#include "kernel_common.h"

namespace dopamine::ops {
namespace {

void perturb_meta(at::TensorList params,
                  int64_t /*seed*/,
                  int64_t /*step*/,
                  int64_t /*first_index*/,
                  double /*sigma*/,
                  c10::string_view noise) {
  check_params(params, "perturb_");
  noise_kind(noise);
}

void restore_update_meta(at::TensorList params,
                         int64_t /*seed*/,
                         int64_t /*step*/,
                         int64_t /*first_index*/,
                         double /*sigma*/,
                         double /*step_size*/,
                         double /*decay*/,
                         c10::string_view noise) {
  check_params(params, "restore_update_");
  noise_kind(noise);
}

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, Meta, m) {
  m.impl("perturb_", &perturb_meta);
  m.impl("restore_update_", &restore_update_meta);
  m.impl("perturb_tensor_", &OnOneTensor<&perturb_meta>::call);
  m.impl("restore_update_tensor_", &OnOneTensor<&restore_update_meta>::call);
}

}  // namespace dopamine::ops
