// Checkpoints, schedulers, parameter groups, dtypes, threads and devices.
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/optim/schedulers/step_lr.h>

#include <sstream>

#include "test_utils.h"
#include "xor/xor_task.h"

namespace dopamine::testing {
namespace {

std::vector<torch::Tensor> train_xor(XorNet& net,
                                     Dopamine& optimizer,
                                     int steps) {
  const auto inputs = xor_inputs();
  const auto targets = xor_targets();
  for (int i = 0; i < steps; ++i) {
    optimizer.step(
        [&] { return torch::mse_loss(net->forward(inputs), targets); });
  }
  return clones(net->parameters());
}

class Resume : public ::testing::TestWithParam<LrAdaptation> {};

// The rpe_tracking case is antithetic, the none case takes three directions
// and the loss_spread case two, with a low-rank perturbation, the
// rpe_normalized case keeps a baseline: the options are saved with the group.
TEST_P(Resume, SavedAndLoadedRunIsBitIdentical) {
  const auto options =
      DopamineOptions(0.1)
          .lr_adaptation(GetParam())
          .seed(3)
          .antithetic(GetParam() == LrAdaptation::RpeTracking)
          .num_perturbations(GetParam() == LrAdaptation::None         ? 3
                             : GetParam() == LrAdaptation::LossSpread ? 2
                                                                      : 1)
          .perturbation(GetParam() == LrAdaptation::LossSpread
                            ? Perturbation::LowRank
                            : Perturbation::Full)
          .beta_baseline(GetParam() == LrAdaptation::RpeNormalized
                             ? std::optional<double>(0.9)
                             : std::nullopt);
  auto straight = make_xor_net(1);
  Dopamine straight_optimizer(straight->parameters(), options);
  const auto expected = train_xor(straight, straight_optimizer, 40);

  const auto model_path = temp_path("model.pt");
  const auto optimizer_path = temp_path("optimizer.pt");
  {
    auto first_half = make_xor_net(1);
    Dopamine optimizer(first_half->parameters(), options);
    train_xor(first_half, optimizer, 20);
    torch::save(first_half, model_path);
    torch::save(optimizer, optimizer_path);
  }
  auto resumed = make_xor_net(99);
  torch::load(resumed, model_path);
  // Different constructor options: load must restore the saved ones.
  Dopamine optimizer(resumed->parameters(), DopamineOptions(0.7).seed(5));
  torch::load(optimizer, optimizer_path);
  EXPECT_EQ(optimizer.group_state(0)->step(), 20);
  EXPECT_EQ(
      static_cast<DopamineOptions&>(optimizer.param_groups()[0].options()),
      options);
  const auto actual = train_xor(resumed, optimizer, 20);
  EXPECT_TRUE(bitwise_equal(actual, expected));
  EXPECT_EQ(*optimizer.group_state(0), *straight_optimizer.group_state(0));
  std::filesystem::remove(model_path);
  std::filesystem::remove(optimizer_path);
}

// Format 1's group states had five entries, no rpe_baseline: such a
// checkpoint loads with b = 0; format 2 must have the six.
TEST(Checkpoint, OfFormat1LoadsWithNoBaseline) {
  auto net = make_xor_net(1);
  Dopamine optimizer(net->parameters(), DopamineOptions(0.1));
  train_xor(net, optimizer, 5);
  const auto trace = optimizer.group_state(0)->rpe_trace();
  for (auto& [key, state] : optimizer.state()) {
    auto& param_state = static_cast<DopamineParamState&>(*state);
    param_state.group_state(param_state.group_state().slice(0, 0, 5));
  }
  const auto path = temp_path("format1.pt");
  for (const int64_t format : {int64_t{1}, int64_t{2}}) {
    torch::serialize::OutputArchive archive;
    optimizer.save(archive);
    archive.write("dopamine_format", c10::IValue(format));
    archive.save_to(path);
    Dopamine loaded(net->parameters(), DopamineOptions(0.1));
    if (format == 2) {
      EXPECT_THROW(
          {
            try {
              torch::load(loaded, path);
            } catch (const c10::Error& error) {
              EXPECT_NE(std::string(error.what()).find("of shape [6]"),
                        std::string::npos)
                  << error.what();
              throw;
            }
          },
          c10::Error);
      EXPECT_EQ(loaded.group_state(0), nullptr);
      continue;
    }
    torch::load(loaded, path);
    EXPECT_EQ(loaded.group_state(0)->step(), 5);
    EXPECT_EQ(loaded.group_state(0)->rpe_trace(), trace);
    EXPECT_EQ(loaded.group_state(0)->rpe_baseline(), 0);
  }
  std::filesystem::remove(path);
}

INSTANTIATE_TEST_SUITE_P(AllModes,
                         Resume,
                         ::testing::Values(LrAdaptation::None,
                                           LrAdaptation::RpeNormalized,
                                           LrAdaptation::RpeTracking,
                                           LrAdaptation::LossSpread),
                         [](const auto& info) {
                           return to_string(info.param);
                         });

// A checkpoint says its format; one of another format is refused and
// changes nothing.
TEST(Resume, TheCheckpointSaysItsFormatAndAnUnknownOneIsRefused) {
  auto net = make_xor_net(2);
  Dopamine optimizer(net->parameters());
  train_xor(net, optimizer, 3);
  torch::serialize::OutputArchive saved;
  optimizer.save(saved);
  c10::IValue format;
  std::stringstream stream;
  saved.save_to(stream);
  torch::serialize::InputArchive archive;
  archive.load_from(stream);
  ASSERT_TRUE(archive.try_read("dopamine_format", format));
  EXPECT_EQ(format.toInt(), 2);

  torch::serialize::OutputArchive newer;
  newer.write("dopamine_format", int64_t{3});
  std::stringstream newer_stream;
  newer.save_to(newer_stream);
  torch::serialize::InputArchive newer_archive;
  newer_archive.load_from(newer_stream);
  const auto before = *optimizer.group_state(0);
  expect_error([&] { optimizer.load(newer_archive); },
               {"the checkpoint is of format 3; this version reads formats 1 "
                "to 2"});
  EXPECT_EQ(*optimizer.group_state(0), before);
}

// Options saved before antithetic, num_perturbations, restore_rng and
// beta_baseline existed (no such keys) load as not antithetic, with one
// direction, not restoring the random generators, with no baseline.
TEST(Resume, OptionsSavedBeforeAntitheticLoadAsNotAntithetic) {
  const auto saved = DopamineOptions(0.3)
                         .seed(4)
                         .num_perturbations(1)
                         .restore_rng(false)
                         .beta_baseline(std::nullopt);
  torch::serialize::OutputArchive old;
  old.write("lr", saved.lr());
  old.write("sigma", saved.sigma());
  old.write("lr_adaptation", static_cast<int64_t>(saved.lr_adaptation()));
  old.write("beta", saved.beta());
  old.write("beta_s", saved.beta_s());
  old.write("beta_eta", saved.beta_eta());
  old.write("eps", saved.eps());
  old.write("lr_min", c10::IValue());
  old.write("lr_max", c10::IValue());
  old.write("weight_decay", saved.weight_decay());
  old.write("seed", saved.seed());
  old.write("noise", static_cast<int64_t>(saved.noise()));
  old.write("non_finite_loss", static_cast<int64_t>(saved.non_finite_loss()));
  old.write("capturable", saved.capturable());
  old.write("master_weights", saved.master_weights());
  std::stringstream stream;
  old.save_to(stream);
  torch::serialize::InputArchive archive;
  archive.load_from(stream);
  auto loaded = DopamineOptions(0.1).antithetic(true);
  loaded.serialize(archive);
  EXPECT_EQ(loaded, saved);
  EXPECT_FALSE(loaded.antithetic());
  EXPECT_EQ(loaded.num_perturbations(), 1);
  EXPECT_FALSE(loaded.restore_rng());
  EXPECT_FALSE(loaded.beta_baseline().has_value());
}

TEST(Scheduler, StepLRDrivesTheLearningRate) {
  const Quadratic loss({{6}}, torch::kDouble, 8);
  std::vector<torch::Tensor> params = {
      torch::ones({6}, torch::kDouble).requires_grad_()};
  const auto options = DopamineOptions(0.2)
                           .lr_adaptation(LrAdaptation::None)
                           .num_perturbations(1)
                           .beta_baseline(std::nullopt);
  ReferenceDopamine reference;
  reference.add_group(params, options);
  Dopamine optimizer(params, options);
  torch::optim::StepLR schedule(optimizer, /*step_size=*/2, /*gamma=*/0.5);
  for (int t = 0; t < 6; ++t) {
    const double lr = optimizer.param_groups()[0].options().get_lr();
    reference.group(0).options.lr(lr);
    reference.step(loss);
    optimizer.step([&] { return loss(params); });
    schedule.step();
    EXPECT_DOUBLE_EQ(optimizer.group_state(0)->current_lr(), lr);
  }
  // torch's C++ StepLR first decays after step_size + 1 calls.
  EXPECT_DOUBLE_EQ(optimizer.param_groups()[0].options().get_lr(), 0.05);
  EXPECT_LT(max_abs_diff(params, reference.all(0)), 1e-10);
}

TEST(ParamGroups, EachGroupUsesItsOwnOptions) {
  const Quadratic loss({{4}, {3}, {2, 3}}, torch::kDouble, 6);
  torch::manual_seed(2);
  std::vector<torch::Tensor> params = {
      torch::randn({4}, torch::kDouble).requires_grad_(),
      torch::randn({3}, torch::kDouble).requires_grad_(),
      torch::randn({2, 3}, torch::kDouble).requires_grad_()};
  const auto defaults = DopamineOptions(0.05)
                            .sigma(1e-3)
                            .seed(1)
                            .num_perturbations(1)
                            .beta_baseline(std::nullopt);
  const auto second = DopamineOptions(0.3)
                          .sigma(1e-2)
                          .seed(8)
                          .num_perturbations(1)
                          .beta_baseline(std::nullopt)
                          .lr_adaptation(LrAdaptation::RpeTracking)
                          .weight_decay(0.01);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0]});
  groups.emplace_back(std::vector<torch::Tensor>{params[1], params[2]},
                      std::make_unique<DopamineOptions>(second));
  Dopamine optimizer(groups, defaults);

  ReferenceDopamine reference;
  reference.add_group({params[0]}, defaults);
  reference.add_group({params[1], params[2]}, second);
  for (int t = 0; t < 5; ++t) {
    reference.step(loss);
    optimizer.step([&] { return loss(params); });
  }
  EXPECT_LT(max_abs_diff(params, reference.all(0)), 1e-10);
  EXPECT_NE(optimizer.group_state(0)->current_lr(),
            optimizer.group_state(1)->current_lr());
  EXPECT_EQ(optimizer.group_state(1)->step(), 5);
  // O(1) state: each parameter holds its group's one state tensor.
  EXPECT_EQ(optimizer.state().size(), 3);
  const auto& state = optimizer.state();
  auto group_state_of = [&](const torch::Tensor& p) {
    return static_cast<const DopamineParamState&>(
               *state.at(p.unsafeGetTensorImpl()))
        .group_state();
  };
  EXPECT_TRUE(group_state_of(params[1]).is_same(group_state_of(params[2])));
  EXPECT_FALSE(group_state_of(params[0]).is_same(group_state_of(params[1])));
  EXPECT_EQ(group_state_of(params[0]).numel(), ops::kGroupStateSize);
}

