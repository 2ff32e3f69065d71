#pragma once

// The CUDA backend's launch plan and kernel bodies, in code that both nvcc
// and the host compiler build: fused_kernels.cu launches them, and the CUDA
// emulation tests run the same bodies on the CPU over an emulated grid
// (docs/DESIGN.md, "Kernels").
//
// The element pass is a multi-tensor launch in the manner of apex's
// multi_tensor_apply: the kernel's arguments carry a table of up to
// kMaxTensors tensors of one dtype, one narrow entry each, beside the entries
// of their kernel groups. Block b handles tiles [b, b + 1) * chunk_tiles of
// the launch's tiles numbered in one sequence; the block first sums the
// tensors' tile counts in shared memory, then finds its tensors in those
// sums. Thread t of a block handles counter t of a tile: in a Gaussian tile,
// counter j gives the four normals of elements j, 32 + j, 64 + j and 96 + j;
// in a Rademacher tile, bit j of the tile's four words gives the same four
// elements. A warp so reads and writes 128 consecutive bytes per element row.
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernel_common.h"

namespace dopamine::ops::cuda {

using noise::kLanes;
using noise::kTile;

constexpr int kMaxTensors = 100;
constexpr int kMaxGroups = 3;
constexpr int kThreads = 256;
// A table entry counts its elements in 32 bits: a larger tensor is split
// into pieces of at most this many elements, each with its own offset.
constexpr int64_t kMaxPieceElements = int64_t{1} << 30;

// A tensor's low-rank perturbation (TensorEntry's rows, cols and factors),
// in memory the kernel reads through LaunchTable::lowrank: the table has no
// room for it. factors is null for a tensor perturbed in full.
struct LowRankTensor {
  const float* factors;
  int64_t rows;
  int64_t cols;
};

// The kernel's argument: struct of arrays, so that 100 tensors fit.
struct LaunchTable {
  void* data[kMaxTensors];
  float* master[kMaxTensors];
  int64_t offset[kMaxTensors];
  int32_t numel[kMaxTensors];
  uint32_t index[kMaxTensors];
  uint8_t group[kMaxTensors];
  GroupEntry groups[kMaxGroups];
  // One per tensor where the kernel runs, or null when none of the launch's
  // tensors is perturbed at low rank.
  const LowRankTensor* lowrank;
  int64_t chunk_tiles;
  int32_t tensors;
};
static_assert(sizeof(LaunchTable) <= 4000,
              "the launch table must fit in the 4 KB of kernel arguments");
static_assert(kThreads >= kMaxTensors,
              "a block counts each tensor's tiles with one thread");

struct Launch {
  LaunchTable table;
  int64_t blocks;
  // The launch's LowRankTensor of each tensor on the host, to be copied where
  // the kernel runs and given to table.lowrank; empty when none has factors.
  std::vector<LowRankTensor> lowrank;
};

// The launches that run the tensors of `dtype` in `table`: chunks of a size
// that gives each of the `sms` SMs a few blocks, and up to kMaxTensors
// tensors (or pieces) and kMaxGroups kernel groups a launch.
inline std::vector<Launch> plan_launches(const KernelTable& table,
                                         at::ScalarType dtype,
                                         int64_t sms) {
  int64_t total_tiles = 0;
  for (const auto& tensor : table.tensors) {
    if (tensor.dtype == dtype) {
      total_tiles += tile_count(tensor.offset, tensor.numel);
    }
  }
  std::vector<Launch> launches;
  const int64_t chunk_tiles =
      std::clamp<int64_t>(total_tiles / (4 * sms), 8, 512);
  std::vector<uint32_t> launch_groups;  // the kernel groups of the last
  int64_t launch_tiles = 0;
  const auto close = [&] {
    if (!launches.empty()) {
      launches.back().blocks = (launch_tiles + chunk_tiles - 1) / chunk_tiles;
    }
  };
  for (const auto& tensor : table.tensors) {
    if (tensor.dtype != dtype) {
      continue;
    }
    for (int64_t begin = 0; begin < tensor.numel; begin += kMaxPieceElements) {
      auto group =
          std::find(launch_groups.begin(), launch_groups.end(), tensor.group);
      if (launches.empty() || launches.back().table.tensors == kMaxTensors ||
          (group == launch_groups.end() &&
           launch_groups.size() == kMaxGroups)) {
        close();
        launches.emplace_back();
        launches.back().table.chunk_tiles = chunk_tiles;
        launch_groups.clear();
        launch_tiles = 0;
        group = launch_groups.end();
      }
      LaunchTable& launch = launches.back().table;
      if (group == launch_groups.end()) {
        launch.groups[launch_groups.size()] = table.groups[tensor.group];
        launch_groups.push_back(tensor.group);
        group = std::prev(launch_groups.end());
      }
      const int64_t numel = std::min(kMaxPieceElements, tensor.numel - begin);
      const int t = launch.tensors++;
      launch.data[t] =
          static_cast<char*>(tensor.data) + begin * c10::elementSize(dtype);
      launch.master[t] =
          tensor.master != nullptr ? tensor.master + begin : nullptr;
      launch.offset[t] = tensor.offset + begin;
      launch.numel[t] = static_cast<int32_t>(numel);
      launch.index[t] = tensor.index;
      launch.group[t] = static_cast<uint8_t>(group - launch_groups.begin());
      launch_tiles += tile_count(launch.offset[t], numel);
      if (tensor.factors != nullptr) {
        launches.back().lowrank.resize(kMaxTensors);
        launches.back().lowrank[t] = {tensor.factors, tensor.rows, tensor.cols};
      }
    }
  }
  close();
  return launches;
}

// Calls run(launch, scalar_t{}) for each launch of each dtype of `table`.
template <typename Run>
void for_each_launch(const KernelTable& table, int64_t sms, const Run& run) {
  const auto run_dtype = [&](auto zero) {
    const auto dtype = c10::CppTypeToScalarType<decltype(zero)>::value;
    for (const auto& launch : plan_launches(table, dtype, sms)) {
      run(launch, zero);
    }
  };
  run_dtype(float{});
  run_dtype(double{});
  run_dtype(c10::BFloat16{});
  run_dtype(c10::Half{});
}

// The four z of counter `lane` of tile `tile` of a tensor: elements
// lane + 32 l, l = 0..3, of the tile.
C10_HOST_DEVICE C10_ALWAYS_INLINE void counter_noise(noise::Kind kind,
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
    for (int l = 0; l < 4; ++l) {
      z[l] = noise::rademacher_sign(words[l], lane);
    }
  } else {
    noise::gaussian_lane(
        key, index, step, tile * kLanes + lane, z[0], z[1], z[2], z[3]);
  }
}

