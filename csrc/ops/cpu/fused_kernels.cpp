// Fused CPU kernels of the tensor ops: one pass over each parameter that
// draws the noise of a tile of 128 elements into a stack buffer and applies
// the update to it, with no tensor allocated. Tiles are split among threads
// with at::parallel_for; a tile's noise depends only on its position, so the
// result is the same for any thread count.
//
// The tile loops are compiled for the baseline instruction set and, on
// x86-64, for AVX2 + FMA and for AVX-512 (function attributes, so no header
// code is compiled for an ISA the machine may lack); the widest one the CPU
// has runs. All compute the same bits: the noise uses explicit fmaf and this
// file is built with -ffp-contract=off.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../kernel_common.h"

namespace dopamine::ops {
namespace {

using noise::Kind;
using noise::kLanes;
using noise::kTile;

// Tiles per parallel task: about 64K elements, to amortise thread start-up.
constexpr int64_t kGrainTiles = 512;

struct NoiseStream {
  Kind kind;
  noise::Key key;
  uint32_t index;
  uint32_t step;
};

// Philox of the kLanes counters of a Gaussian tile, in place, in plain C++
// (the compiler vectorizes it, poorly: it widens every lane to 64 bits).
void philox_lanes(
    uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, noise::Key key) {
  for (int j = 0; j < kLanes; ++j) {
    noise::philox(c0[j], c1[j], c2[j], c3[j], key.lo, key.hi);
  }
}

// z of the 128 elements of tile `tile` (SPEC's z, see noise.h) into `z`;
// `philox` is philox_lanes or one of its vector forms.
template <auto philox>
C10_ALWAYS_INLINE void fill_tile(const NoiseStream& stream,
                                 uint64_t tile,
                                 float* z) {
  if (stream.kind == Kind::Rademacher) {
    uint32_t words[4] = {static_cast<uint32_t>(tile),
                         static_cast<uint32_t>(tile >> 32),
                         stream.index,
                         stream.step};
    noise::philox(
        words[0], words[1], words[2], words[3], stream.key.lo, stream.key.hi);
    for (int word = 0; word < 4; ++word) {
      for (int bit = 0; bit < 32; ++bit) {
        z[word * 32 + bit] = noise::rademacher_sign(words[word], bit);
      }
    }
    return;
  }
  // Struct of arrays, so that the compiler vectorizes across counters.
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t block = tile * kLanes + j;
    c0[j] = static_cast<uint32_t>(block);
    c1[j] = static_cast<uint32_t>(block >> 32);
    c2[j] = stream.index;
    c3[j] = stream.step;
  }
  philox(c0, c1, c2, c3, stream.key);
  for (int j = 0; j < kLanes; ++j) {
    noise::box_muller(c0[j], c1[j], z[j], z[kLanes + j]);
  }
  for (int j = 0; j < kLanes; ++j) {
    noise::box_muller(c2[j], c3[j], z[2 * kLanes + j], z[3 * kLanes + j]);
  }
}

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
    fill_tile<philox>(stream, static_cast<uint64_t>(tile), z);
    scalar_t* p = data + tile * kTile;
    const int64_t count = std::min<int64_t>(kTile, numel - tile * kTile);
    for (int64_t e = 0; e < count; ++e) {
      p[e] = static_cast<scalar_t>(
          update(static_cast<opmath_t>(p[e]), static_cast<opmath_t>(z[e])));
    }
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define DOPAMINE_HAS_X86_PATHS 1

// philox_lanes with intrinsics, BITS / 32 counters per vector. The
// widening multiply of even lanes (mul_epu32), done for the even and the odd
// lanes and blended, gives the high and low halves of M * c of every lane
// without widening the lanes. One body for AVX2 and AVX-512.
#define DOPAMINE_PHILOX_LANES(BITS, VEC, PFX, BLEND)                     \
  const VEC m0 = PFX##_set1_epi32(static_cast<int>(noise::kPhiloxM0));   \
  const VEC m1 = PFX##_set1_epi32(static_cast<int>(noise::kPhiloxM1));   \
  for (int j = 0; j < kLanes; j += BITS / 32) {                          \
    VEC x0 = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c0 + j)); \
    VEC x1 = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c1 + j)); \
    VEC x2 = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c2 + j)); \
    VEC x3 = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c3 + j)); \
    VEC k0 = PFX##_set1_epi32(static_cast<int>(key.lo));                 \
    VEC k1 = PFX##_set1_epi32(static_cast<int>(key.hi));                 \
    for (int round = 0; round < 10; ++round) {                           \
      const VEC even0 = PFX##_mul_epu32(x0, m0);                         \
      const VEC odd0 = PFX##_mul_epu32(PFX##_srli_epi64(x0, 32), m0);    \
      const VEC even1 = PFX##_mul_epu32(x2, m1);                         \
      const VEC odd1 = PFX##_mul_epu32(PFX##_srli_epi64(x2, 32), m1);    \
      const VEC hi0 = BLEND(PFX##_srli_epi64(even0, 32), odd0);          \
      const VEC lo0 = BLEND(even0, PFX##_slli_epi64(odd0, 32));          \
      const VEC hi1 = BLEND(PFX##_srli_epi64(even1, 32), odd1);          \
      const VEC lo1 = BLEND(even1, PFX##_slli_epi64(odd1, 32));          \
      x0 = PFX##_xor_si##BITS(PFX##_xor_si##BITS(hi1, x1), k0);          \
      x2 = PFX##_xor_si##BITS(PFX##_xor_si##BITS(hi0, x3), k1);          \
      x1 = lo1;                                                          \
      x3 = lo0;                                                          \
      k0 = PFX##_add_epi32(                                              \
          k0, PFX##_set1_epi32(static_cast<int>(noise::kPhiloxW0)));     \
      k1 = PFX##_add_epi32(                                              \
          k1, PFX##_set1_epi32(static_cast<int>(noise::kPhiloxW1)));     \
    }                                                                    \
    PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c0 + j), x0);           \
    PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c1 + j), x1);           \
    PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c2 + j), x2);           \
    PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c3 + j), x3);           \
  }

