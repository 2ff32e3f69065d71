// The noise itself (csrc/ops/noise.h): Philox against ATen's independent
// implementation, the kernels against the element-wise definition and against
// the double-precision oracle (noise_oracle.h), the float32 transform's log,
// sin and cos against the standard library, and the distribution of z.
#include <ATen/core/PhiloxRNGEngine.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>

#include "ops/engine.h"
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

// A low-rank perturbation's z from the kernels equals lowrank_noise_at()
// bit for bit (the same fmaf chain and scale, noise.h), for matrices, a
// 3-D tensor (rows by the rest), tiles across rows and rows across tiles;
// a vector is perturbed in full.
TEST(Noise, LowRankKernelsDrawTheDefinedNoise) {
  const std::vector<std::vector<int64_t>> shapes = {
      {7, 5}, {3, 130}, {300, 2, 3}, {40}};
  for (const auto kind : {Noise::Gaussian, Noise::Rademacher}) {
    for (const int64_t rank : {1, 3}) {
      for (size_t index = 0; index < shapes.size(); ++index) {
        auto z = torch::zeros(shapes[index]);
        ops::move_({z},
                   {},
                   {state_at(4)},
                   ops::pack_options(DopamineOptions()
                                         .seed(9)
                                         .sigma(1)
                                         .noise(kind)
                                         .perturbation(Perturbation::LowRank)
                                         .rank(rank)),
                   {static_cast<int64_t>(index)},
                   {1},
                   {0, 0},
                   {1, 2});
        const auto key = noise::direction_key(noise::key_of(9), 2);
        const int64_t rows = z.size(0), cols = z.numel() / rows;
        const auto* data = z.data_ptr<float>();
        int64_t mismatches = 0;
        for (int64_t e = 0; e < z.numel(); ++e) {
          const auto k = static_cast<noise::Kind>(kind);
          const auto i = static_cast<uint32_t>(index);
          const float expected =
              z.dim() == 1
                  ? noise::noise_at(k, key, i, 4, static_cast<uint64_t>(e))
                  : noise::lowrank_noise_at(k,
                                            key,
                                            i,
                                            4,
                                            rows,
                                            cols,
                                            static_cast<uint32_t>(rank),
                                            e);
          mismatches += data[e] != expected;
        }
        EXPECT_EQ(mismatches, 0)
            << to_string(kind) << " rank " << rank << " shape " << z.sizes();
      }
    }
  }
}

// A rank above a weight's smaller side is refused at the step, naming it,
// before any parameter moves.
TEST(Noise, LowRankAboveASmallerSideIsRefused) {
  auto wide = torch::ones({2, 8}).requires_grad_();
  Dopamine optimizer(
      {wide}, DopamineOptions().perturbation(Perturbation::LowRank).rank(3));
  expect_error(
      [&] { optimizer.step([&] { return wide.sum(); }); },
      {"invalid rank: 3 is above the smaller side of params[0]", "[2, 8]"});
  EXPECT_TRUE(torch::equal(wide, torch::ones({2, 8})));
}

