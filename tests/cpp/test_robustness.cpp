// Bad input gets a clear error and loses nothing (docs/DESIGN.md,
// "Guarantees").
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>

#include "test_utils.h"

namespace dopamine::testing {
namespace {

class BadInput : public ::testing::Test {
 protected:
  BadInput() : loss_({{5}, {3, 2}}, torch::kFloat, 2) {
    torch::manual_seed(4);
    params_ = {torch::randn({5}).requires_grad_(),
               torch::randn({3, 2}).requires_grad_()};
    initial_ = clones(params_);
  }

  // Parameters are back where they were: exactly if never perturbed, else
  // within the rounding of adding and subtracting sigma * z in float32.
  void expect_restored(double tolerance = 1e-6) {
    EXPECT_LE(max_abs_diff(params_, initial_), tolerance);
  }

  torch::Tensor good_loss() {
    return loss_(params_);
  }

  // A closure whose second loss is not a scalar; `calls` counts its calls.
  std::function<torch::Tensor()> non_scalar_second(int& calls) {
    return [this, &calls] {
      return ++calls == 1 ? good_loss() : torch::ones({3});
    };
  }

  // A closure that throws at call `failing_call` and returns the loss
  // otherwise; `calls` counts its calls.
  std::function<torch::Tensor()> failing_at(int failing_call, int& calls) {
    return [this, failing_call, &calls] {
      if (++calls == failing_call) {
        throw std::runtime_error("data loader failed");
      }
      return good_loss();
    };
  }