#define DOPAMINE_BLEND256(a, b) _mm256_blend_epi32(a, b, 0xAA)
#define DOPAMINE_BLEND512(a, b) _mm512_mask_blend_epi32(0xAAAA, a, b)

__attribute__((target("avx2,fma"))) void philox_lanes_avx2(
    uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, noise::Key key) {
  DOPAMINE_PHILOX_LANES(256, __m256i, _mm256, DOPAMINE_BLEND256)
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma"))) void
philox_lanes_avx512(
    uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, noise::Key key) {
  DOPAMINE_PHILOX_LANES(512, __m512i, _mm512, DOPAMINE_BLEND512)
}

template <typename scalar_t, typename Update>
__attribute__((target("avx2,fma"))) void update_tiles_avx2(
    scalar_t* data,
    int64_t numel,
    const NoiseStream& stream,
    int64_t begin,
    int64_t end,
    const Update& update) {
  update_tiles<&philox_lanes_avx2>(data, numel, stream, begin, end, update);
}

template <typename scalar_t, typename Update>
__attribute__((target(
    "avx512f,avx512vl,avx512dq,avx512bw,fma,prefer-vector-width=512"))) void
update_tiles_avx512(scalar_t* data,
                    int64_t numel,
                    const NoiseStream& stream,
                    int64_t begin,
                    int64_t end,
                    const Update& update) {
  update_tiles<&philox_lanes_avx512>(data, numel, stream, begin, end, update);
}

enum class CpuPath { Baseline, Avx2, Avx512 };

// The widest path this CPU runs, capped by DOPAMINE_CPU_CAPABILITY
// (baseline, avx2 or avx512) when set: all paths compute the same bits, and
// the cap lets tests and benchmarks compare them.
CpuPath cpu_path() {
  static const CpuPath path = [] {
    CpuPath best = CpuPath::Baseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = CpuPath::Avx2;
      if (__builtin_cpu_supports("avx512f") &&
          __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512bw")) {
        best = CpuPath::Avx512;
      }
    }
    const char* cap = std::getenv("DOPAMINE_CPU_CAPABILITY");
    if (cap == nullptr) {
      return best;
    }
    const std::string name(cap);
    const CpuPath wanted = name == "baseline" ? CpuPath::Baseline
                           : name == "avx2"   ? CpuPath::Avx2
                                              : CpuPath::Avx512;
    return std::min(best, wanted);
  }();
  return path;
}
#endif

template <typename scalar_t, typename Update>
void update_tensor(const at::Tensor& param,
                   const NoiseStream& stream,
                   const Update& update) {
  scalar_t* data = param.data_ptr<scalar_t>();
  const int64_t numel = param.numel();
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrainTiles, [&](int64_t begin, int64_t end) {
#ifdef DOPAMINE_HAS_X86_PATHS
    switch (cpu_path()) {
      case CpuPath::Avx512:
        update_tiles_avx512<scalar_t>(data, numel, stream, begin, end, update);
        return;
      case CpuPath::Avx2:
        update_tiles_avx2<scalar_t>(data, numel, stream, begin, end, update);
        return;
      case CpuPath::Baseline:
        break;
    }
#endif
    update_tiles<&philox_lanes, scalar_t>(
        data, numel, stream, begin, end, update);
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