// The radius's refined bottom cell through the kernels: the first counter
// (seed 0, step 1, index 0) with a radius word whose top 23 bits are 0 (one
// word in 2^23, so the other tests almost never see one). Both normals of
// its pair equal noise_at() and the oracle's, and their radius is that of
// the refined uniform (2k' + 1) 2^-33, k' the word's low 9 bits; the top 23
// bits alone gave sqrt(48 ln 2), at least 3e-4 away.
TEST(Noise, KernelsDrawTheRadiusRefinedCell) {
  const auto key = noise::key_of(0);
  uint64_t block = 0;
  int word = -1;
  uint32_t radius_word = 0;
  for (; word < 0; ++block) {
    uint32_t c0 = static_cast<uint32_t>(block);
    uint32_t c1 = static_cast<uint32_t>(block >> 32);
    uint32_t c2 = 0, c3 = 1;
    noise::philox(c0, c1, c2, c3, key.lo, key.hi);
    word = (c0 >> 9) == 0 ? 0 : (c2 >> 9) == 0 ? 2 : -1;
    radius_word = word == 0 ? c0 : c2;
    ASSERT_LT(block, uint64_t{1} << 28);
  }
  --block;
  // The cosine's element (word l = `word`) and the sine's (l = word + 1).
  const int64_t cosine =
      static_cast<int64_t>((block / noise::kLanes) * noise::kTile +
                           word * noise::kLanes + block % noise::kLanes);
  const int64_t sine = cosine + noise::kLanes;
  const auto z = noise_of(torch::zeros({sine + 1}), 0, 1, 0);
  for (const int64_t e : {cosine, sine}) {
    const float got = z[e].item<float>();
    EXPECT_EQ(got, noise::noise_at(noise::Kind::Gaussian, key, 0, 1, e));
    const auto expected = oracle_noise(Noise::Gaussian, 0, 1, 0, e);
    EXPECT_NEAR(got, expected.z, expected.tolerance);
  }
  const double radius = std::sqrt(
      -2 * std::log((2.0 * (radius_word & 0x1FFu) + 1) / 8589934592.0));
  EXPECT_NEAR(std::hypot(z[cosine].item<double>(), z[sine].item<double>()),
              radius,
              1e-5 * radius);
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

// Every input the transform can see: the 2^23 values of uniform_open and the
// 512 of the radius's bottom cell. log_unit is within 1 ulp of log (as
// Cephes' logf), sin and cos of 2 pi v within 2^-23 (their values are at most
// 1 in magnitude).
TEST(Noise, TransformMatchesTheStandardLibrary) {
  double worst_log_ulps = 0, worst_sincos = 0;
  auto check_log = [&](float u) {
    const double log_u = std::log(static_cast<double>(u));
    const double ulp =
        std::nextafter(static_cast<float>(std::abs(log_u)), INFINITY) -
        static_cast<float>(std::abs(log_u));
    worst_log_ulps =
        std::max(worst_log_ulps, std::abs(noise::log_unit(u) - log_u) / ulp);
  };
  for (uint32_t low = 0; low < (1u << 9); ++low) {
    const float u = noise::uniform_radius(low);
    ASSERT_EQ(static_cast<double>(u), oracle_radius_uniform(low));
    check_log(u);
  }
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t word = k << 9;
    const float u = noise::uniform_open(word);
    ASSERT_EQ(static_cast<double>(u), oracle_uniform(word));
    if (k != 0) {
      ASSERT_EQ(noise::uniform_radius(word | 0x1FFu), u);
    }
    check_log(u);
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

// P(|Z| > t) for a standard normal Z.
double two_sided_tail(double t) {
  return std::erfc(t / std::sqrt(2.0));
}

// The sample correlation of two equally long samples of z.
double correlation(const torch::Tensor& a, const torch::Tensor& b) {
  const auto x = a.to(torch::kDouble) - a.to(torch::kDouble).mean();
  const auto y = b.to(torch::kDouble) - b.to(torch::kDouble).mean();
  return ((x * y).sum() / (x.norm() * y.norm())).item<double>();
}

TEST(Noise, GaussianHasTheMomentsOfAStandardNormal) {
  const auto z = noise_of(torch::zeros({1 << 21}), 3, 1, 0).to(torch::kDouble);
  const double n = static_cast<double>(z.numel());
  // Standard errors of the sample mean, variance and fourth moment.
  EXPECT_NEAR(z.mean().item<double>(), 0.0, 5 / std::sqrt(n));
  EXPECT_NEAR(z.square().mean().item<double>(), 1.0, 5 * std::sqrt(2 / n));
  EXPECT_NEAR(z.pow(4).mean().item<double>(), 3.0, 5 * std::sqrt(96 / n));
  EXPECT_NEAR(z.pow(3).mean().item<double>(), 0.0, 5 * std::sqrt(15 / n));
  // The mass beyond 3 within 10% of the normal's (7 standard errors here).
  EXPECT_NEAR((z.abs() > 3).to(torch::kDouble).mean().item<double>(),
              two_sided_tail(3),
              0.1 * two_sided_tail(3));
}

// The Kolmogorov-Smirnov distance of 2^20 draws from the normal's CDF is at
// most 0.003 (a sample of the normal itself exceeds 0.0026 with probability
// about 1e-6).
TEST(Noise, GaussianPassesKolmogorovSmirnov) {
  const auto z = std::get<0>(
      noise_of(torch::zeros({1 << 20}), 11, 4, 2).to(torch::kDouble).sort());
  const double* sorted = z.data_ptr<double>();
  const int64_t n = z.numel();
  double distance = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double cdf = 0.5 * std::erfc(-sorted[i] / std::sqrt(2.0));
    distance = std::max({distance,
                         std::abs(cdf - static_cast<double>(i) / n),
                         std::abs(cdf - static_cast<double>(i + 1) / n)});
  }
  EXPECT_LE(distance, 0.003);
  std::cout << "KS distance over 2^20 draws: " << distance << "\n";
}

// The mass beyond 4 sigma within 10% of the normal's over 1e8 draws (about
// 6300 expected, so 10% is 8 standard errors), in ten parameters of 1e7.
TEST(Noise, GaussianTailBeyondFourSigma) {
  const int64_t per_parameter = 10'000'000;
  int64_t beyond = 0;
  auto z = torch::zeros({per_parameter});
  for (int64_t index = 0; index < 10; ++index) {
    z.zero_();
    move({z}, state_at(1), {index}, 5, 1.0);
    beyond += (z.abs() > 4).sum().item<int64_t>();
  }
  const double mass = static_cast<double>(beyond) / (10 * per_parameter);
  EXPECT_NEAR(mass, two_sided_tail(4), 0.1 * two_sided_tail(4));
  std::cout << "P(|z| > 4) over 1e8 draws: " << mass
            << " (normal: " << two_sided_tail(4) << ")\n";
}

// The largest |z|: the radius's smallest uniform, 2^-33 (both words' top 23
// bits and the first's low 9 bits 0), and the angle 2 pi 2^-24, whose cosine
// is 1 in float. Philox is a bijection of the counter, so some counter gives
// these words.
TEST(Noise, GaussianReachesBeyondSixSigma) {
  float cosine, sine;
  noise::box_muller(0, 0, cosine, sine);
  EXPECT_GE(cosine, 6.0f);
  EXPECT_NEAR(cosine, std::sqrt(66 * std::log(2.0)), 1e-5);
}

// No correlation between neighbouring elements (the next element, and the
// other words of the same counter, 32, 64 and 96 elements on), steps, or
// parameters: each within 5 standard errors of 0.
TEST(Noise, GaussianIsUncorrelatedAcrossElementsStepsAndParameters) {
  const int64_t n = 1 << 20;
  const auto z = noise_of(torch::zeros({n}), 3, 1, 0);
  // A correlation's standard error is about 1 / sqrt(n).
  const double bound = 5 / std::sqrt(static_cast<double>(n));
  for (const int64_t lag : {1, 32, 64, 96}) {
    EXPECT_NEAR(
        correlation(z.slice(0, 0, n - lag), z.slice(0, lag, n)), 0.0, bound)
        << "lag " << lag;
  }
  EXPECT_NEAR(correlation(z, noise_of(torch::zeros({n}), 3, 2, 0)), 0.0, bound);
  EXPECT_NEAR(correlation(z, noise_of(torch::zeros({n}), 3, 1, 1)), 0.0, bound);
  EXPECT_NEAR(correlation(z, noise_of(torch::zeros({n}), 4, 1, 0)), 0.0, bound);
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
  move({transposed}, state_at(2), {1}, 4, 1.0);
  EXPECT_TRUE(torch::equal(transposed, contiguous));
}

TEST(Noise, CounterWordsOutOfRangeAreRejected) {
  auto p = torch::zeros({4});
  expect_error([&] { move({p}, state_at(int64_t{1} << 32), {0}, 0, 1.0); },
               {"step must be in [0, 2^32)"});
  expect_error([&] { move({p}, state_at(1), {-1}, 0, 1.0); },
               {"a parameter's index must be in [0, 2^32)"});
  expect_error(
      [&] {
        move({p}, state_at(1), {0}, 0, 1.0, Noise::Gaussian, {0, 0}, {1, -1});
      },
      {"a direction must be in [0, 2^32)"});
  expect_error(
      [&] { move({p}, state_at(1), {0}, 0, 1.0, static_cast<Noise>(2)); },
      {"invalid noise code 2"});
  // Offsets lie in {-1, 0, 1}.
  expect_error(
      [&] {
        move({p}, state_at(1), {0}, 0, 1.0, Noise::Gaussian, {0, 0}, {2, 0});
      },
      {"to must be [offset, direction] with offset -1, 0 or 1"});
  expect_error(
      [&] {
        move({p}, state_at(1), {0}, 0, 1.0, Noise::Gaussian, {-2, 0}, {0, 0});
      },
      {"carried must be [offset, direction] with offset -1, 0 or 1"});
  EXPECT_TRUE(torch::equal(p, torch::zeros({4})));
}

// From one direction to another, move_ is one pass: x' = x + to sigma z_to -
// carried sigma z_carried, computed in float32 (in that order, each product
// and sum rounded) and rounded once to the parameter's dtype; a parameter
// with a master weight becomes the rounding of master + to sigma z_to.
TEST(Noise, AMoveBetweenDirectionsIsOnePass) {
  torch::manual_seed(4);
  const double sigma = 0.05;
  const auto sigma_f = static_cast<float>(sigma);
  for (const auto kind : {Noise::Gaussian, Noise::Rademacher}) {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      for (const auto& [carried, to] :
           std::vector<std::pair<ops::Perturbation, ops::Perturbation>>{
               {{1, 0}, {1, 1}}, {{-1, 2}, {1, 3}}, {{1, 3}, {-1, 1}}}) {
        const auto x = torch::randn({1000}).to(dtype);
        const auto z_to =
            noise_of(torch::zeros({1000}), 6, 2, 1, kind, to.direction);
        const auto z_carried =
            noise_of(torch::zeros({1000}), 6, 2, 1, kind, carried.direction);
        const auto expected =
            (x.to(torch::kFloat) +
             z_to * (static_cast<float>(to.offset) * sigma_f) -
             z_carried * (static_cast<float>(carried.offset) * sigma_f))
                .to(dtype);
        auto moved = x.clone();
        move({moved}, state_at(2), {1}, 6, sigma, kind, carried, to);
        EXPECT_TRUE(torch::equal(moved, expected))
            << to_string(kind) << " " << dtype << " from direction "
            << carried.direction << " to " << to.direction;

        if (dtype != torch::kFloat) {
          const auto master = x.to(torch::kFloat);
          auto param = x.clone();
          ops::move_({param},
                     {master},
                     {state_at(2)},
                     ops::pack_options(
                         DopamineOptions().seed(6).sigma(sigma).noise(kind)),
                     {1},
                     {1},
                     carried,
                     to);
          EXPECT_TRUE(torch::equal(
              param,
              (master + z_to * (static_cast<float>(to.offset) * sigma_f))
                  .to(dtype)));
        }
      }
    }
  }
}

