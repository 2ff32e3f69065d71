// The CPU backend: the fused element pass over a table of tensors, and the
// state arithmetic of engine.h on host memory.
//
// The pass draws the noise of a tile of 128 elements into a stack buffer
// (noise_tiles.h) and applies the update to it, with no tensor allocated.
// The tiles of all the tensors of an op are numbered in one sequence and split
// among threads by a single at::parallel_for, so many small tensors cost no
// more thread start-ups than one large one (docs/DESIGN.md, "Kernels"). A
// tile's noise depends only on its tensor and position, so the result is the
// same for any thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../kernel_common.h"
#include "noise_tiles.h"

namespace dopamine::ops {
namespace {

using cpu::NoiseStream;
using noise::kTile;

// Tiles per parallel task: about 64K elements, to amortise thread start-up.
constexpr int64_t kGrainTiles = 512;

// z of elements [element, element + count) of a low-rank perturbation into
// z: noise::lowrank_element's arithmetic, a row's run of columns at a time
// so that it vectorizes.
C10_ALWAYS_INLINE void lowrank_noise(const float* factors,
                                     int64_t rows,
                                     int64_t cols,
                                     uint32_t rank,
                                     int64_t element,
                                     int64_t count,
                                     float* z) {
  const float scale = noise::lowrank_scale(rank);
  while (count > 0) {
    const int64_t row = element / cols, col = element % cols;
    const int64_t length = std::min(count, cols - col);
    const float u = factors[row];
    const float* v = factors + rows + col;
    for (int64_t e = 0; e < length; ++e) {
      z[e] = u * v[e];
    }
    for (uint32_t l = 1; l < rank; ++l) {
      const float* factor = factors + l * (rows + cols);
      const float ul = factor[row];
      const float* vl = factor + rows + col;
      for (int64_t e = 0; e < length; ++e) {
        z[e] = fmaf(ul, vl[e], z[e]);
      }
    }
    for (int64_t e = 0; e < length; ++e) {
      z[e] = z[e] * scale;
    }
    z += length;
    element += length;
    count -= length;
  }
}

// The noise stream of the entry in slot `slot` of the step (direction_of).
C10_ALWAYS_INLINE NoiseStream stream_of(const TensorEntry& entry,
                                        const TensorStep& step,
                                        int64_t slot) {
  return {step.kind,
          noise::direction_key(step.key, direction_of(step, slot)),
          entry.index,
          step.step};
}

// The streams of a call's first slots, keyed once rather than per tile.
constexpr int64_t kKeyedSlots = 16;

// z of tile `tile`'s elements [from, from + count) into z + from, in slot
// `slot` of the step: the noise, or the low-rank perturbation of the entry's
// factors. A function, not a lambda: a lambda's body would not inherit the
// path's instruction set.
template <auto philox>
C10_ALWAYS_INLINE void draw_tile(const TensorEntry& entry,
                                 const TensorStep& step,
                                 const NoiseStream* streams,
                                 int64_t slot,
                                 int64_t tile,
                                 int64_t from,
                                 int64_t count,
                                 float* z) {
  if (entry.factors != nullptr) {
    lowrank_noise(
        factors_of(entry.factors, entry.rows, entry.cols, step.rank, slot),
        entry.rows,
        entry.cols,
        step.rank,
        tile * kTile + from,
        count,
        z + from);
    return;
  }
  cpu::fill_tile<philox>(
      slot < kKeyedSlots ? streams[slot] : stream_of(entry, step, slot),
      static_cast<uint64_t>(tile),
      z);
}

// The tiles [begin, end) of one tensor (counted from the first its elements
// lie in): x' = apply(c, x, z), where x is the master weight when there is
// one (the parameter then becomes x' rounded), less the moves along the
// step's other directions (kernel_common.h).
template <auto philox, typename scalar_t>
C10_ALWAYS_INLINE void update_tiles(const TensorEntry& entry,
                                    const TensorStep& step,
                                    int64_t begin,
                                    int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const engine::Coefficients& c = step.coefficients;
  alignas(64) float z[kTile];
  alignas(64) opmath_t x[kTile];
  NoiseStream streams[kKeyedSlots];
  for (int64_t slot = 0;
       slot < std::min(1 + step.other_directions, kKeyedSlots);
       ++slot) {
    streams[slot] = stream_of(entry, step, slot);
  }
  const int64_t first_tile = first_tile_of(entry.offset);
  for (int64_t tile = first_tile + begin; tile < first_tile + end; ++tile) {
    // The tile's elements [from, to) that are this tensor's, as offsets in
    // the tile; element `from` is the tensor's element `first`.
    const int64_t from = std::max<int64_t>(0, entry.offset - tile * kTile);
    const int64_t to =
        std::min<int64_t>(kTile, entry.offset + entry.numel - tile * kTile);
    const int64_t first = tile * kTile + from - entry.offset;
    const int64_t count = to - from;
    draw_tile<philox>(entry, step, streams, 0, tile, from, count, z);
    const float* zt = z + from;
    scalar_t* p = static_cast<scalar_t*>(entry.data) + first;
    float* m = entry.master != nullptr ? entry.master + first : nullptr;
    if (m != nullptr) {
      for (int64_t e = 0; e < count; ++e) {
        x[e] = apply<float>(c, m[e], zt[e]);
      }
    } else {
      for (int64_t e = 0; e < count; ++e) {
        x[e] = apply<opmath_t>(
            c, static_cast<opmath_t>(p[e]), static_cast<opmath_t>(zt[e]));
      }
    }
    for (int64_t j = 0; j < step.other_directions; ++j) {
      draw_tile<philox>(entry, step, streams, 1 + j, tile, from, count, z);
      const auto move = static_cast<opmath_t>(other_step_size(step, j));
      for (int64_t e = 0; e < count; ++e) {
        x[e] = x[e] - move * static_cast<opmath_t>(zt[e]);
      }
    }
    for (int64_t e = 0; e < count; ++e) {
      p[e] = static_cast<scalar_t>(x[e]);
    }
    if (m != nullptr && c.writes_master) {
      for (int64_t e = 0; e < count; ++e) {
        m[e] = static_cast<float>(x[e]);
      }
    }
  }
}

template <auto philox>
C10_ALWAYS_INLINE void update_entry_tiles(const TensorEntry& entry,
                                          const TensorStep& step,
                                          int64_t begin,
                                          int64_t end) {
  switch (entry.dtype) {
    case at::kFloat:
      update_tiles<philox, float>(entry, step, begin, end);
      break;
    case at::kDouble:
      update_tiles<philox, double>(entry, step, begin, end);
      break;
    case at::kBFloat16:
      update_tiles<philox, c10::BFloat16>(entry, step, begin, end);
      break;
    case at::kHalf:
      update_tiles<philox, c10::Half>(entry, step, begin, end);
      break;
    default:
      break;  // step_ops.cpp admits these four dtypes only
  }
}

void update(const KernelTable& table) {
  const auto& entries = table.tensors;
  // first_tile[i]: the number of tiles of the entries before entry i.
  std::vector<int64_t> first_tile(entries.size() + 1, 0);
  for (size_t i = 0; i < entries.size(); ++i) {
    first_tile[i + 1] =
        first_tile[i] + tile_count(entries[i].offset, entries[i].numel);
  }
  // Each kernel group's step, resolved once (from host memory when the
  // host did not).
  std::vector<TensorStep> steps;
  for (const auto& group : table.groups) {
    steps.push_back(step_of(group));
  }
  // Decided here, on the calling thread, where a warning reaches the caller.
  const cpu::CpuPath path = cpu::cpu_path();
  at::parallel_for(
      0, first_tile.back(), kGrainTiles, [&](int64_t begin, int64_t end) {
        cpu::on_path(path, [&](auto lanes) DOPAMINE_PATH_BODY {
          // The last entry whose first tile is at or before `begin`.
          size_t i =
              std::upper_bound(first_tile.begin(), first_tile.end(), begin) -
              first_tile.begin() - 1;
          for (; i < entries.size() && first_tile[i] < end; ++i) {
            const int64_t from = std::max(begin, first_tile[i]);
            const int64_t to = std::min(end, first_tile[i + 1]);
            update_entry_tiles<decltype(lanes)::philox>(entries[i],
                                                        steps[entries[i].group],
                                                        from - first_tile[i],
                                                        to - first_tile[i]);
          }
        });
      });
}

void plan(const at::Tensor& state,
          const at::Tensor& losses,
          const engine::GroupOptions& options,
          const at::Tensor& plan) {
  engine::plan_group(state.data_ptr<double>(),
                     losses.data_ptr<double>(),
                     options,
                     plan.data_ptr<double>());
}

at::Tensor settle(at::TensorList states, at::TensorList plans) {
  std::vector<const double*> plan_data;
  for (const auto& p : plans) {
    plan_data.push_back(p.data_ptr<double>());
  }
  const bool taken =
      engine::all_finite(plan_data.data(), static_cast<int>(plan_data.size()));
  for (size_t g = 0; g < states.size(); ++g) {
    engine::commit_group(states[g].data_ptr<double>(), plan_data[g], taken);
  }
  auto result = at::empty({}, states[0].options());
  result.data_ptr<double>()[0] = taken ? 1 : 0;
  return result;
}

const BackendRegistrar cpu_backend(c10::DeviceType::CPU,
                                   {&update, &plan, &settle});

std::string cpu_capability_kernel() {
  return cpu::to_string(cpu::cpu_path());
}

TORCH_LIBRARY_IMPL(dopamine, CompositeExplicitAutograd, m) {
  m.impl("cpu_capability", &cpu_capability_kernel);
}

}  // namespace
}  // namespace dopamine::ops
