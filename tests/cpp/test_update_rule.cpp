// The update rule (docs/DESIGN.md, "The algorithm") against an independent
// reference, the gradient estimate's unbiasedness, and convergence.
#include <torch/optim/schedulers/step_lr.h>

#include "test_utils.h"
#include "xor/xor_task.h"

namespace dopamine::testing {
namespace {

struct RuleCase {
  LrAdaptation mode;
  double weight_decay;
  Noise noise = Noise::Gaussian;
  bool antithetic = false;
};

class UpdateRule : public ::testing::TestWithParam<RuleCase> {};

// Eight steps, of which step 1 (a NaN perturbed loss) and step 4 (an
// infinite unperturbed loss; with antithetic, the second and the first loss)
// are skipped: the reference skips them too, so a bias correction or a
// tracking start that counted skipped steps would show.
TEST_P(UpdateRule, MatchesSpecOnQuadratic) {
  const auto [mode, weight_decay, noise, antithetic] = GetParam();
  const Quadratic quadratic({{3}, {2, 2}}, torch::kDouble, 7);
  torch::manual_seed(11);
  std::vector<torch::Tensor> params = {
      torch::randn({3}, torch::kDouble).requires_grad_(),
      torch::randn({2, 2}, torch::kDouble).requires_grad_()};
  const auto options = DopamineOptions(0.05)
                           .sigma(1e-3)
                           .lr_adaptation(mode)
                           .weight_decay(weight_decay)
                           .noise(noise)
                           .seed(42)
                           .antithetic(antithetic)
                           .num_perturbations(1)
                           .beta_baseline(std::nullopt);
  const auto with_skips = [&] {
    const LossFn loss = [&](const auto& p) { return quadratic(p); };
    return non_finite_at(loss, {{1, 1, std::nan("")}, {4, 0, INFINITY}});
  };
  ReferenceDopamine reference;
  reference.add_group(params, options);
  Dopamine optimizer(params, options);

  const LossFn reference_loss = with_skips();
  const LossFn optimizer_loss = with_skips();
  int calls = 0;
  auto closure = [&] {
    ++calls;
    EXPECT_FALSE(torch::GradMode::is_enabled());
    return optimizer_loss(params);
  };
  for (int t = 1; t <= 8; ++t) {
    const double expected_l0 = reference.step(reference_loss, antithetic);
    const double l0 = optimizer.step(closure).item<double>();
    EXPECT_EQ(calls, 2 * t);
    if (std::isfinite(expected_l0)) {
      EXPECT_NEAR(l0, expected_l0, 1e-10) << "step " << t;
    } else if (std::isnan(expected_l0)) {
      EXPECT_TRUE(std::isnan(l0)) << "step " << t;
    } else {
      EXPECT_EQ(l0, expected_l0) << "step " << t;
    }
    // Loss differences are divided by sigma = 1e-3, so double rounding of
    // ~1e-16 in the losses shows up as ~1e-13 in the parameters.
    EXPECT_LT(max_abs_diff(params, reference.all(0)), 1e-10) << "step " << t;
    EXPECT_NEAR(optimizer.group_state(0)->current_lr(),
                reference.group(0).eta,
                1e-9 * std::abs(reference.group(0).eta))
        << "step " << t;
  }
  EXPECT_EQ(optimizer.group_state(0)->step(), 8);
  EXPECT_EQ(optimizer.group_state(0)->skipped_steps(), 2);
  EXPECT_EQ(reference.group(0).updates, 6);
}

INSTANTIATE_TEST_SUITE_P(
    AllModes,
    UpdateRule,
    ::testing::Values(
        RuleCase{LrAdaptation::None, 0},
        RuleCase{LrAdaptation::None, 0.1},
        RuleCase{LrAdaptation::RpeNormalized, 0},
        RuleCase{LrAdaptation::RpeNormalized, 0.1},
        RuleCase{LrAdaptation::RpeTracking, 0},
        RuleCase{LrAdaptation::RpeTracking, 0.1},
        RuleCase{LrAdaptation::None, 0, Noise::Rademacher},
        RuleCase{LrAdaptation::RpeNormalized, 0.1, Noise::Rademacher},
        RuleCase{LrAdaptation::None, 0, Noise::Gaussian, true},
        RuleCase{LrAdaptation::RpeNormalized, 0.1, Noise::Gaussian, true},
        RuleCase{LrAdaptation::RpeTracking, 0, Noise::Rademacher, true}),
    [](const auto& info) {
      return to_string(info.param.mode) +
             (info.param.weight_decay == 0 ? "" : "_weight_decay") + "_" +
             to_string(info.param.noise) +
             (info.param.antithetic ? "_antithetic" : "");
    });

// The clamps apply in every mode, and in rpe_tracking the clamped rate is
// the one the next step tracks from.
TEST(UpdateRule, LrMinAndLrMaxClamp) {
  const Quadratic loss({{4}}, torch::kDouble, 3);
  const auto tracking = [](double lr) {
    return DopamineOptions(lr).lr_adaptation(LrAdaptation::RpeTracking);
  };
  for (auto options :
       {DopamineOptions(1.0).lr_max(0.01).lr_adaptation(LrAdaptation::None),
        DopamineOptions(1e-6).lr_min(0.02).lr_adaptation(LrAdaptation::None),
        DopamineOptions(0.1).lr_max(1e-3),
        tracking(0.1).lr_max(0.01),
        tracking(1e-6).lr_min(0.02),
        // Tracking fast, so the rate moves between the clamps.
        tracking(0.5).beta_s(0.5).beta_eta(0.5).lr_min(0.1).lr_max(0.2)}) {
    options.num_perturbations(1).beta_baseline(
        std::nullopt);  // as the reference
    std::vector<torch::Tensor> params = {
        torch::ones({4}, torch::kDouble).requires_grad_()};
    ReferenceDopamine reference;
    reference.add_group(params, options);
    Dopamine optimizer(params, options);
    std::vector<double> rates;
    for (int t = 0; t < 6; ++t) {
      reference.step(loss);
      optimizer.step([&] { return loss(params); });
      rates.push_back(optimizer.group_state(0)->current_lr());
      EXPECT_NEAR(rates.back(), reference.group(0).eta, 1e-12);
    }
    EXPECT_LT(max_abs_diff(params, reference.all(0)), 1e-10);
    // The first step's rate is clamped (tracking starts from lr); the fast
    // case reaches both clamps.
    EXPECT_DOUBLE_EQ(rates.front(),
                     options.lr_max() ? *options.lr_max() : *options.lr_min());
    if (options.lr_min()) {
      EXPECT_DOUBLE_EQ(*std::min_element(rates.begin(), rates.end()),
                       *options.lr_min());
    }
  }
}

// The estimate g = (delta / sigma) z, read off a standard-WP step with lr 1
// (theta_new = theta - g), is unbiased. For a quadratic f = 0.5 x'Ax + b'x,
// delta = sigma (grad . z) + sigma^2/2 z'Az exactly, so
// E[g] = E[(grad . z) z] + sigma/2 E[(z'Az) z] = grad + 0 (odd Gaussian
// moments vanish). Each component has finite variance v_i, so the mean of N
// independent estimates is within 5 sqrt(v_i / N) of grad_i except with
// probability < 6e-7 per component (CLT); v_i is estimated from the samples.
// With N = 20000 that bound is ~4% of |grad|, tight enough to catch a wrong
// scale, sign or missing 1/sigma. The seeds are fixed, so the test is
// deterministic.
class GradientEstimate : public ::testing::TestWithParam<Noise> {};

TEST_P(GradientEstimate, IsUnbiased) {
  constexpr int64_t dim = 6;
  constexpr int samples = 20000;
  torch::manual_seed(5);
  const auto m = torch::randn({dim, dim}, torch::kDouble);
  const auto a = m.matmul(m.t()) / dim + torch::eye(dim, torch::kDouble);
  const auto b = torch::randn({dim}, torch::kDouble);
  const auto x0 = torch::randn({dim}, torch::kDouble);
  const auto gradient = a.matmul(x0) + b;

  auto x = x0.clone().requires_grad_();
  Dopamine optimizer({x},
                     DopamineOptions(1.0)
                         .sigma(1e-3)
                         .lr_adaptation(LrAdaptation::None)
                         .noise(GetParam())
                         .seed(9));
  auto closure = [&] { return 0.5 * x.dot(a.matmul(x)) + b.dot(x); };
  auto sum = torch::zeros({dim}, torch::kDouble);
  auto sum_sq = torch::zeros({dim}, torch::kDouble);
  for (int n = 0; n < samples; ++n) {
    {
      torch::NoGradGuard no_grad;
      x.copy_(x0);
    }
    optimizer.step(closure);
    const auto estimate = x0 - x;
    sum += estimate;
    sum_sq += estimate.square();
  }
  const auto mean = sum / samples;
  const auto variance = sum_sq / samples - mean.square();
  const auto tolerance = 5 * (variance / samples).sqrt();
  for (int64_t i = 0; i < dim; ++i) {
    EXPECT_NEAR(mean[i].item<double>(),
                gradient[i].item<double>(),
                tolerance[i].item<double>())
        << "component " << i;
  }
  EXPECT_LT(tolerance.max().item<double>(),
            0.1 * gradient.norm().item<double>());
}

INSTANTIATE_TEST_SUITE_P(BothNoises,
                         GradientEstimate,
                         ::testing::Values(Noise::Gaussian, Noise::Rademacher),
                         [](const auto& info) {
                           return to_string(info.param);
                         });

// Steps to reach MSE < 0.01 on XOR, or -1.
int xor_steps(uint64_t seed, const DopamineOptions& options, int max_steps) {
  auto net = make_xor_net(seed);
  const auto inputs = xor_inputs();
  const auto targets = xor_targets();
  Dopamine optimizer(net->parameters(), DopamineOptions(options).seed(seed));
  auto closure = [&] { return torch::mse_loss(net->forward(inputs), targets); };
  for (int step = 0; step < max_steps; ++step) {
    if (optimizer.step(closure).item<double>() < 0.01) {
      return step;
    }
  }
  return -1;
}

TEST(Convergence, XorSolvedByDefaultOptions) {
  int solved = 0;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    solved += xor_steps(seed, DopamineOptions(), 2000) >= 0;
  }
  EXPECT_GE(solved, 9);
}

TEST(Convergence, Quadratic1000DimsReducedHundredfold) {
  const Quadratic loss({{1000}}, torch::kFloat, 1);
  std::vector<torch::Tensor> params = {
      torch::full({1000}, 2.0f).requires_grad_()};
  auto closure = [&] { return loss(params); };
  const double initial = closure().item<double>();
  // Normalised steps have a noise floor proportional to lr, so the lr decays.
  Dopamine optimizer(params, DopamineOptions(0.05).seed(1));
  torch::optim::StepLR schedule(optimizer, 1000, 0.7);
  for (int step = 0; step < 15000; ++step) {
    optimizer.step(closure);
    schedule.step();
  }
  // The minimum of the quadratic is -sum(b^2 / 2a): compare the gap.
  const double minimum =
      (-0.5 * loss.b[0].square() / loss.a[0]).sum().item<double>();
  const double final_gap = closure().item<double>() - minimum;
  EXPECT_LT(final_gap, (initial - minimum) / 100);
}

}  // namespace
}  // namespace dopamine::testing
