#pragma once

// A tile's noise on the CPU (z as noise.h defines it), with the widest
// vector instructions the CPU has: shared by the fused kernels
// (fused_kernels.cpp) and the noise benchmark (benchmarks/cpp).
//
// Code is compiled for the baseline instruction set and, on x86-64, for
// AVX2 + FMA and for AVX-512 (function attributes, so no code is compiled
// for an ISA the machine may lack); on_path runs the one cpu_path() picks, the
// widest the CPU has. All compute the same bits: the noise uses explicit fmaf,
// and the files that include this header are built with -ffp-contract=off.
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../noise.h"

namespace dopamine::ops::cpu {

using noise::Kind;
using noise::kLanes;
using noise::kTile;

struct NoiseStream {
  Kind kind;
  noise::Key key;
  uint32_t index;
  uint32_t step;
};

// The counters of the kLanes Gaussian blocks of tile `tile`, struct of
// arrays, so that the compiler vectorizes across counters.
C10_ALWAYS_INLINE void gaussian_counters(const NoiseStream& stream,
                                         uint64_t tile,
                                         uint32_t* c0,
                                         uint32_t* c1,
                                         uint32_t* c2,
                                         uint32_t* c3) {
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t block = tile * kLanes + j;
    c0[j] = static_cast<uint32_t>(block);
    c1[j] = static_cast<uint32_t>(block >> 32);
    c2[j] = stream.index;
    c3[j] = stream.step;
  }
}

// Philox of the kLanes counters of a Gaussian tile, in place, in plain C++
// (the compiler vectorizes it, poorly: it widens every lane to 64 bits).
inline void philox_lanes(
    uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, noise::Key key) {
  for (int j = 0; j < kLanes; ++j) {
    noise::philox(c0[j], c1[j], c2[j], c3[j], key.lo, key.hi);
  }
}

// z of the 128 elements of tile `tile` into `z`; `philox` is philox_lanes or
// one of its vector forms.
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
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  gaussian_counters(stream, tile, c0, c1, c2, c3);
  philox(c0, c1, c2, c3, stream.key);
  for (int j = 0; j < kLanes; ++j) {
    noise::box_muller(c0[j], c1[j], z[j], z[kLanes + j]);
  }
  for (int j = 0; j < kLanes; ++j) {
    noise::box_muller(c2[j], c3[j], z[2 * kLanes + j], z[3 * kLanes + j]);
  }
}

// The Philox form a path uses, as a type: what on_path hands its body.
template <auto function>
struct PhiloxLanes {
  static constexpr auto philox = function;
};

enum class CpuPath { Baseline, Avx2, Avx512 };

inline const char* to_string(CpuPath path) {
  switch (path) {
    case CpuPath::Avx512:
      return "avx512";
    case CpuPath::Avx2:
      return "avx2";
    case CpuPath::Baseline:
      break;
  }
  return "baseline";
}

// `widest`, capped by DOPAMINE_CPU_CAPABILITY (baseline, avx2 or avx512) when
// set: all paths compute the same bits, and the cap lets tests and
// benchmarks compare them. An unknown value is ignored with a warning, as
// ATen does for ATEN_CPU_CAPABILITY. cpu_path() calls it once, on the first
// kernel's calling thread, where a warning reaches the caller.
inline CpuPath capped_path(CpuPath widest) {
  const char* cap = std::getenv("DOPAMINE_CPU_CAPABILITY");
  if (cap == nullptr || *cap == '\0') {
    return widest;
  }
  for (const CpuPath wanted :
       {CpuPath::Baseline, CpuPath::Avx2, CpuPath::Avx512}) {
    if (std::string(cap) == to_string(wanted)) {
      return std::min(widest, wanted);
    }
  }
  TORCH_WARN("ignoring invalid value for DOPAMINE_CPU_CAPABILITY: '",
             cap,
             "' (expected baseline, avx2 or avx512); the kernels take the "
             "widest path this CPU runs, ",
             to_string(widest));
  return widest;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define DOPAMINE_HAS_X86_PATHS 1
// On a body passed to on_path: inlined into the path's function, so
// that it is compiled for that path's instruction set.
#define DOPAMINE_PATH_BODY __attribute__((always_inline))

// philox_lanes with intrinsics, BITS / 32 counters per vector and two
// vectors per pass (independent chains, for instruction-level parallelism).
// The widening multiply of even lanes (mul_epu32), done for the even and the
// odd lanes, gives M * c of every lane as 64-bit products; HI_LO gathers
// their high and low halves without widening the state, and XOR3 is a
// three-way xor. One body for AVX2 and AVX-512.
#define DOPAMINE_PHILOX_LANES(BITS, VEC, PFX, HI_LO, XOR3)                 \
  constexpr int kStride = BITS / 32;                                       \
  const VEC m0 = PFX##_set1_epi32(static_cast<int>(noise::kPhiloxM0));     \
  const VEC m1 = PFX##_set1_epi32(static_cast<int>(noise::kPhiloxM1));     \
  for (int j = 0; j < kLanes; j += 2 * kStride) {                          \
    VEC x0[2], x1[2], x2[2], x3[2];                                        \
    for (int v = 0; v < 2; ++v) {                                          \
      const int at = j + v * kStride;                                      \
      x0[v] = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c0 + at)); \
      x1[v] = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c1 + at)); \
      x2[v] = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c2 + at)); \
      x3[v] = PFX##_loadu_si##BITS(reinterpret_cast<const VEC*>(c3 + at)); \
    }                                                                      \
    uint32_t k0 = key.lo;                                                  \
    uint32_t k1 = key.hi;                                                  \
    for (int round = 0; round < 10; ++round) {                             \
      const VEC key0 = PFX##_set1_epi32(static_cast<int>(k0));             \
      const VEC key1 = PFX##_set1_epi32(static_cast<int>(k1));             \
      for (int v = 0; v < 2; ++v) {                                        \
        VEC hi0, lo0, hi1, lo1;                                            \
        HI_LO(PFX##_mul_epu32(x0[v], m0),                                  \
              PFX##_mul_epu32(PFX##_srli_epi64(x0[v], 32), m0),            \
              hi0,                                                         \
              lo0);                                                        \
        HI_LO(PFX##_mul_epu32(x2[v], m1),                                  \
              PFX##_mul_epu32(PFX##_srli_epi64(x2[v], 32), m1),            \
              hi1,                                                         \
              lo1);                                                        \
        x0[v] = XOR3(hi1, x1[v], key0);                                    \
        x2[v] = XOR3(hi0, x3[v], key1);                                    \
        x1[v] = lo1;                                                       \
        x3[v] = lo0;                                                       \
      }                                                                    \
      k0 += noise::kPhiloxW0;                                              \
      k1 += noise::kPhiloxW1;                                              \
    }                                                                      \
    for (int v = 0; v < 2; ++v) {                                          \
      const int at = j + v * kStride;                                      \
      PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c0 + at), x0[v]);       \
      PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c1 + at), x1[v]);       \
      PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c2 + at), x2[v]);       \
      PFX##_storeu_si##BITS(reinterpret_cast<VEC*>(c3 + at), x3[v]);       \
    }                                                                      \
  }

