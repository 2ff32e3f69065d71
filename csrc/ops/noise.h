#pragma once

// Dopamine's noise z: a pure function of (seed, step, parameter index,
// element index), shared by the CPU and the CUDA kernels so that both devices
// draw the same numbers; and the low-rank perturbation built from it.
//
// Philox-4x32-10 (Salmon et al., SC'11), keyed by the seed, turns the counter
// (block, parameter index, step) into four 32-bit words. Elements are taken in
// tiles of 128: element `l * 32 + j` of tile `t` comes from word(s) of the
// counter with block `t * 32 + j` (Gaussian) or from bit j of word l of the
// counter with block `t` (Rademacher).
//
// The normal transform is Box-Muller with our own log, sin and cos, written
// with explicit fmaf and exact range reduction: every operation is correctly
// rounded IEEE arithmetic, so the value of z does not depend on the device,
// the instruction set or the compiler, provided mul + add are not contracted
// (the kernels are built with -ffp-contract=off, nvcc with --fmad=false).
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dopamine::noise {

enum class Kind : int64_t { Gaussian = 0, Rademacher = 1 };

constexpr int64_t kTile = 128;  // elements per tile
constexpr int64_t kLanes = 32;  // counters per Gaussian tile
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Key {
  uint32_t lo;
  uint32_t hi;
};

C10_HOST_DEVICE C10_ALWAYS_INLINE uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The Philox key of a seed: the seed is hashed so that nearby seeds give
// unrelated keys.
C10_HOST_DEVICE C10_ALWAYS_INLINE Key key_of(int64_t seed) {
  const uint64_t key = splitmix64(static_cast<uint64_t>(seed));
  return {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)};
}

// The key of direction `direction` of a step with several directions
// (num_perturbations; docs/DESIGN.md, "The noise"): direction 0 keeps the
// seed's key, so a one-direction step draws the noise it always did, and
// direction j > 0 hashes that key with j.
C10_HOST_DEVICE C10_ALWAYS_INLINE Key direction_key(Key key,
                                                    uint32_t direction) {
  if (direction == 0) {
    return key;
  }
  const uint64_t mixed = splitmix64(
      ((static_cast<uint64_t>(key.hi) << 32) | key.lo) ^ splitmix64(direction));
  return {static_cast<uint32_t>(mixed), static_cast<uint32_t>(mixed >> 32)};
}

// Philox-4x32-10 of the counter (c0, c1, c2, c3) under key (k0, k1), in place.
C10_HOST_DEVICE C10_ALWAYS_INLINE void philox(uint32_t& c0,
                                              uint32_t& c1,
                                              uint32_t& c2,
                                              uint32_t& c3,
                                              uint32_t k0,
                                              uint32_t k1) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float float_from_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t bits_of(float value) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// The odd integer 2k + 1 of the top 23 bits k of `word`, times 2^-24: a
// uniform in (0, 1), exact in float, symmetric about 1/2.
C10_HOST_DEVICE C10_ALWAYS_INLINE float uniform_open(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>(((word >> 9) << 1) | 1u)) *
         5.9604644775390625e-8f;
}

