#pragma once

// What the kernels of every backend share: the argument check they run first
// (so each reports a bad parameter list in the same words), and the adapter
// from a list kernel to a one-tensor op.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace dopamine::ops {

inline void check_params(at::TensorList params, const char* op) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].defined() && params[i].is_floating_point(),
                "dopamine::",
                op,
                ": params[",
                i,
                "] must be a floating-point tensor, got ",
                params[i].defined() ? c10::toString(params[i].scalar_type())
                                    : "an undefined tensor");
  }
}

// The kernel of a one-tensor op (perturb_tensor_, restore_update_tensor_):
// the list kernel `kernel` applied to a list of one.
template <auto kernel>
struct OnOneTensor;

template <typename... Args, void (*kernel)(at::TensorList, Args...)>
struct OnOneTensor<kernel> {
  static void call(const at::Tensor& param, Args... args) {
    kernel(at::TensorList(param), args...);
  }
};

}  // namespace dopamine::ops
