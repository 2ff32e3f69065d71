// Trajectory and replay from C++ (docs/DESIGN.md, "Trajectory and
// replay"): a recorded run rebuilt from its initial parameters, bit for
// bit, failed and skipped steps and master weights included; what replay
// refuses. The exchange with Python is tested by test_trajectory.py.
#include <torch/csrc/jit/serialization/pickle.h>

#include "test_utils.h"

namespace dopamine::testing {
namespace {

// Trains `params` (a frozen one among them) for `steps` steps with a closure
// that throws at step 3 and returns NaN at step 5, recording the trajectory.
c10::impl::GenericDict train_and_record(std::vector<torch::Tensor>& params,
                                        const DopamineOptions& options,
                                        int steps) {
  const Quadratic loss({{6}, {2}, {4, 3}}, torch::kFloat, 7);
  Dopamine optimizer({torch::optim::OptimizerParamGroup({params[0], params[1]}),
                      torch::optim::OptimizerParamGroup(
                          {params[2]},
                          std::make_unique<DopamineOptions>(
                              DopamineOptions(options).seed(11).sigma(0.02)))},
                     options);
  optimizer.record_trajectory();
  for (int t = 0; t < steps; ++t) {
    int calls = 0;
    try {
      optimizer.step([&] {
        ++calls;
        if (t == 3 && calls == 2) {
          throw std::runtime_error("a failing evaluation");
        }
        const auto value = loss({params[0].to(torch::kFloat),
                                 params[1].to(torch::kFloat),
                                 params[2].to(torch::kFloat)});
        return t == 5 && calls == 2 ? value * NAN : value;
      });
    } catch (const std::runtime_error&) {
    }
  }
  return optimizer.trajectory();
}

TEST(Trajectory, ReplayRebuildsTheParametersBitForBit) {
  for (const bool antithetic : {false, true}) {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      torch::manual_seed(3);
      std::vector<torch::Tensor> params = {
          torch::randn({6}).to(dtype).requires_grad_(),
          torch::randn({2}).to(dtype),
          torch::randn({4, 3}).to(dtype).requires_grad_()};
      const auto initial = clones(params);
      const auto options = DopamineOptions(0.05)
                               .antithetic(antithetic)
                               .master_weights(dtype == torch::kBFloat16)
                               .num_perturbations(3);
      const auto trajectory = train_and_record(params, options, 12);
      EXPECT_EQ(trajectory.at("steps").toList().size(), 12u);
      EXPECT_FALSE(bitwise_equal(params, initial));  // the run moved them
      // Through pickling, as a trajectory travels to a file and back.
      auto replayed = clones(initial);
      replay(replayed,
             torch::jit::pickle_load(torch::jit::pickle_save(trajectory)));
      EXPECT_TRUE(bitwise_equal(replayed, params))
          << "antithetic " << antithetic << ", " << dtype;
    }
  }
}

TEST(Trajectory, ReplayRefusesWhatItCannotUseBeforeWriting) {
  std::vector<torch::Tensor> params = {torch::randn({6}).requires_grad_(),
                                       torch::randn({2}),
                                       torch::randn({4, 3}).requires_grad_()};
  const auto initial = clones(params);
  auto trajectory = train_and_record(params, DopamineOptions(0.05), 2);
  auto replayed = clones(initial);
  expect_error(
      [&] { replay({replayed[0], replayed[1]}, trajectory); },
      {"the trajectory moves parameter 2, but 2 parameters were given"});
  auto other_format = trajectory.copy();
  other_format.insert_or_assign("format", int64_t{3});
  expect_error([&] { replay(replayed, other_format); },
               {"not a trajectory of format 4", "got format 3"});
  EXPECT_TRUE(bitwise_equal(replayed, initial));

  Dopamine stepped(params);
  stepped.step([&] { return params[0].sum(); });
  expect_error([&] { stepped.record_trajectory(); }, {"before the first step"});
  expect_error([&] { stepped.trajectory(); }, {"needs record_trajectory()"});
}

}  // namespace
}  // namespace dopamine::testing