// The four z of counter `lane` of tile `tile` of tensor t along the step's
// own direction (slot 0) or its other direction slot - 1: the noise, or the
// low-rank perturbation of the tensor's factors (elements past the
// parameter's end get 0; nothing writes them).
C10_HOST_DEVICE C10_ALWAYS_INLINE void tensor_noise(const LaunchTable& table,
                                                    int t,
                                                    const TensorStep& step,
                                                    int64_t slot,
                                                    uint64_t tile,
                                                    int lane,
                                                    float* z) {
  if (table.lowrank != nullptr && table.lowrank[t].factors != nullptr) {
    const LowRankTensor& low = table.lowrank[t];
    const float* factors =
        factors_of(low.factors, low.rows, low.cols, step.rank, slot);
    for (int l = 0; l < 4; ++l) {
      const auto element =
          static_cast<int64_t>(tile) * kTile + lane + l * kLanes;
      z[l] = element < low.rows * low.cols
                 ? noise::lowrank_element(factors,
                                          low.rows,
                                          low.cols,
                                          step.rank,
                                          element / low.cols,
                                          element % low.cols)
                 : 0.0f;
    }
    return;
  }
  counter_noise(step.kind,
                noise::direction_key(step.key, direction_of(step, slot)),
                table.index[t],
                step.step,
                tile,
                lane,
                z);
}

// A block's shared memory: first_tile[t] is the number of the launch's
// tiles before tensor t's.
struct BlockShared {
  int64_t first_tile[kMaxTensors + 1];
};

// The update kernel's phases; a __syncthreads separates each from the next.
constexpr int kUpdatePhases = 3;

