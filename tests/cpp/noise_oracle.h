#pragma once

// An oracle of the noise that shares no code with csrc/ops/noise.h: ATen's
// Philox4_32 for the words, the uniform mapping as docs/DESIGN.md, "The noise",
// states it, and Box-Muller in double precision with the standard library's
// log, sqrt, sin and cos. The references (test_utils.h) check every z they
// use against it, so a noise bug cannot hide in a noise the reference shares
// with the optimizer.
#include <ATen/core/PhiloxRNGEngine.h>
#include <dopamine/options.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace dopamine::testing {

// SplitMix64 (Steele et al., 2014): the seed's hash, whose low and high words
// are the Philox key.
inline uint64_t oracle_key(int64_t seed) {
  uint64_t x = static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The four words of Philox-4x32-10 of counter (block, index, step) under the
// seed's key: ATen's counter is (offset low, offset high, subsequence low,
// subsequence high).
inline void oracle_words(int64_t seed,
                         uint32_t step,
                         uint32_t index,
                         uint64_t block,
                         uint32_t words[4]) {
  at::Philox4_32 engine(
      oracle_key(seed),
      static_cast<uint64_t>(index) | (static_cast<uint64_t>(step) << 32),
      block);
  for (int i = 0; i < 4; ++i) {
    words[i] = engine();
  }
}

// (2k + 1) / 2^24 for k the top 23 bits of `word`.
inline double oracle_uniform(uint32_t word) {
  return (2.0 * static_cast<double>(word >> 9) + 1.0) / 16777216.0;
}

// The radius's uniform: oracle_uniform, except for top 23 bits 0, where it is
// (2k' + 1) / 2^33 for the low 9 bits k'.
inline double oracle_radius_uniform(uint32_t word) {
  if ((word >> 9) != 0) {
    return oracle_uniform(word);
  }
  return (2.0 * static_cast<double>(word & 0x1FFu) + 1.0) / 8589934592.0;
}

// z in double, and how far a float32 z may be from it: the float32
// transform's rounding, a few units of 2^-24 times the radius r (the sine or
// cosine's absolute error times r, r's relative error times |z| <= r).
struct OracleNoise {
  double z;
  double tolerance;
};

// z of element `element` of parameter `index` at `step`: element
// l * 32 + j of tile t takes, for Gaussian noise, words (0, 1) (l = 0, 1) or
// (2, 3) (l = 2, 3) of counter block 32 t + j, as r cos (l even) or r sin
// (l odd) of the angle 2 pi v, r = sqrt(-2 ln u) (u the radius's uniform of
// the first word, v the uniform of the second); for Rademacher noise, bit j
// of word l of counter block t, 1 -> +1 and 0 -> -1.
inline OracleNoise oracle_noise(
    Noise kind, int64_t seed, uint32_t step, uint32_t index, uint64_t element) {
  const uint64_t tile = element / 128;
  const int l = static_cast<int>(element % 128) / 32;
  const int j = static_cast<int>(element % 32);
  uint32_t words[4];
  if (kind == Noise::Rademacher) {
    oracle_words(seed, step, index, tile, words);
    return {((words[l] >> j) & 1u) != 0 ? 1.0 : -1.0, 0.0};
  }
  oracle_words(seed, step, index, tile * 32 + j, words);
  const uint32_t word_u = words[l < 2 ? 0 : 2];
  const uint32_t word_v = words[l < 2 ? 1 : 3];
  const double radius =
      std::sqrt(-2.0 * std::log(oracle_radius_uniform(word_u)));
  const double angle = 2.0 * M_PI * oracle_uniform(word_v);
  return {radius * (l % 2 == 0 ? std::cos(angle) : std::sin(angle)),
          1e-6 * std::max(1.0, radius)};
}

}  // namespace dopamine::testing