  Quadratic loss_;
  std::vector<torch::Tensor> params_;
  std::vector<torch::Tensor> initial_;
};

TEST_F(BadInput, NoClosure) {
  Dopamine optimizer(params_);
  expect_error([&] { optimizer.step(); }, {"closure"});
  EXPECT_TRUE(bitwise_equal(params_, initial_));
  EXPECT_EQ(optimizer.group_state(0), nullptr);
}

TEST_F(BadInput, ClosureReturnsNonScalar) {
  Dopamine optimizer(params_);
  expect_error([&] { optimizer.step([] { return torch::ones({2}); }); },
               {"scalar", "unperturbed", "[2]"});
  EXPECT_TRUE(bitwise_equal(params_, initial_));
  EXPECT_EQ(optimizer.group_state(0), nullptr);
}

TEST_F(BadInput, ClosureReturnsNonFloating) {
  Dopamine optimizer(params_);
  expect_error(
      [&] { optimizer.step([] { return torch::ones({}, torch::kLong); }); },
      {"floating-point", "Long"});
  EXPECT_TRUE(bitwise_equal(params_, initial_));
}

TEST_F(BadInput, ClosureReturnsUndefined) {
  Dopamine optimizer(params_);
  expect_error([&] { optimizer.step([] { return torch::Tensor(); }); },
               {"undefined"});
  EXPECT_TRUE(bitwise_equal(params_, initial_));
}

TEST_F(BadInput, PerturbedLossNonScalarRestores) {
  Dopamine optimizer(params_);
  int calls = 0;
  // The second evaluation is along the first of the default two directions.
  expect_error([&] { optimizer.step(non_scalar_second(calls)); },
               {"scalar", "theta + sigma z_0"});
  EXPECT_EQ(calls, 2);
  expect_restored();
  EXPECT_EQ(optimizer.group_state(0), nullptr);
}

// A throwing closure propagates its exception, restores the parameters and
// leaves the state as it was: the next step is the step that would have been.
TEST_F(BadInput, ClosureThrowsRestoresAndKeepsState) {
  const auto untouched = clones(params_);
  std::vector<torch::Tensor> twin = clones(params_);
  Dopamine optimizer(params_);
  Dopamine twin_optimizer(twin);
  optimizer.step([&] { return good_loss(); });
  twin_optimizer.step([&] { return loss_(twin); });
  initial_ = clones(params_);

  for (int failing_call : {1, 2}) {
    int calls = 0;
    EXPECT_THROW(optimizer.step(failing_at(failing_call, calls)),
                 std::runtime_error);
    expect_restored();
    EXPECT_EQ(*optimizer.group_state(0), *twin_optimizer.group_state(0));
  }
  optimizer.step([&] { return good_loss(); });
  twin_optimizer.step([&] { return loss_(twin); });
  // Equal up to the float32 rounding the restore left in the parameters.
  EXPECT_LE(max_abs_diff(params_, twin), 1e-5);
  const auto& state = *optimizer.group_state(0);
  const auto& twin_state = *twin_optimizer.group_state(0);
  EXPECT_EQ(state.step(), 2);
  EXPECT_EQ(twin_state.step(), 2);
  EXPECT_NEAR(
      state.rpe_trace(), twin_state.rpe_trace(), 1e-5 * twin_state.rpe_trace());
  EXPECT_GT(max_abs_diff(params_, untouched), 1e-3);
}

// A failure at any evaluation (with antithetic at theta + sigma z or theta -
// sigma z; with three directions along any of them) restores every parameter
// (exactly, from the master weight, for a bfloat16 parameter that has one)
// and leaves the state unset; a bad loss's error names its evaluation.
TEST_F(BadInput, ClosureFailureAtAnyEvaluationRestores) {
  auto half = torch::randn({7}).to(torch::kBFloat16).requires_grad_();
  const auto half_before = half.detach().clone();
  std::vector<torch::Tensor> all = {params_[0], params_[1], half};
  struct Case {
    bool antithetic;
    int64_t directions;
    std::vector<int> failing_calls;
  };
  for (const auto& c : std::vector<Case>{
           {true, 1, {1, 2}}, {false, 3, {1, 3, 4}}, {true, 3, {1, 3, 4}}}) {
    // Each case starts from the initial values: the rounding of the round
    // trips of one case must not count against the next.
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < params_.size(); ++i) {
        params_[i].copy_(initial_[i]);
      }
    }
    Dopamine optimizer(all,
                       DopamineOptions(0.1)
                           .antithetic(c.antithetic)
                           .num_perturbations(c.directions)
                           .master_weights(true)
                           .non_finite_loss(NonFiniteLoss::Raise));
    for (const int failing_call : c.failing_calls) {
      int calls = 0;
      EXPECT_THROW(optimizer.step(failing_at(failing_call, calls)),
                   std::runtime_error);
      EXPECT_EQ(calls, failing_call);
      expect_restored();
      EXPECT_TRUE(torch::equal(half, half_before));
      EXPECT_EQ(optimizer.group_state(0), nullptr);
    }
    int calls = 0;
    if (c.directions == 1) {
      expect_error([&] { optimizer.step(non_scalar_second(calls)); },
                   {"scalar", "theta - sigma z"});
    } else {
      expect_error(
          [&] {
            optimizer.step([&] {
              return ++calls == 3 ? torch::tensor(INFINITY) : params_[0].sum();
            });
          },
          {"the theta + sigma z_1 loss is inf", "parameters restored"});
      EXPECT_EQ(calls, c.antithetic ? 6 : 4);
    }
    expect_restored();
    EXPECT_TRUE(torch::equal(half, half_before));
    EXPECT_EQ(optimizer.group_state(0), nullptr);
  }
}

// One evaluation serves every group: groups that disagree on antithetic or
// num_perturbations are refused before anything is evaluated.
TEST_F(BadInput, NumPerturbationsMustAgreeAcrossGroups) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params_[0]},
                      std::make_unique<DopamineOptions>(0.1));
  groups.emplace_back(std::vector<torch::Tensor>{params_[1]},
                      std::make_unique<DopamineOptions>(
                          DopamineOptions(0.1).num_perturbations(3)));
  Dopamine optimizer(groups);
  int calls = 0;
  expect_error([&] { optimizer.step(failing_at(0, calls)); },
               {"invalid num_perturbations: 3 in parameter group 1",
                "same in every group"});
  EXPECT_EQ(calls, 0);
  EXPECT_TRUE(bitwise_equal(params_, initial_));
}