// Counter `counter` of the tiles of tensor t: x' = apply(c, x, z), where x
// is the master weight when there is one (the parameter then becomes x'
// rounded), less the moves along the step's other directions
// (kernel_common.h).
template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_counter(const LaunchTable& table,
                                                      int t,
                                                      const TensorStep& step,
                                                      int64_t counter) {
  using opmath_t = at::opmath_type<scalar_t>;
  const engine::Coefficients& c = step.coefficients;
  const int64_t offset = table.offset[t];
  const int64_t numel = table.numel[t];
  float* master = table.master[t];
  scalar_t* data = static_cast<scalar_t*>(table.data[t]);
  const uint64_t tile =
      static_cast<uint64_t>(first_tile_of(offset) + counter / kLanes);
  const int lane = static_cast<int>(counter % kLanes);
  float z[4];
  tensor_noise(table, t, step, 0, tile, lane, z);
  // The tensor's element that is element `lane` of the tile.
  const int64_t first = static_cast<int64_t>(tile) * kTile + lane - offset;
  opmath_t x[4] = {};
  for (int l = 0; l < 4; ++l) {
    const int64_t e = first + l * kLanes;
    if (e >= 0 && e < numel) {
      x[l] = master != nullptr ? apply<float>(c, master[e], z[l])
                               : apply<opmath_t>(c,
                                                 static_cast<opmath_t>(data[e]),
                                                 static_cast<opmath_t>(z[l]));
    }
  }
  for (int64_t j = 0; j < step.other_directions; ++j) {
    tensor_noise(table, t, step, 1 + j, tile, lane, z);
    const auto move = static_cast<opmath_t>(other_step_size(step, j));
    for (int l = 0; l < 4; ++l) {
      x[l] = x[l] - move * static_cast<opmath_t>(z[l]);
    }
  }
  for (int l = 0; l < 4; ++l) {
    const int64_t e = first + l * kLanes;
    if (e >= 0 && e < numel) {
      data[e] = static_cast<scalar_t>(x[l]);
      if (master != nullptr && c.writes_master) {
        master[e] = static_cast<float>(x[l]);
      }
    }
  }
}

// Phase `phase` of thread `thread` of block `block`, `threads` a block.
template <typename scalar_t>
C10_HOST_DEVICE void update_phase(int phase,
                                  const LaunchTable& table,
                                  int64_t block,
                                  int thread,
                                  int threads,
                                  BlockShared& shared) {
  if (phase == 0) {
    // Each tensor's tile count, one thread per tensor.
    if (thread < table.tensors) {
      shared.first_tile[thread + 1] =
          tile_count(table.offset[thread], table.numel[thread]);
    }
    if (thread == 0) {
      shared.first_tile[0] = 0;
    }
  } else if (phase == 1) {
    if (thread == 0) {
      for (int t = 0; t < table.tensors; ++t) {
        shared.first_tile[t + 1] += shared.first_tile[t];
      }
    }
  } else {
    const int64_t begin = block * table.chunk_tiles;
    const int64_t total = shared.first_tile[table.tensors];
    const int64_t end =
        begin + table.chunk_tiles < total ? begin + table.chunk_tiles : total;
    // The last tensor whose first tile is at or before `begin`.
    int low = 0;
    int high = table.tensors - 1;
    while (low < high) {
      const int middle = (low + high + 1) / 2;
      if (shared.first_tile[middle] <= begin) {
        low = middle;
      } else {
        high = middle - 1;
      }
    }
    for (int t = low; t < table.tensors && shared.first_tile[t] < end; ++t) {
      const TensorStep step = step_of(table.groups[table.group[t]]);
      const int64_t from = begin > shared.first_tile[t]
                               ? begin - shared.first_tile[t]
                               : int64_t{0};
      const int64_t to =
          (end < shared.first_tile[t + 1] ? end : shared.first_tile[t + 1]) -
          shared.first_tile[t];
      for (int64_t counter = from * kLanes + thread; counter < to * kLanes;
           counter += threads) {
        update_counter<scalar_t>(table, t, step, counter);
      }
    }
  }
}

// settle's table: a step's groups, whose states it commits.
constexpr int kMaxSettleGroups = 64;
struct SettleTable {
  double* states[kMaxSettleGroups];
  const double* plans[kMaxSettleGroups];
  int count;
};

// settle, in one thread: taken = every plan finite; commits every state.
C10_HOST_DEVICE inline void settle_groups(const SettleTable& groups,
                                          double* taken) {
  const bool all = engine::all_finite(groups.plans, groups.count);
  for (int g = 0; g < groups.count; ++g) {
    engine::commit_group(groups.states[g], groups.plans[g], all);
  }
  *taken = all ? 1 : 0;
}

}  // namespace dopamine::ops::cuda
