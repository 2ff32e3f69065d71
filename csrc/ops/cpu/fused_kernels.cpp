// Fused CPU kernels of the tensor ops: one pass over each parameter that
// draws the noise of a tile of 128 elements into a stack buffer
// (noise_tiles.h) and applies the update to it, with no tensor allocated.
// Tiles are split among threads with at::parallel_for; a tile's noise
// depends only on its position, so the result is the same for any thread
// count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../kernel_common.h"
#include "noise_tiles.h"

namespace dopamine::ops {
namespace {

using cpu::NoiseStream;
using noise::kTile;

// Tiles per parallel task: about 64K elements, to amortise thread start-up.
constexpr int64_t kGrainTiles = 512;

// data[e] = update(data[e], z[e]) for the tiles [begin, end) of a tensor of
// `numel` elements, in the arithmetic of opmath_t.
template <auto philox, typename scalar_t, typename Update>
C10_ALWAYS_INLINE void update_tiles(scalar_t* data,
                                    int64_t numel,
                                    const NoiseStream& stream,
                                    int64_t begin,
                                    int64_t end,
                                    const Update& update) {
  using opmath_t = at::opmath_type<scalar_t>;
  alignas(64) float z[kTile];
  for (int64_t tile = begin; tile < end; ++tile) {
    cpu::fill_tile<philox>(stream, static_cast<uint64_t>(tile), z);
    scalar_t* p = data + tile * kTile;
    const int64_t count = std::min<int64_t>(kTile, numel - tile * kTile);
    for (int64_t e = 0; e < count; ++e) {
      p[e] = static_cast<scalar_t>(
          update(static_cast<opmath_t>(p[e]), static_cast<opmath_t>(z[e])));
    }
  }
}

template <typename scalar_t, typename Update>
void update_tensor(const at::Tensor& param,
                   const NoiseStream& stream,
                   const Update& update) {
  scalar_t* data = param.data_ptr<scalar_t>();
  const int64_t numel = param.numel();
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrainTiles, [&](int64_t begin, int64_t end) {
    cpu::on_widest_path([&](auto lanes) DOPAMINE_PATH_BODY {
      update_tiles<decltype(lanes)::philox>(
          data, numel, stream, begin, end, update);
    });
  });
}

struct Cpu {
  // Applies Update<opmath_t>(update_args...) to every parameter, each with
  // its own noise stream.
  template <template <typename> class Update, typename... UpdateArgs>
  static void update_params(at::TensorList params,
                            const TensorOpArgs& args,
                            UpdateArgs... update_args) {
    for (size_t i = 0; i < params.size(); ++i) {
      const NoiseStream stream{args.kind, args.key, args.index[i], args.step};
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf,
          at::kBFloat16,
          params[i].scalar_type(),
          "dopamine_update",
          [&] {
            using opmath_t = at::opmath_type<scalar_t>;
            update_tensor<scalar_t>(
                args.work[i], stream, Update<opmath_t>(update_args...));
          });
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, CPU, m) {
  TensorOps<Cpu>::register_kernels(m);
}

}  // namespace dopamine::ops
