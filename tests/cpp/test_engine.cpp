// The step engine from C++: capturable, master weights, mixed dtypes, frozen
// and named parameters, and a state that survives reordering and is checked
// when loaded.
#include <ATen/CPUGeneratorImpl.h>

#include "test_utils.h"
#include "xor/xor_task.h"

namespace dopamine::testing {
namespace {

TEST(Engine, CapturableOnCpuMatchesTheDefaultBitForBit) {
  const Quadratic loss({{5}, {3}}, torch::kFloat, 4);
  torch::manual_seed(1);
  std::vector<torch::Tensor> params = {torch::randn({5}).requires_grad_(),
                                       torch::randn({3}).requires_grad_()};
  auto twin = clones(params);
  Dopamine optimizer(params, DopamineOptions().capturable(true));
  Dopamine twin_optimizer(twin);
  for (int t = 0; t < 5; ++t) {
    optimizer.step([&] { return loss(params); });
    twin_optimizer.step([&] { return loss(twin); });
  }
  EXPECT_TRUE(bitwise_equal(params, twin));
  EXPECT_EQ(*optimizer.group_state(0), *twin_optimizer.group_state(0));
  expect_error(
      [] {
        Dopamine({torch::zeros({2}, torch::requires_grad())},
                 DopamineOptions().capturable(true).non_finite_loss(
                     NonFiniteLoss::Raise));
      },
      {"raise with capturable=True"});
}

TEST(Engine, MasterWeightsKeepHalfParametersBitIdenticalAtLrZero) {
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    torch::manual_seed(2);
    std::vector<torch::Tensor> params = {
        torch::randn({3000}).to(dtype).requires_grad_()};
    const auto initial = clones(params);
    Dopamine optimizer(params,
                       DopamineOptions(0.0)
                           .sigma(1e-2)
                           .lr_adaptation(LrAdaptation::None)
                           .master_weights(true));
    for (int t = 0; t < 300; ++t) {
      optimizer.step([&] { return params[0].to(torch::kFloat).sum(); });
    }
    EXPECT_TRUE(bitwise_equal(params, initial)) << dtype;
    const auto& master = optimizer.group_state(0)->master_weight();
    ASSERT_TRUE(master.defined());
    EXPECT_EQ(master.scalar_type(), torch::kFloat);
  }
}

TEST(Engine, MixedDtypesTrainInOneGroup) {
  auto net = make_xor_net(3);
  // The hidden layer in bfloat16, the output layer in float32.
  net->hidden->to(torch::kBFloat16);
  const auto inputs = xor_inputs();
  const auto targets = xor_targets();
  auto loss = [&] {
    const auto hidden =
        torch::tanh(net->hidden->forward(inputs.to(torch::kBFloat16)))
            .to(torch::kFloat);
    return torch::mse_loss(torch::sigmoid(net->output->forward(hidden)),
                           targets);
  };
  const auto options = DopamineOptions().master_weights(true);
  Dopamine optimizer(net->parameters(), options);
  const double initial = loss().item<double>();
  // 7500 forward passes, as many steps as the default directions allow.
  for (int64_t t = 0; t < 7500 / (1 + options.num_perturbations()); ++t) {
    optimizer.step(loss);
  }
  EXPECT_EQ(net->hidden->weight.scalar_type(), torch::kBFloat16);
  EXPECT_LT(loss().item<double>(), initial / 4);
}

TEST(Engine, FrozenParametersAreUntouched) {
  auto frozen = torch::ones({4});
  auto trained = torch::ones({3}).requires_grad_();
  Dopamine optimizer({frozen, trained});
  for (int t = 0; t < 5; ++t) {
    optimizer.step([&] { return (trained - 2).square().sum(); });
  }
  EXPECT_TRUE(torch::equal(frozen, torch::ones({4})));
  EXPECT_FALSE(torch::equal(trained, torch::ones({3})));
}

// Collects the warnings raised while it lives.
class WarningCollector : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override {
    messages.push_back(warning.msg());
  }
  std::vector<std::string> messages;
};

TEST(Engine, AGroupWithNoTrainableParameterIsWarnedAboutOnce) {
  // Plain tensors, as a TorchScript module registers them: none requires
  // grad, so nothing would train.
  std::vector<torch::Tensor> plain = {torch::ones({8}), torch::ones({2})};
  auto trained = torch::ones({3}).requires_grad_();
  Dopamine optimizer(plain);
  optimizer.add_param_group(torch::optim::OptimizerParamGroup({trained}));
  WarningCollector collector;
  {
    const c10::WarningUtils::WarningHandlerGuard guard(&collector);
    for (int t = 0; t < 3; ++t) {
      optimizer.step([&] { return (trained - 2).square().sum(); });
    }
  }
  ASSERT_EQ(collector.messages.size(), 1u);
  EXPECT_NE(collector.messages[0].find("none of the 2 parameter(s) of group "
                                       "0 requires grad, so that group is "
                                       "not trained"),
            std::string::npos)
      << collector.messages[0];
  EXPECT_NE(collector.messages[0].find("requires_grad_()"), std::string::npos);
  EXPECT_TRUE(torch::equal(plain[0], torch::ones({8})));

  Dopamine idle(std::vector<torch::Tensor>{torch::zeros({4})});
  WarningCollector idle_collector;
  {
    const c10::WarningUtils::WarningHandlerGuard guard(&idle_collector);
    idle.step([] { return torch::ones({}); });
  }
  ASSERT_EQ(idle_collector.messages.size(), 1u);
  EXPECT_NE(idle_collector.messages[0].find("so step() trains nothing"),
            std::string::npos)
      << idle_collector.messages[0];
}

