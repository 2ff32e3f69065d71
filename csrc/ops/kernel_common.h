#pragma once

// What the kernels of every backend share: the argument checks they run
// first (so each reports bad input in the same words), the element updates
// of the two ops, and the adapter from a list kernel to a one-tensor op.
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "noise.h"

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

inline uint32_t counter_word(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<uint32_t>::max(),
              "dopamine: ",
              name,
              " must be in [0, 2^32), got ",
              value);
  return static_cast<uint32_t>(value);
}

inline noise::Kind noise_kind(c10::string_view name) {
  if (name == "gaussian") {
    return noise::Kind::Gaussian;
  }
  TORCH_CHECK(name == "rademacher",
              "dopamine: unknown noise '",
              name,
              "' (expected gaussian or rademacher)");
  return noise::Kind::Rademacher;
}

// The checked arguments of a tensor op and the tensors its kernel updates:
// the parameters themselves, or contiguous copies of the non-contiguous ones
// (elements are numbered in row-major order), written back by write_back().
struct TensorOpArgs {
  noise::Kind kind;
  noise::Key key;
  uint32_t step;
  std::vector<at::Tensor> work;
  std::vector<uint32_t> index;

  TensorOpArgs(at::TensorList params,
               int64_t seed,
               int64_t step,
               int64_t first_index,
               c10::string_view noise,
               const char* op)
      : kind(noise_kind(noise)),
        key(noise::key_of(seed)),
        step(counter_word(step, "step")) {
    check_params(params, op);
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK(params[i].device() == params[0].device(),
                  "dopamine::",
                  op,
                  ": params[",
                  i,
                  "] is on ",
                  params[i].device(),
                  ", params[0] on ",
                  params[0].device(),
                  "; one call takes tensors of one device");
      index.push_back(counter_word(first_index + static_cast<int64_t>(i),
                                   "a parameter's global index"));
      work.push_back(params[i].is_contiguous() ? params[i]
                                               : params[i].contiguous());
    }
  }

  void write_back(at::TensorList params) const {
    for (size_t i = 0; i < params.size(); ++i) {
      if (!work[i].is_same(params[i])) {
        params[i].copy_(work[i]);
      }
    }
  }
};

// perturb_: p + sigma z, in the arithmetic type T (float for the half types).
template <typename T>
struct Perturb {
  T sigma;

  explicit Perturb(double sigma) : sigma(static_cast<T>(sigma)) {}

  C10_HOST_DEVICE T operator()(T p, T z) const {
    return p + sigma * z;
  }
};

// restore_update_: (1 - decay)(p - sigma z) - step_size z; without decay,
// p - (sigma + step_size) z.
template <typename T>
struct RestoreUpdate {
  T keep, sigma, step_size, both;
  bool decays;

  RestoreUpdate(double sigma, double step_size, double decay)
      : keep(static_cast<T>(1 - decay)),
        sigma(static_cast<T>(sigma)),
        step_size(static_cast<T>(step_size)),
        both(static_cast<T>(sigma + step_size)),
        decays(decay != 0) {}

  C10_HOST_DEVICE T operator()(T p, T z) const {
    return decays ? keep * (p - sigma * z) - step_size * z : p - both * z;
  }
};

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

// The kernels of the four tensor ops on one backend, from the backend's
// Backend::update_params<Update>(params, args, update arguments...), which
// applies Update<opmath_t>(update arguments...) to every element.
template <typename Backend>
struct TensorOps {
  static void perturb(at::TensorList params,
                      int64_t seed,
                      int64_t step,
                      int64_t first_index,
                      double sigma,
                      c10::string_view noise) {
    const TensorOpArgs args(params, seed, step, first_index, noise, "perturb_");
    Backend::template update_params<Perturb>(params, args, sigma);
    args.write_back(params);
  }

  static void restore_update(at::TensorList params,
                             int64_t seed,
                             int64_t step,
                             int64_t first_index,
                             double sigma,
                             double step_size,
                             double decay,
                             c10::string_view noise) {
    const TensorOpArgs args(
        params, seed, step, first_index, noise, "restore_update_");
    Backend::template update_params<RestoreUpdate>(
        params, args, sigma, step_size, decay);
    args.write_back(params);
  }

  static void register_kernels(torch::Library& m) {
    m.impl("perturb_", &perturb);
    m.impl("restore_update_", &restore_update);
    m.impl("perturb_tensor_", &OnOneTensor<&perturb>::call);
    m.impl("restore_update_tensor_", &OnOneTensor<&restore_update>::call);
  }
};

}  // namespace dopamine::ops
