// The CUDA backend, with the semantics of the CPU one
// (csrc/ops/cpu/fused_kernels.cpp) and the same noise (noise.h).
//
// The element pass is a multi-tensor launch in the manner of apex's
// multi_tensor_apply: the kernel's arguments carry a table of up to
// kMaxTensors tensors of one dtype and, for each of up to kMaxBlocks blocks,
// the tensor and the chunk of tiles it handles, so a block finds its tensor
// with one lookup. Nothing is allocated, the launches are ordered on the
// current stream and nothing waits for them. Thread t of a block handles
// counter t of a tile: in a Gaussian tile, counter j gives the four normals of
// elements j, 32 + j, 64 + j and 96 + j; in a Rademacher tile, bit j of the
// tile's four words gives the same four elements. A warp so reads and writes
// 128 consecutive bytes per element row.
//
// When a capturable step keeps its state on the GPU, the kernels read the
// step and the coefficients from device memory (kernel_common.h), and the
// state arithmetic (engine.h) runs in one-thread kernels: no host
// synchronisation, and a step can be captured in a CUDA graph.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../kernel_common.h"

namespace dopamine::ops {
namespace {

using noise::kLanes;
using noise::kTile;

// The kernel's table stays within the 4 KB of kernel arguments.
constexpr int kMaxTensors = 12;
constexpr int kMaxBlocks = 256;
constexpr int kThreads = 256;
constexpr int kMaxGroups = 64;

struct LaunchTable {
  UpdateEntry entries[kMaxTensors];
  uint8_t block_entry[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
  int64_t chunk_tiles;
};
static_assert(sizeof(LaunchTable) <= 4000,
              "the launch table must fit in the 4 KB of kernel arguments");

// The four z of counter `lane` of tile `tile` of a tensor: elements
// lane + 32 l, l = 0..3, of the tile.
__device__ __forceinline__ void counter_noise(noise::Kind kind,
                                              noise::Key key,
                                              uint32_t index,
                                              uint32_t step,
                                              uint64_t tile,
                                              int lane,
                                              float* z) {
  if (kind == noise::Kind::Rademacher) {
    uint32_t words[4] = {static_cast<uint32_t>(tile),
                         static_cast<uint32_t>(tile >> 32),
                         index,
                         step};
    noise::philox(words[0], words[1], words[2], words[3], key.lo, key.hi);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      z[l] = noise::rademacher_sign(words[l], lane);
    }
  } else {
    noise::gaussian_lane(
        key, index, step, tile * kLanes + lane, z[0], z[1], z[2], z[3]);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const LaunchTable table) {
  using opmath_t = at::opmath_type<scalar_t>;
  const UpdateEntry& entry = table.entries[table.block_entry[blockIdx.x]];
  const TensorStep step = entry.resolved ? entry.step : resolve(entry.source);
  const engine::Coefficients& c = step.coefficients;
  const noise::Key key = noise::direction_key(step.key, step.direction);
  scalar_t* data = static_cast<scalar_t*>(entry.data);
  // Tiles counted from the first the tensor's elements lie in.
  const int64_t tiles = tile_count(entry);
  const int64_t first_tile =
      int64_t{table.block_chunk[blockIdx.x]} * table.chunk_tiles;
  const int64_t end_tile = min(first_tile + table.chunk_tiles, tiles);
  for (int64_t counter = first_tile * kLanes + threadIdx.x;
       counter < end_tile * kLanes;
       counter += blockDim.x) {
    const uint64_t tile =
        static_cast<uint64_t>(first_tile_of(entry) + counter / kLanes);
    const int lane = static_cast<int>(counter % kLanes);
    float z[4];
    counter_noise(step.kind, key, entry.index, step.step, tile, lane, z);
    // The tensor's element that is element `lane` of the tile.
    const int64_t first =
        static_cast<int64_t>(tile) * kTile + lane - entry.offset;
    opmath_t x[4] = {};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = first + l * kLanes;
      if (e >= 0 && e < entry.numel) {
        x[l] = entry.master != nullptr
                   ? apply<float>(c, entry.master[e], z[l])
                   : apply<opmath_t>(c,
                                     static_cast<opmath_t>(data[e]),
                                     static_cast<opmath_t>(z[l]));
      }
    }
    // The moves along the step's other directions (kernel_common.h).
    for (int64_t j = 0; j < step.other_directions; ++j) {
      counter_noise(step.kind,
                    noise::direction_key(step.key, static_cast<uint32_t>(j)),
                    entry.index,
                    step.step,
                    tile,
                    lane,
                    z);
      const auto move = static_cast<opmath_t>(step.other_step_sizes[j]);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        x[l] = x[l] - move * static_cast<opmath_t>(z[l]);
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = first + l * kLanes;
      if (e >= 0 && e < entry.numel) {
        data[e] = static_cast<scalar_t>(x[l]);
        if (entry.master != nullptr && c.writes_master) {
          entry.master[e] = static_cast<float>(x[l]);
        }
      }
    }
  }
}

template <typename scalar_t>
void launch(const LaunchTable& table, int blocks) {
  update_kernel<scalar_t>
      <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// Runs the entries of one dtype: tiles in chunks of a size that gives every
// SM a few blocks, in as few launches as the table allows.
template <typename scalar_t>
void update_dtype(const std::vector<UpdateEntry>& entries) {
  int64_t total_tiles = 0;
  for (const auto& entry : entries) {
    total_tiles += tile_count(entry);
  }
  const int64_t sms = sm_count();
  LaunchTable table{};
  table.chunk_tiles = std::clamp<int64_t>(total_tiles / (4 * sms), 8, 512);
  int tensors = 0;
  int blocks = 0;
  for (const auto& entry : entries) {
    const int64_t chunks =
        (tile_count(entry) + table.chunk_tiles - 1) / table.chunk_tiles;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (blocks == kMaxBlocks || (chunk == 0 && tensors == kMaxTensors)) {
        launch<scalar_t>(table, blocks);
        tensors = 0;
        blocks = 0;
      }
      // A tensor whose chunks span two launches is in both tables.
      if (chunk == 0 || tensors == 0) {
        table.entries[tensors++] = entry;
      }
      table.block_entry[blocks] = static_cast<uint8_t>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
    }
  }
  if (blocks > 0) {
    launch<scalar_t>(table, blocks);
  }
}

void update(c10::ArrayRef<UpdateEntry> entries) {
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    std::vector<UpdateEntry> of_dtype;
    for (const auto& entry : entries) {
      if (entry.dtype == dtype) {
        of_dtype.push_back(entry);
      }
    }
    if (of_dtype.empty()) {
      continue;
    }
    switch (dtype) {
      case at::kFloat:
        update_dtype<float>(of_dtype);
        break;
      case at::kDouble:
        update_dtype<double>(of_dtype);
        break;
      case at::kBFloat16:
        update_dtype<c10::BFloat16>(of_dtype);
        break;
      default:
        update_dtype<c10::Half>(of_dtype);
        break;
    }
  }
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

struct GroupTable {
  double* states[kMaxGroups];
  const double* plans[kMaxGroups];
  int count;
};

__global__ void settle_kernel(const GroupTable groups, double* taken) {
  const bool all = engine::all_finite(groups.plans, groups.count);
  for (int g = 0; g < groups.count; ++g) {
    engine::commit_group(groups.states[g], groups.plans[g], all);
  }
  *taken = all ? 1 : 0;
}

at::Tensor settle(at::TensorList states, at::TensorList plans) {
  TORCH_CHECK(states.size() <= kMaxGroups,
              "dopamine: a step with its state on the GPU takes at most ",
              kMaxGroups,
              " parameter groups, got ",
              states.size());
  GroupTable groups{};
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
