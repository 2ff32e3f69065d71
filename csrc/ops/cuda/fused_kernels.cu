// Fused CUDA kernels of the tensor ops, with the semantics of the CPU ones
// (csrc/ops/cpu/fused_kernels.cpp) and the same noise (noise.h): a
// multi-tensor launch covers up to kMaxTensors parameters of one dtype, the
// tensor table travels in the kernel's arguments (nothing is allocated), the
// launch is ordered on the current stream and nothing waits for it.
//
// Thread t of the launch handles counter t: in a Gaussian tile, counter j
// gives the four normals of elements j, 32 + j, 64 + j and 96 + j; in a
// Rademacher tile, bit j of the tile's four words gives the same four
// elements. A warp so reads and writes 128 consecutive bytes per element
// row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>

#include "../kernel_common.h"

namespace dopamine::ops {
namespace {

using noise::kLanes;
using noise::kTile;

constexpr int kMaxTensors = 48;
constexpr int kThreads = 256;

// The tensor table of one launch; its tiles are numbered across tensors.
template <typename scalar_t>
struct TensorTable {
  scalar_t* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint32_t index[kMaxTensors];
  int64_t first_tile[kMaxTensors + 1];
  int count;
};

template <typename scalar_t, typename Update>
__global__ void update_kernel(TensorTable<scalar_t> table,
                              noise::Kind kind,
                              noise::Key key,
                              uint32_t step,
                              Update update) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t counters = table.first_tile[table.count] * kLanes;
  for (int64_t counter = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
       counter < counters;
       counter += int64_t{gridDim.x} * blockDim.x) {
    const int64_t global_tile = counter / kLanes;
    const int lane = static_cast<int>(counter % kLanes);
    int t = 0;
    while (table.first_tile[t + 1] <= global_tile) {
      ++t;
    }
    const uint64_t tile =
        static_cast<uint64_t>(global_tile - table.first_tile[t]);
    float z[4];
    if (kind == noise::Kind::Rademacher) {
      uint32_t words[4] = {static_cast<uint32_t>(tile),
                           static_cast<uint32_t>(tile >> 32),
                           table.index[t],
                           step};
      noise::philox(words[0], words[1], words[2], words[3], key.lo, key.hi);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        z[l] = noise::rademacher_sign(words[l], lane);
      }
    } else {
      noise::gaussian_lane(key,
                           table.index[t],
                           step,
                           tile * kLanes + lane,
                           z[0],
                           z[1],
                           z[2],
                           z[3]);
    }
    scalar_t* data = table.data[t];
    const int64_t first = static_cast<int64_t>(tile) * kTile + lane;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = first + l * kLanes;
      if (e < table.numel[t]) {
        data[e] = static_cast<scalar_t>(update(static_cast<opmath_t>(data[e]),
                                               static_cast<opmath_t>(z[l])));
      }
    }
  }
}

template <typename scalar_t, typename Update>
void launch(TensorTable<scalar_t>& table,
            noise::Kind kind,
            noise::Key key,
            uint32_t step,
            const Update& update) {
  const int64_t counters = table.first_tile[table.count] * kLanes;
  if (counters == 0) {
    return;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t blocks =
      std::min<int64_t>((counters + kThreads - 1) / kThreads, int64_t{sms} * 8);
  update_kernel<scalar_t>
      <<<static_cast<unsigned>(blocks),
         kThreads,
         0,
         at::cuda::getCurrentCUDAStream()>>>(table, kind, key, step, update);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Cuda {
  // Applies Update<opmath_t>(update_args...) to every parameter:
  // consecutive parameters of one dtype share a launch, kMaxTensors at most.
  template <template <typename> class Update, typename... UpdateArgs>
  static void update_params(at::TensorList params,
                            const TensorOpArgs& args,
                            UpdateArgs... update_args) {
    if (params.empty()) {
      return;
    }
    const c10::cuda::CUDAGuard guard(params[0].device());
    size_t begin = 0;
    while (begin < args.work.size()) {
      const auto dtype = args.work[begin].scalar_type();
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, dtype, "dopamine_update", [&] {
            using opmath_t = at::opmath_type<scalar_t>;
            TensorTable<scalar_t> table{};
            while (begin < args.work.size() && table.count < kMaxTensors &&
                   args.work[begin].scalar_type() == dtype) {
              const int c = table.count++;
              table.data[c] = args.work[begin].data_ptr<scalar_t>();
              table.numel[c] = args.work[begin].numel();
              table.index[c] = args.index[begin];
              table.first_tile[c + 1] =
                  table.first_tile[c] + (table.numel[c] + kTile - 1) / kTile;
              ++begin;
            }
            launch(table,
                   args.kind,
                   args.key,
                   args.step,
                   Update<opmath_t>(update_args...));
          });
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, CUDA, m) {
  TensorOps<Cuda>::register_kernels(m);
}

}  // namespace dopamine::ops