TEST(ParamGroups, GroupAddedLaterStartsItsOwnCount) {
  auto first = torch::ones({3}).requires_grad_();
  auto later = torch::ones({2}).requires_grad_();
  Dopamine optimizer({first});
  auto closure = [&] { return (first.square().sum() + later.square().sum()); };
  optimizer.step(closure);
  optimizer.add_param_group(torch::optim::OptimizerParamGroup(
      {later}, std::make_unique<DopamineOptions>(0.05)));
  optimizer.step(closure);
  EXPECT_EQ(optimizer.group_state(0)->step(), 2);
  EXPECT_EQ(optimizer.group_state(1)->step(), 1);
  EXPECT_FALSE(torch::equal(later, torch::ones({2})));
}

TEST(Dtypes, HalfTypesDrawRoundedNoiseAndTrain) {
  // float64 is covered to 1e-10 by the UpdateRule tests; here bfloat16 and
  // float16 parameters keep their dtype, draw the float32 noise rounded
  // once, and train.
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    const auto rounded = noise_of(torch::zeros({64}, dtype), 5, 1, 0);
    const auto exact = noise_of(torch::zeros({64}), 5, 1, 0);
    EXPECT_EQ(rounded.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(rounded, exact.to(dtype)));

    const Quadratic loss({{64}}, torch::kFloat, 3);
    std::vector<torch::Tensor> params = {
        torch::full({64}, 2.0, dtype).requires_grad_()};
    auto closure = [&] { return loss({params[0].to(torch::kFloat)}); };
    const double initial = closure().item<double>();
    Dopamine optimizer(params, DopamineOptions(0.01).sigma(0.05));
    for (int t = 0; t < 500; ++t) {
      optimizer.step(closure);
    }
    EXPECT_EQ(params[0].scalar_type(), dtype);
    EXPECT_LT(closure().item<double>(), initial / 2) << dtype;
  }
}

