// XOR (2-4-1 MLP, MSE, full batch): steps and time to reach loss < 0.01 for
// Dopamine, standard WP, torch::optim::SGD and torch::optim::Adam.
//   dopamine_bench_xor [seeds] [max_steps]
#include <dopamine/dopamine.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "xor/xor_task.h"

namespace {

constexpr double kTarget = 0.01;

struct Contender {
  std::string name;
  std::string settings;
  bool uses_gradients;
  std::function<std::unique_ptr<torch::optim::Optimizer>(
      std::vector<torch::Tensor>, uint64_t seed)>
      make;
};

struct Run {
  bool solved;
  int steps;
  double milliseconds;
};

// Dopamine with `options`, its noise seeded like the net's initialisation.
Contender dopamine_contender(const std::string& name,
                             const dopamine::DopamineOptions& options) {
  std::ostringstream settings;
  settings << "lr " << options.lr() << ", sigma " << options.sigma() << ", "
           << dopamine::to_string(options.lr_adaptation());
  return {name, settings.str(), false, [options](auto params, uint64_t seed) {
            return std::make_unique<dopamine::Dopamine>(
                params, dopamine::DopamineOptions(options).seed(seed));
          }};
}

Run train(const Contender& contender, uint64_t seed, int max_steps) {
  auto net = make_xor_net(seed);
  const auto inputs = xor_inputs();
  const auto targets = xor_targets();
  auto optimizer = contender.make(net->parameters(), seed);
  std::function<torch::Tensor()> closure;
  if (contender.uses_gradients) {
    closure = [&] {
      optimizer->zero_grad();
      auto loss = torch::mse_loss(net->forward(inputs), targets);
      loss.backward();
      return loss;
    };
  } else {
    closure = [&] { return torch::mse_loss(net->forward(inputs), targets); };
  }
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < max_steps; ++step) {
    // step() returns the loss before its update.
    if (optimizer->step(closure).item<double>() < kTarget) {
      const std::chrono::duration<double, std::milli> elapsed =
          std::chrono::steady_clock::now() - start;
      return {true, step, elapsed.count()};
    }
  }
  return {false, max_steps, 0};
}

double median(std::vector<double> values) {
  if (values.empty()) {
    return std::nan("");
  }
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const int seeds = argc > 1 ? std::atoi(argv[1]) : 20;
  const int max_steps = argc > 2 ? std::atoi(argv[2]) : 5000;
  torch::set_num_threads(1);

  using dopamine::DopamineOptions;
  using dopamine::LrAdaptation;
  const std::vector<Contender> contenders = {
      dopamine_contender("dopamine", DopamineOptions(0.1).sigma(0.01)),
      dopamine_contender("dopamine[rpe_tracking]",
                         DopamineOptions(1.0).sigma(0.01).lr_adaptation(
                             LrAdaptation::RpeTracking)),
      dopamine_contender(
          "wp",
          DopamineOptions(1.0).sigma(0.01).lr_adaptation(LrAdaptation::None)),
      {"sgd",
       "lr 1.0",
       true,
       [](auto params, uint64_t) {
         return std::make_unique<torch::optim::SGD>(
             params, torch::optim::SGDOptions(1.0));
       }},
      {"adam",
       "lr 0.05",
       true,
       [](auto params, uint64_t) {
         return std::make_unique<torch::optim::Adam>(
             params, torch::optim::AdamOptions(0.05));
       }},
  };

  std::printf(
      "XOR 2-4-1 MLP, MSE, full batch, target loss %.2g, %d seeds, "
      "at most %d steps, 1 thread, torch %s\n\n",
      kTarget,
      seeds,
      max_steps,
      TORCH_VERSION);
  std::printf(
      "| optimizer | settings | solved | median steps | median ms "
      "| forwards/step | backwards/step |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const auto& contender : contenders) {
    std::vector<double> steps, milliseconds;
    for (int seed = 0; seed < seeds; ++seed) {
      const Run run = train(contender, seed, max_steps);
      if (run.solved) {
        steps.push_back(run.steps);
        milliseconds.push_back(run.milliseconds);
      }
    }
    std::printf("| %s | %s | %zu/%d | %.0f | %.2f | %d | %d |\n",
                contender.name.c_str(),
                contender.settings.c_str(),
                steps.size(),
                seeds,
                median(steps),
                median(milliseconds),
                contender.uses_gradients ? 1 : 2,
                contender.uses_gradients ? 1 : 0);
    std::fflush(stdout);
  }
  return 0;
}