// High and low halves of the products of the even lanes (even) and of the
// odd lanes (odd): AVX2 shifts and blends; AVX-512 moves each half into
// place with one masked in-lane shuffle.
#define DOPAMINE_HI_LO_256(even, odd, hi, lo)                   \
  {                                                             \
    const __m256i e = (even);                                   \
    const __m256i o = (odd);                                    \
    hi = _mm256_blend_epi32(_mm256_srli_epi64(e, 32), o, 0xAA); \
    lo = _mm256_blend_epi32(e, _mm256_slli_epi64(o, 32), 0xAA); \
  }
#define DOPAMINE_HI_LO_512(even, odd, hi, lo)                    \
  {                                                              \
    const __m512i e = (even);                                    \
    const __m512i o = (odd);                                     \
    hi = _mm512_mask_shuffle_epi32(o, 0x5555, e, _MM_PERM_CDAB); \
    lo = _mm512_mask_shuffle_epi32(e, 0xAAAA, o, _MM_PERM_CDAB); \
  }
#define DOPAMINE_XOR3_256(a, b, c) _mm256_xor_si256(_mm256_xor_si256(a, b), c)
#define DOPAMINE_XOR3_512(a, b, c) _mm512_ternarylogic_epi32(a, b, c, 0x96)

__attribute__((target("avx2,fma"))) inline void philox_lanes_avx2(
    uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, noise::Key key) {
  DOPAMINE_PHILOX_LANES(
      256, __m256i, _mm256, DOPAMINE_HI_LO_256, DOPAMINE_XOR3_256)
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma"))) inline void
philox_lanes_avx512(
    uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, noise::Key key) {
  DOPAMINE_PHILOX_LANES(
      512, __m512i, _mm512, DOPAMINE_HI_LO_512, DOPAMINE_XOR3_512)
}

template <typename Body>
__attribute__((target("avx2,fma"))) void run_avx2(const Body& body) {
  body(PhiloxLanes<&philox_lanes_avx2>{});
}

template <typename Body>
__attribute__((target(
    "avx512f,avx512vl,avx512dq,avx512bw,fma,prefer-vector-width=512"))) void
run_avx512(const Body& body) {
  body(PhiloxLanes<&philox_lanes_avx512>{});
}

// The widest path this CPU runs, capped by DOPAMINE_CPU_CAPABILITY.
inline CpuPath cpu_path() {
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
    return capped_path(best);
  }();
  return path;
}
#else
#define DOPAMINE_PATH_BODY
inline CpuPath cpu_path() {
  static const CpuPath path = capped_path(CpuPath::Baseline);
  return path;
}
#endif

// body(PhiloxLanes<philox>{}) on `path` (cpu_path()): body is a generic
// lambda marked DOPAMINE_PATH_BODY that passes `philox` on to fill_tile.
template <typename Body>
void on_path(CpuPath path, const Body& body) {
  switch (path) {
#ifdef DOPAMINE_HAS_X86_PATHS
    case CpuPath::Avx512:
      run_avx512(body);
      return;
    case CpuPath::Avx2:
      run_avx2(body);
      return;
#endif
    default:
      body(PhiloxLanes<&philox_lanes>{});
  }
}

}  // namespace dopamine::ops::cpu