// `a` where `take_a`, else `b`; and x with its sign flipped where `flip`.
// Bitwise, so that compilers vectorize the loops that use them.
C10_HOST_DEVICE C10_ALWAYS_INLINE float select(bool take_a, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(take_a);
  return float_from_bits((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float flip_sign(bool flip, float x) {
  return float_from_bits(bits_of(x) ^ (static_cast<uint32_t>(flip) << 31));
}

// The uniform of Box-Muller's radius: uniform_open(word), except that its
// bottom cell (0, 2^-23) (top 23 bits 0) is split in 512 by the low 9 bits,
// as (2k' + 1) 2^-33: so the radius reaches sqrt(66 ln 2) = 6.76 instead of
// sqrt(48 ln 2) = 5.77, and |z| > 6 keeps its probability (docs/DESIGN.md,
// "The noise").
C10_HOST_DEVICE C10_ALWAYS_INLINE float uniform_radius(uint32_t word) {
  const float fine =
      static_cast<float>(static_cast<int32_t>(((word & 0x1FFu) << 1) | 1u)) *
      1.16415321826934814453125e-10f;  // 2^-33
  return select((word >> 9) == 0, fine, uniform_open(word));
}

// ln(u) for u in (0, 1) (Cephes' logf polynomial, about 1 ulp). u = 2^e m
// with m in [sqrt(1/2), sqrt(2)), found with integer arithmetic (as musl's
// logf does).
C10_HOST_DEVICE C10_ALWAYS_INLINE float log_unit(float u) {
  const uint32_t shifted = bits_of(u) + (0x3F800000u - 0x3F3504F3u);
  const int32_t exponent = static_cast<int32_t>(shifted >> 23) - 127;
  const float m = float_from_bits((shifted & 0x007FFFFFu) + 0x3F3504F3u);
  const float f = m - 1.0f;  // [sqrt(1/2) - 1, sqrt(2) - 1)
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = fmaf(p, f, -1.1514610310e-1f);
  p = fmaf(p, f, 1.1676998740e-1f);
  p = fmaf(p, f, -1.2420140846e-1f);
  p = fmaf(p, f, 1.4249322787e-1f);
  p = fmaf(p, f, -1.6668057665e-1f);
  p = fmaf(p, f, 2.0000714765e-1f);
  p = fmaf(p, f, -2.4999993993e-1f);
  p = fmaf(p, f, 3.3333331174e-1f);
  const float e = static_cast<float>(exponent);
  float y = (f * f2) * p;
  y = fmaf(e, -2.12194440e-4f, y);
  y = fmaf(-0.5f, f2, y);
  return fmaf(e, 0.693359375f, f + y);
}

// sin(2 pi v) and cos(2 pi v) for v = uniform_open(word): Cephes' sinf and
// cosf polynomials on [-pi/4, pi/4] after an exact quadrant reduction.
C10_HOST_DEVICE C10_ALWAYS_INLINE void sincos_turn(uint32_t word,
                                                   float& sine,
                                                   float& cosine) {
  // v = (2k + 1) 2^-24 with k the top 23 bits of word; the quadrant
  // q = round(4 v) and the rest r = v - q / 4 in [-1/8, 1/8] are exact.
  const uint32_t k = word >> 9;
  const uint32_t quadrant = (k + (1u << 20)) >> 21;
  const float v = uniform_open(word);
  const float angle =
      fmaf(static_cast<float>(static_cast<int32_t>(quadrant)), -0.25f, v) *
      6.28318530717958647692f;  // [-pi/4, pi/4]
  const float a2 = angle * angle;
  float s = -1.9515295891e-4f;
  s = fmaf(s, a2, 8.3321608736e-3f);
  s = fmaf(s, a2, -1.6666654611e-1f);
  s = fmaf(s * a2, angle, angle);
  float c = 2.443315711809948e-5f;
  c = fmaf(c, a2, -1.388731625493765e-3f);
  c = fmaf(c, a2, 4.166664568298827e-2f);
  c = fmaf(c * a2, a2, fmaf(-0.5f, a2, 1.0f));
  // sin and cos of angle + quadrant * pi / 2.
  const bool swap = (quadrant & 1u) != 0;
  sine = flip_sign((quadrant & 2u) != 0, select(swap, c, s));
  cosine = flip_sign(((quadrant + 1u) & 2u) != 0, select(swap, s, c));
}

// Two independent standard normals from two words (Box-Muller):
// r cos(2 pi v) and r sin(2 pi v), r = sqrt(-2 ln u), u = uniform_radius
// of the first word and v = uniform_open of the second.
C10_HOST_DEVICE C10_ALWAYS_INLINE void box_muller(uint32_t word_u,
                                                  uint32_t word_v,
                                                  float& cosine,
                                                  float& sine) {
  const float radius = sqrtf(-2.0f * log_unit(uniform_radius(word_u)));
  float s, c;
  sincos_turn(word_v, s, c);
  sine = radius * s;
  cosine = radius * c;
}

// The four normals of Gaussian counter `block` of parameter `index` at
// `step`, for elements l * 32 + (block % 32) of tile block / 32, l = 0..3.
C10_HOST_DEVICE C10_ALWAYS_INLINE void gaussian_lane(Key key,
                                                     uint32_t index,
                                                     uint32_t step,
                                                     uint64_t block,
                                                     float& z0,
                                                     float& z1,
                                                     float& z2,
                                                     float& z3) {
  uint32_t c0 = static_cast<uint32_t>(block);
  uint32_t c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = index;
  uint32_t c3 = step;
  philox(c0, c1, c2, c3, key.lo, key.hi);
  box_muller(c0, c1, z0, z1);
  box_muller(c2, c3, z2, z3);
}

// +1 or -1 from bit `bit` of `word`: element word_index * 32 + bit of a
// Rademacher tile comes from word word_index of the tile's counter.
C10_HOST_DEVICE C10_ALWAYS_INLINE float rademacher_sign(uint32_t word,
                                                        int bit) {
  return static_cast<float>(static_cast<int32_t>((word >> bit) & 1u) * 2 - 1);
}

// z of one element, computed on its own: what the tests and tools compare
// the kernels against.
C10_HOST_DEVICE C10_ALWAYS_INLINE float noise_at(
    Kind kind, Key key, uint32_t index, uint32_t step, uint64_t element) {
  const uint64_t tile = element / kTile;
  const int in_tile = static_cast<int>(element % kTile);
  if (kind == Kind::Rademacher) {
    uint32_t words[4] = {static_cast<uint32_t>(tile),
                         static_cast<uint32_t>(tile >> 32),
                         index,
                         step};
    philox(words[0], words[1], words[2], words[3], key.lo, key.hi);
    return rademacher_sign(words[in_tile / 32], in_tile % 32);
  }
  float z[4];
  gaussian_lane(key,
                index,
                step,
                tile * kLanes + (in_tile % kLanes),
                z[0],
                z[1],
                z[2],
                z[3]);
  return z[in_tile / kLanes];
}

// A low-rank perturbation (docs/DESIGN.md, "The noise"): a parameter of
// `rows` x `cols` (its first dimension by the rest) takes
// z = (u_0 v_0^T + ... + u_{r-1} v_{r-1}^T) / sqrt(r), whose factors are the
// first r (rows + cols) elements of its noise stream: u_l is elements
// l (rows + cols) + [0, rows), v_l the next cols. The sum is a chain of
// fmaf in order of l, then one multiply by lowrank_scale(r), so that every
// device computes the same bits.
C10_HOST_DEVICE C10_ALWAYS_INLINE float lowrank_scale(uint32_t rank) {
  return static_cast<float>(1.0 / sqrt(static_cast<double>(rank)));
}

// z of element (row, col) from the factors of its stream (`factors`: u_0,
// v_0, u_1, ... as above).
C10_HOST_DEVICE C10_ALWAYS_INLINE float lowrank_element(const float* factors,
                                                        int64_t rows,
                                                        int64_t cols,
                                                        uint32_t rank,
                                                        int64_t row,
                                                        int64_t col) {
  float sum = factors[row] * factors[rows + col];
  for (uint32_t l = 1; l < rank; ++l) {
    const float* u = factors + l * (rows + cols);
    sum = fmaf(u[row], u[rows + col], sum);
  }
  return sum * lowrank_scale(rank);
}

// z of one element of a low-rank perturbation, computed on its own (drawing
// the 2r factor elements it needs): what the tests compare the kernels
// against.
C10_HOST_DEVICE C10_ALWAYS_INLINE float lowrank_noise_at(Kind kind,
                                                         Key key,
                                                         uint32_t index,
                                                         uint32_t step,
                                                         int64_t rows,
                                                         int64_t cols,
                                                         uint32_t rank,
                                                         int64_t element) {
  const int64_t row = element / cols, col = element % cols;
  float sum = 0;
  for (uint32_t l = 0; l < rank; ++l) {
    const auto first = static_cast<uint64_t>(l * (rows + cols));
    const float u = noise_at(kind, key, index, step, first + row);
    const float v = noise_at(kind, key, index, step, first + rows + col);
    sum = l == 0 ? u * v : fmaf(u, v, sum);
  }
  return sum * lowrank_scale(rank);
}

}  // namespace dopamine::noise