TEST_F(BadInput, AntitheticMustAgreeAcrossGroups) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params_[0]},
                      std::make_unique<DopamineOptions>(0.1));
  groups.emplace_back(
      std::vector<torch::Tensor>{params_[1]},
      std::make_unique<DopamineOptions>(DopamineOptions(0.1).antithetic(true)));
  Dopamine optimizer(groups);
  int calls = 0;
  expect_error(
      [&] { optimizer.step(failing_at(0, calls)); },
      {"invalid antithetic: true in parameter group 1", "same in every group"});
  EXPECT_EQ(calls, 0);
  EXPECT_TRUE(bitwise_equal(params_, initial_));
}

TEST_F(BadInput, NonFiniteLossSkipped) {
  Dopamine optimizer(params_);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  int64_t skipped = 0;
  for (int bad_call : {1, 2}) {
    for (double bad : {nan, inf}) {
      int calls = 0;
      const auto loss = optimizer.step([&] {
        return ++calls == bad_call ? torch::full({}, bad) : good_loss();
      });
      // Every evaluation runs (the unperturbed one and one along each of the
      // default two directions): the check is made on the losses together.
      EXPECT_EQ(calls, 3);
      if (bad_call == 1) {
        EXPECT_FALSE(std::isfinite(loss.item<double>()));
      }
      expect_restored();
      ++skipped;
      EXPECT_EQ(optimizer.group_state(0)->skipped_steps(), skipped);
      EXPECT_EQ(optimizer.group_state(0)->step(), skipped);
      EXPECT_EQ(optimizer.group_state(0)->rpe_trace(), 0);
    }
  }
  // Skipped steps draw fresh noise but leave the trace's bias correction
  // right: the next real step moves the parameters.
  optimizer.step([&] { return good_loss(); });
  EXPECT_GT(max_abs_diff(params_, initial_), 1e-4);
  EXPECT_GT(optimizer.group_state(0)->rpe_trace(), 0);
}

TEST_F(BadInput, NonFiniteLossRaises) {
  Dopamine optimizer(params_,
                     DopamineOptions().non_finite_loss(NonFiniteLoss::Raise));
  for (int bad_call : {1, 2}) {
    int calls = 0;
    expect_error(
        [&] {
          optimizer.step([&] {
            return ++calls == bad_call
                       ? torch::full({}, std::numeric_limits<float>::infinity())
                       : good_loss();
          });
        },
        {bad_call == 1 ? "unperturbed loss is inf"
                       : "theta + sigma z_0 loss is inf",
         "Raise"});
    expect_restored();
    EXPECT_EQ(optimizer.group_state(0), nullptr);
  }
}

struct OptionCase {
  DopamineOptions options;
  std::vector<std::string> message;
};