TEST(Threads, OpsAndTrajectoriesIndependentOfThreadCount) {
  const int threads_before = at::get_num_threads();
  auto run = [](int threads) {
    at::set_num_threads(threads);
    torch::manual_seed(0);
    // Large enough for ATen to split the elementwise work across threads.
    std::vector<torch::Tensor> params = {torch::randn({1 << 20}),
                                         torch::randn({1000, 300})};
    move(params, state_at(2), {0, 1}, 1, 0.01);
    move(params,
         state_at(3),
         {0, 1},
         1,
         0.02,
         Noise::Rademacher,
         {1, 0},
         {0, 0});
    auto net = make_xor_net(4);
    Dopamine optimizer(net->parameters());
    auto trained = train_xor(net, optimizer, 10);
    params.insert(params.end(), trained.begin(), trained.end());
    return params;
  };
  const auto one = run(1);
  const auto two = run(2);
  at::set_num_threads(threads_before);
  EXPECT_TRUE(bitwise_equal(one, two));
}

TEST(Cuda, UpdateMatchesReferenceAndXorTrains) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "CUDA is not available";
  }
  const torch::Device cuda(torch::kCUDA);
  const Quadratic loss({{5}, {2, 3}}, torch::kDouble, 7);
  std::vector<torch::Tensor> params = {
      torch::randn({5}, torch::kDouble).to(cuda).requires_grad_(),
      torch::randn({2, 3}, torch::kDouble).to(cuda).requires_grad_()};
  const auto options = DopamineOptions(0.05)
                           .sigma(1e-3)
                           .weight_decay(0.1)
                           .num_perturbations(1)
                           .beta_baseline(std::nullopt);
  ReferenceDopamine reference;
  reference.add_group(params, options);
  Dopamine optimizer(params, options);
  for (int t = 0; t < 4; ++t) {
    reference.step(loss);
    optimizer.step([&] { return loss(params); });
  }
  EXPECT_LT(max_abs_diff(params, reference.all(0)), 1e-10);

  auto net = make_xor_net(0);
  net->to(cuda);
  const auto inputs = xor_inputs().to(cuda);
  const auto targets = xor_targets().to(cuda);
  Dopamine xor_optimizer(net->parameters());
  auto closure = [&] { return torch::mse_loss(net->forward(inputs), targets); };
  double last = 1;
  for (int t = 0; t < 2000 && last >= 0.01; ++t) {
    last = xor_optimizer.step(closure).item<double>();
  }
  EXPECT_LT(last, 0.01);
}

}  // namespace
}  // namespace dopamine::testing