// One move_ over several groups, each with its own options, equals each
// group moved alone; and a group whose arguments fail a check leaves every
// group as it was.
TEST(Noise, OneMoveOverSeveralGroupsEqualsEachGroupMovedAlone) {
  torch::manual_seed(5);
  std::vector<torch::Tensor> params = {
      torch::randn({300}), torch::randn({7, 9}), torch::randn({130})};
  const auto initial = clones(params);
  auto alone = clones(params);
  const auto first = ops::pack_options(
      DopamineOptions().seed(3).sigma(0.1).noise(Noise::Gaussian));
  auto packed = ops::pack_options(
      DopamineOptions().seed(8).sigma(0.2).noise(Noise::Rademacher));
  packed.insert(packed.begin(), first.begin(), first.end());
  const std::vector<torch::Tensor> states = {state_at(4), state_at(9)};
  ops::move_(params, {}, states, packed, {0, 1, 2}, {2, 1}, {0, 0}, {1, 1});
  ops::move_(params, {}, states, packed, {0, 1, 2}, {2, 1}, {1, 1}, {-1, 2});
  for (const auto& [carried, to] :
       std::vector<std::pair<ops::Perturbation, ops::Perturbation>>{
           {{0, 0}, {1, 1}}, {{1, 1}, {-1, 2}}}) {
    move({alone[0], alone[1]},
         states[0],
         {0, 1},
         3,
         0.1,
         Noise::Gaussian,
         carried,
         to);
    move({alone[2]}, states[1], {2}, 8, 0.2, Noise::Rademacher, carried, to);
  }
  EXPECT_TRUE(bitwise_equal(params, alone));
  EXPECT_FALSE(bitwise_equal(params, initial));  // the moves moved them

  const auto before = clones(params);
  auto forged = packed;
  // The second group's num_perturbations.
  forged[engine::packed::kSize + engine::packed::kNumPerturbations] = 0;
  expect_error(
      [&] {
        ops::move_(
            params, {}, states, forged, {0, 1, 2}, {2, 1}, {-1, 2}, {0, 0});
      },
      {"invalid num_perturbations: 0"});
  expect_error(
      [&] {
        ops::move_(
            params, {}, states, packed, {0, 1, 2}, {1, 1}, {-1, 2}, {0, 0});
      },
      {"the group sizes add up to 2, but there are 3 parameters"});
  EXPECT_TRUE(bitwise_equal(params, before));
}

}  // namespace
}  // namespace dopamine::testing