TEST(InvalidOptions, RejectedAtConstruction) {
  const std::vector<OptionCase> cases = {
      {DopamineOptions().sigma(0), {"sigma", "0"}},
      {DopamineOptions().sigma(-1), {"sigma", "-1"}},
      {DopamineOptions(-0.5), {"lr", "-0.5"}},
      {DopamineOptions().beta(1), {"beta", "1", "[0, 1)"}},
      {DopamineOptions().beta(-0.1), {"beta", "-0.1"}},
      {DopamineOptions().beta_s(1.5), {"beta_s", "1.5"}},
      {DopamineOptions().beta_eta(2), {"beta_eta", "2"}},
      {DopamineOptions().beta_baseline(1), {"beta_baseline", "1", "[0, 1)"}},
      {DopamineOptions().beta_baseline(-0.5), {"beta_baseline", "-0.5"}},
      {DopamineOptions().beta_baseline(std::nan("")), {"beta_baseline", "nan"}},
      {DopamineOptions().eps(0), {"eps", "0"}},
      {DopamineOptions().weight_decay(-1), {"weight_decay", "-1"}},
      {DopamineOptions().lr_min(-1), {"lr_min", "-1"}},
      {DopamineOptions().lr_min(0.5).lr_max(0.1), {"lr_min", "0.5", "lr_max"}},
      {DopamineOptions().num_perturbations(0), {"num_perturbations", "0"}},
      {DopamineOptions().num_perturbations(65537),
       {"num_perturbations", "65537", "[1, 65536]"}},
      {DopamineOptions()
           .lr_adaptation(LrAdaptation::LossSpread)
           .num_perturbations(1),
       {"num_perturbations: 1 with lr_adaptation=loss_spread"}},
      {DopamineOptions().rank(0), {"invalid rank: 0", "[1, 65536]"}},
      {DopamineOptions().rank(65537), {"invalid rank: 65537"}},
      {DopamineOptions().perturbation(static_cast<Perturbation>(2)),
       {"invalid perturbation code 2", "0 full, 1 lowrank"}},
  };
  for (const auto& c : cases) {
    auto param = torch::zeros({2});
    expect_error([&] { Dopamine optimizer({param}, c.options); }, c.message);
    // The same options in a parameter group are rejected too.
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<torch::Tensor>{param},
                        std::make_unique<DopamineOptions>(c.options));
    expect_error([&] { Dopamine optimizer(groups); }, c.message);
  }
}

TEST(InvalidOptions, ChangedAfterConstructionRejectedAtStep) {
  auto param = torch::ones({2}).requires_grad_();
  Dopamine optimizer({param});
  static_cast<DopamineOptions&>(optimizer.param_groups()[0].options())
      .sigma(-2);
  expect_error([&] { optimizer.step([&] { return param.sum(); }); },
               {"sigma", "-2"});
  EXPECT_TRUE(torch::equal(param, torch::ones({2})));
}

TEST(InvalidParams, RejectedAtConstruction) {
  const auto leaf = torch::ones({2}, torch::requires_grad());
  expect_error([] { Dopamine({torch::ones({2}, torch::kLong)}); },
               {"parameter 0 of group 0", "Long", "floating-point"});
  expect_error([] { Dopamine({torch::ones({2}), torch::eye(2).to_sparse()}); },
               {"parameter 1 of group 0", "Sparse"});
  expect_error([&] { Dopamine({leaf * 2}); }, {"not a leaf"});
  expect_error([&] { Dopamine({leaf, leaf}); }, {"more than once"});
  expect_error([] { Dopamine({torch::Tensor()}); }, {"undefined"});
}

TEST(InvalidParams, AddedGroupChecked) {
  auto param = torch::ones({2}).requires_grad_();
  Dopamine optimizer({param});
  auto bad_group = [] {
    return torch::optim::OptimizerParamGroup(
        {torch::ones({2}, torch::kInt)}, std::make_unique<DopamineOptions>());
  };
  expect_error([&] { optimizer.add_param_group(bad_group()); },
               {"group 1", "Int"});
  expect_error(
      [&] {
        optimizer.add_param_group(torch::optim::OptimizerParamGroup(
            {torch::ones({2})}, std::make_unique<DopamineOptions>(-1.0)));
      },
      {"lr", "-1"});
  expect_error(
      [&] {
        optimizer.add_param_group(torch::optim::OptimizerParamGroup({param}));
      },
      {"more than once"});
  EXPECT_EQ(optimizer.param_groups().size(), 1);
  // Through the base class the group gets in, and the first step rejects it
  // before touching any parameter.
  static_cast<torch::optim::Optimizer&>(optimizer).add_param_group(bad_group());
  expect_error([&] { optimizer.step([&] { return param.sum(); }); },
               {"group 1", "Int"});
  EXPECT_TRUE(torch::equal(param, torch::ones({2})));
}

}  // namespace
}  // namespace dopamine::testing
