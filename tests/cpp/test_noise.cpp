// The noise itself (csrc/ops/noise.h): Philox against ATen's independent
// implementation, the kernels against the element-wise definition, and the
// distribution of z.
#include <ATen/core/PhiloxRNGEngine.h>

#include <cstdlib>

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