// restore_rng (the default): every evaluation of a step draws the same
// random numbers, and the generator advances as with one evaluation;
// without it every evaluation draws anew.
TEST(Engine, EveryEvaluationOfAStepDrawsTheSameRandomNumbers) {
  auto param = torch::zeros({4}).requires_grad_();
  for (const bool restore : {true, false}) {
    Dopamine optimizer(
        {param}, DopamineOptions().num_perturbations(2).restore_rng(restore));
    torch::manual_seed(0);
    for (int t = 0; t < 3; ++t) {
      std::vector<torch::Tensor> draws;
      const auto before = at::detail::getDefaultCPUGenerator().get_state();
      optimizer.step([&] {
        draws.push_back(torch::rand({3}));
        return (param - 1).square().sum();
      });
      ASSERT_EQ(draws.size(), 3u);
      EXPECT_EQ(draws[1].equal(draws[0]) && draws[2].equal(draws[0]), restore);
      if (restore) {
        const auto after = at::detail::getDefaultCPUGenerator().get_state();
        auto generator = at::detail::getDefaultCPUGenerator();
        generator.set_state(before);
        torch::rand({3});
        EXPECT_TRUE(
            after.equal(at::detail::getDefaultCPUGenerator().get_state()));
      }
    }
  }
}

TEST(Engine, StateSurvivesReorderingAndAMovedParameterIsAnError) {
  const Quadratic loss({{4}, {3}}, torch::kDouble, 5);
  std::vector<torch::Tensor> params = {
      torch::ones({4}, torch::kDouble).requires_grad_(),
      torch::ones({3}, torch::kDouble).requires_grad_()};
  Dopamine optimizer(params);
  optimizer.step([&] { return loss(params); });
  auto& first = optimizer.param_groups()[0].params();
  std::swap(first[0], first[1]);
  optimizer.step([&] { return loss(params); });
  EXPECT_EQ(optimizer.group_state(0)->step(), 2);

  auto other = torch::ones({2}, torch::kDouble).requires_grad_();
  optimizer.add_param_group(torch::optim::OptimizerParamGroup(
      {other}, std::make_unique<DopamineOptions>(0.05)));
  optimizer.step([&] { return loss(params) + other.sum(); });
  // add_param_group may have moved the groups: take them anew.
  auto& group = optimizer.param_groups()[0].params();
  optimizer.param_groups()[1].params().push_back(group.back());
  group.pop_back();
  expect_error(
      [&] { optimizer.step([&] { return loss(params) + other.sum(); }); },
      {"group 1 hold the states of different groups"});
}

TEST(Engine, NamedParametersAreKeptAndCheckedOnLoad) {
  auto net = make_xor_net(1);
  Dopamine optimizer(net->named_parameters());
  EXPECT_EQ(optimizer.param_names(), net->named_parameters().keys());
  optimizer.step([&] {
    return torch::mse_loss(net->forward(xor_inputs()), xor_targets());
  });
  const auto path = temp_path("named.pt");
  torch::save(optimizer, path);

  auto same = make_xor_net(1);
  Dopamine loaded(same->named_parameters());
  torch::load(loaded, path);
  EXPECT_EQ(*loaded.group_state(0), *optimizer.group_state(0));

  auto named = same->named_parameters();
  torch::OrderedDict<std::string, torch::Tensor> renamed;
  for (const auto& item : named) {
    renamed.insert("renamed." + item.key(), item.value());
  }
  Dopamine other(renamed);
  expect_error([&] { torch::load(other, path); }, {"parameter names differ"});
}

TEST(Engine, LoadedStateIsChecked) {
  auto net = make_xor_net(2);
  Dopamine optimizer(net->parameters());
  optimizer.step([&] {
    return torch::mse_loss(net->forward(xor_inputs()), xor_targets());
  });
  // The group's state tensor is shared: corrupt it for every parameter.
  optimizer.group_state(0)->group_state()[2] =
      std::numeric_limits<double>::quiet_NaN();
  const auto path = temp_path("corrupt.pt");
  torch::save(optimizer, path);
  auto fresh = make_xor_net(2);
  Dopamine loaded(fresh->parameters());
  expect_error([&] { torch::load(loaded, path); }, {"state rpe_trace", "nan"});
}

}  // namespace
}  // namespace dopamine::testing
