// The noise itself (csrc/ops/noise.h): Philox against ATen's independent
// implementation, the kernels against the element-wise definition and against
// the double-precision oracle (noise_oracle.h), the float32 transform's log,
// sin and cos against the standard library, and the distribution of z.
#include <ATen/core/PhiloxRNGEngine.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>

#include "ops/noise.h"
#include "test_utils.h"

namespace dopamine::testing {
namespace {

TEST(Noise, PhiloxMatchesAtenPhilox) {
  for (const uint64_t key : {0ULL, 42ULL, 0x0123456789ABCDEFULL}) {
    for (const uint64_t block :
         {0ULL, 1ULL, 77ULL, 0xFFFFFFFFULL, 1ULL << 40}) {
      for (const uint64_t sub : {0ULL, 5ULL | (9ULL << 32)}) {
        // ATen: key = seed, counter = (offset lo, hi, subsequence lo, hi).
        at::Philox4_32 aten(key, sub, block);
        uint32_t c0 = static_cast<uint32_t>(block);
        uint32_t c1 = static_cast<uint32_t>(block >> 32);
        uint32_t c2 = static_cast<uint32_t>(sub);
        uint32_t c3 = static_cast<uint32_t>(sub >> 32);
        noise::philox(c0,
                      c1,
                      c2,
                      c3,
                      static_cast<uint32_t>(key),
                      static_cast<uint32_t>(key >> 32));
        EXPECT_EQ(c0, aten());
        EXPECT_EQ(c1, aten());
        EXPECT_EQ(c2, aten());
        EXPECT_EQ(c3, aten());
      }
    }
  }
}

// The op's z equals noise_at() element by element, for sizes that end
// inside a tile, for both kinds, on any thread count.
TEST(Noise, KernelsDrawTheDefinedNoise) {
  for (const auto kind : {Noise::Gaussian, Noise::Rademacher}) {
    for (const int64_t numel : {1, 127, 128, 300, 70001}) {
      const auto z = noise_of(torch::zeros({numel}), 11, 3, 5, kind);
      const auto key = noise::key_of(11);
      const auto* data = z.data_ptr<float>();
      int64_t mismatches = 0;
      for (int64_t e = 0; e < numel; ++e) {
        const float expected = noise::noise_at(static_cast<noise::Kind>(kind),
                                               key,
                                               5,
                                               3,
                                               static_cast<uint64_t>(e));
        mismatches += data[e] != expected;
      }
      EXPECT_EQ(mismatches, 0) << to_string(kind) << " numel " << numel;
    }
  }
}

// The kernels' z against the oracle (oracle_checked_noise expects every
// element within its tolerance), over tiles of several counters: seeds, steps
// and indices at the ends of their ranges.
TEST(Noise, KernelsDrawTheOraclesNoise) {
  for (const auto kind : {Noise::Gaussian, Noise::Rademacher}) {
    for (const int64_t seed : {int64_t{0}, int64_t{-5}, int64_t{1} << 40}) {
      for (const int64_t step : {int64_t{1}, (int64_t{1} << 32) - 1}) {
        for (const int64_t index : {int64_t{0}, (int64_t{1} << 32) - 1}) {
          oracle_checked_noise(torch::zeros({4099}), seed, step, index, kind);
        }
      }
    }
  }
}

// Every input the transform can see: the 2^23 values of uniform_open. log_unit
// is within 1 ulp of log (as Cephes' logf), sin and cos of 2 pi v within
// 2^-23 (their values are at most 1 in magnitude).
TEST(Noise, TransformMatchesTheStandardLibrary) {
  double worst_log_ulps = 0, worst_sincos = 0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t word = k << 9;
    const float u = noise::uniform_open(word);
    ASSERT_EQ(static_cast<double>(u), oracle_uniform(word));
    const double log_u = std::log(static_cast<double>(u));
    const double ulp =
        std::nextafter(static_cast<float>(std::abs(log_u)), INFINITY) -
        static_cast<float>(std::abs(log_u));
    worst_log_ulps =
        std::max(worst_log_ulps, std::abs(noise::log_unit(u) - log_u) / ulp);
    float sine, cosine;
    noise::sincos_turn(word, sine, cosine);
    const double angle = 2.0 * M_PI * static_cast<double>(u);
    worst_sincos = std::max({worst_sincos,
                             std::abs(sine - std::sin(angle)),
                             std::abs(cosine - std::cos(angle))});
  }
  EXPECT_LE(worst_log_ulps, 1.0);
  EXPECT_LE(worst_sincos, std::ldexp(1.0, -23));
  std::cout << "log: " << worst_log_ulps
            << " ulp; sin, cos: " << worst_sincos / std::ldexp(1.0, -24)
            << " x 2^-24\n";
}

TEST(Noise, GaussianHasTheMomentsOfAStandardNormal) {
  const auto z = noise_of(torch::zeros({1 << 21}), 3, 1, 0).to(torch::kDouble);
  const double n = static_cast<double>(z.numel());
  // Standard errors of the sample mean, variance and fourth moment.
  EXPECT_NEAR(z.mean().item<double>(), 0.0, 5 / std::sqrt(n));
  EXPECT_NEAR(z.square().mean().item<double>(), 1.0, 5 * std::sqrt(2 / n));
  EXPECT_NEAR(z.pow(4).mean().item<double>(), 3.0, 5 * std::sqrt(96 / n));
  EXPECT_NEAR(z.pow(3).mean().item<double>(), 0.0, 5 * std::sqrt(15 / n));
  // P(|z| > 3) = 0.0027.
  EXPECT_NEAR(
      (z.abs() > 3).to(torch::kDouble).mean().item<double>(), 0.0027, 0.0004);
  // Neighbouring elements (same counter, different words) are uncorrelated.
  const auto pairs = z.view({-1, 128});
  const double lag32 =
      (pairs.slice(1, 0, 32) * pairs.slice(1, 32, 64)).mean().item<double>();
  EXPECT_NEAR(lag32, 0.0, 5 / std::sqrt(n / 4));
}

TEST(Noise, RademacherIsPlusOrMinusOneAndBalanced) {
  const auto z = noise_of(torch::zeros({1 << 20}), 3, 1, 0, Noise::Rademacher);
  EXPECT_TRUE(torch::equal(z.abs(), torch::ones_like(z)));
  EXPECT_NEAR(z.mean().item<double>(), 0.0, 5 / std::sqrt(double(z.numel())));
}

TEST(Noise, DependsOnSeedStepAndIndex) {
  const auto base = noise_of(torch::zeros({256}), 1, 1, 0);
  EXPECT_FALSE(torch::equal(base, noise_of(torch::zeros({256}), 2, 1, 0)));
  EXPECT_FALSE(torch::equal(base, noise_of(torch::zeros({256}), 1, 2, 0)));
  EXPECT_FALSE(torch::equal(base, noise_of(torch::zeros({256}), 1, 1, 1)));
  EXPECT_TRUE(torch::equal(base, noise_of(torch::zeros({256}), 1, 1, 0)));
}

TEST(Noise, NonContiguousParametersGetTheNoiseOfTheirRowMajorOrder) {
  const auto contiguous = noise_of(torch::zeros({40, 30}), 4, 2, 1);
  auto transposed = torch::zeros({30, 40}).t();
  ASSERT_FALSE(transposed.is_contiguous());
  ops::perturb_({transposed}, {}, state_at(2), {1}, 4, 1.0, Noise::Gaussian, 1);
  EXPECT_TRUE(torch::equal(transposed, contiguous));
}

TEST(Noise, CounterWordsOutOfRangeAreRejected) {
  auto p = torch::zeros({4});
  EXPECT_THROW(
      {
        try {
          ops::perturb_({p},
                        {},
                        state_at(int64_t{1} << 32),
                        {0},
                        0,
                        1.0,
                        Noise::Gaussian,
                        1);
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("step must be in [0, 2^32)"),
                    std::string::npos);
          throw;
        }
      },
      c10::Error);
  EXPECT_THROW(
      ops::perturb_({p}, {}, state_at(1), {-1}, 0, 1.0, Noise::Gaussian, 1),
      c10::Error);
  EXPECT_THROW(ops::perturb_(
                   {p}, {}, state_at(1), {0}, 0, 1.0, static_cast<Noise>(2), 1),
               c10::Error);
  EXPECT_TRUE(torch::equal(p, torch::zeros({4})));
}

}  // namespace
}  // namespace dopamine::testing
