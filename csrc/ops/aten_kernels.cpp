// Device-generic kernels for Dopamine's ops, composed of ATen calls and
// registered for CPU and CUDA. They allocate the noise of one tensor at a
// time and free it before the next; fused kernels that never materialise it
// are planned.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <cstdint>
#include <mutex>

namespace dopamine::ops {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The seed of the noise stream of one tensor at one step.
uint64_t noise_key(int64_t seed, int64_t step, int64_t index) {
  uint64_t key = splitmix64(static_cast<uint64_t>(seed));
  key = splitmix64(key ^ static_cast<uint64_t>(step));
  return splitmix64(key ^ static_cast<uint64_t>(index));
}

// Half types are updated in float32 and rounded once.
at::ScalarType compute_type(at::ScalarType param_type) {
  return param_type == at::kDouble ? at::kDouble : at::kFloat;
}

// z ~ N(0, I) shaped like `param`, drawn from a fresh generator of the
// param's device seeded with `key`: a pure function of the key on a given
// device, whatever the thread count.
at::Tensor noise_like(const at::Tensor& param, uint64_t key) {
  at::Generator generator;
  {
    auto device_default = at::globalContext().defaultGenerator(param.device());
    std::lock_guard<std::mutex> lock(device_default.mutex());
    generator = device_default.clone();
  }
  generator.set_current_seed(key);
  auto noise = at::empty(
      param.sizes(), param.options().dtype(compute_type(param.scalar_type())));
  noise.normal_(0.0, 1.0, generator);
  return noise;
}

void perturb_kernel(at::TensorList params,
                    int64_t seed,
                    int64_t step,
                    int64_t first_index,
                    double sigma) {
  check_params(params, "perturb_");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto noise =
        noise_like(params[i], noise_key(seed, step, first_index + i));
    params[i].add_(noise, sigma);
  }
}

void restore_update_kernel(at::TensorList params,
                           int64_t seed,
                           int64_t step,
                           int64_t first_index,
                           double sigma,
                           double step_size,
                           double decay) {
  check_params(params, "restore_update_");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& param = params[i];
    const auto noise =
        noise_like(param, noise_key(seed, step, first_index + i));
    const bool same_type = param.scalar_type() == noise.scalar_type();
    const auto work = same_type ? param : param.to(noise.scalar_type());
    if (decay == 0) {
      work.sub_(noise, sigma + step_size);
    } else {
      work.sub_(noise, sigma).mul_(1 - decay).sub_(noise, step_size);
    }
    if (!same_type) {
      param.copy_(work);
    }
  }
}

void register_kernels(torch::Library& m) {
  m.impl("perturb_", &perturb_kernel);
  m.impl("restore_update_", &restore_update_kernel);
  m.impl("perturb_tensor_", &OnOneTensor<&perturb_kernel>::call);
  m.impl("restore_update_tensor_", &OnOneTensor<&restore_update_kernel>::call);
}

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, CPU, m) {
  register_kernels(m);
}

TORCH_LIBRARY_IMPL(dopamine, CUDA, m) {
  register_kernels(m);
}

}  // namespace dopamine::ops
