// The CUDA backend, with the semantics of the CPU one
// (csrc/ops/cpu/fused_kernels.cpp) and the same noise (noise.h). The launch
// plan and the kernels' bodies are in launch.h, which the CUDA emulation
// tests run on the CPU too; here they are launched. Nothing is allocated but
// a low-rank launch's small table, the launches are ordered on the current
// stream and nothing waits for them.
//
// When a capturable step keeps its state on the GPU, the kernels read the
// step and the coefficients from device memory (kernel_common.h), and the
// state arithmetic (engine.h) runs in one-thread kernels: no host
// synchronisation, and a step can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "launch.h"

namespace dopamine::ops {
namespace {

using cuda::BlockShared;
using cuda::kThreads;
using cuda::Launch;
using cuda::LaunchTable;
using cuda::SettleTable;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const LaunchTable table) {
  __shared__ BlockShared shared;
  for (int phase = 0; phase < cuda::kUpdatePhases; ++phase) {
    if (phase > 0) {
      __syncthreads();
    }
    cuda::update_phase<scalar_t>(
        phase, table, blockIdx.x, threadIdx.x, blockDim.x, shared);
  }
}

// The SM count of the current device, queried once per device.
int64_t sm_count() {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = counts.find(device);
  if (found == counts.end()) {
    int count = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    found = counts.emplace(device, count).first;
  }
  return found->second;
}

void update(const KernelTable& table) {
  cuda::for_each_launch(table, sm_count(), [](const Launch& launch, auto zero) {
    using scalar_t = decltype(zero);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    LaunchTable arguments = launch.table;
    // The low-rank tensors' rows, columns and factors, copied to the device
    // (from pageable memory: staged before the call returns); the caching
    // allocator keeps the copy until the stream has run the kernel.
    at::Tensor lowrank;
    if (!launch.lowrank.empty()) {
      const auto bytes = static_cast<int64_t>(launch.lowrank.size() *
                                              sizeof(cuda::LowRankTensor));
      lowrank =
          at::empty({bytes},
                    at::TensorOptions(c10::Device(c10::DeviceType::CUDA,
                                                  c10::cuda::current_device()))
                        .dtype(at::kByte));
      C10_CUDA_CHECK(cudaMemcpyAsync(lowrank.data_ptr(),
                                     launch.lowrank.data(),
                                     bytes,
                                     cudaMemcpyHostToDevice,
                                     stream));
      arguments.lowrank =
          static_cast<const cuda::LowRankTensor*>(lowrank.data_ptr());
    }
    update_kernel<scalar_t><<<launch.blocks, kThreads, 0, stream>>>(arguments);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

__global__ void plan_kernel(const double* state,
                            const double* losses,
                            const engine::GroupOptions options,
                            double* plan) {
  engine::plan_group(state, losses, options, plan);
}

void plan(const at::Tensor& state,
          const at::Tensor& losses,
          const engine::GroupOptions& options,
          const at::Tensor& plan) {
  plan_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      state.data_ptr<double>(),
      losses.data_ptr<double>(),
      options,
      plan.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void settle_kernel(const SettleTable groups, double* taken) {
  cuda::settle_groups(groups, taken);
}

at::Tensor settle(at::TensorList states, at::TensorList plans) {
  TORCH_CHECK(states.size() <= cuda::kMaxSettleGroups,
              "dopamine: a step with its state on the GPU takes at most ",
              cuda::kMaxSettleGroups,
              " parameter groups, got ",
              states.size());
  SettleTable groups{};
  groups.count = static_cast<int>(states.size());
  for (size_t g = 0; g < states.size(); ++g) {
    groups.states[g] = states[g].data_ptr<double>();
    groups.plans[g] = plans[g].data_ptr<double>();
  }
  auto taken = at::empty({}, states[0].options());
  settle_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      groups, taken.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return taken;
}

const BackendRegistrar cuda_backend(c10::DeviceType::CUDA,
                                    {&update, &plan, &settle});

}  // namespace
}  // namespace dopamine::ops
