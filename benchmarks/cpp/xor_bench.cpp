// XOR (2-4-1 MLP, MSE, full batch): steps and time to reach loss < 0.01 for
// Dopamine, standard WP, torch::optim::SGD and torch::optim::Adam.
//   dopamine_bench_xor [seeds] [max_steps] [records.json]
// Prints a markdown table; with a path, also writes the rows as records of
// the suite's schema (benchmarks/python/harness.py), front_end "cpp".
#include <dopamine/dopamine.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
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
  double lr;
  bool uses_gradients;
  int forwards_per_step;
  std::function<std::unique_ptr<torch::optim::Optimizer>(
      std::vector<torch::Tensor>, uint64_t seed)>
      make;
};

struct Run {
  bool solved;
  int steps;
  double milliseconds;
};

// One row of results/bench.json.
struct Row {
  const Contender& contender;
  int seeds;
  int max_steps;
  size_t solved;
  double median_steps;
  double median_ms;
  double ms_per_step;
};

// Dopamine with `options`, its noise seeded like the net's initialisation.
Contender dopamine_contender(const std::string& name,
                             const dopamine::DopamineOptions& options) {
  std::ostringstream settings;
  const auto directions = options.num_perturbations();
  settings << "lr " << options.lr() << ", sigma " << options.sigma() << ", "
           << dopamine::to_string(options.lr_adaptation()) << ", " << directions
           << (directions == 1 ? " direction" : " directions");
  return {
      name,
      settings.str(),
      options.lr(),
      false,
      static_cast<int>(options.antithetic() ? 2 * directions : directions + 1),
      [options](auto params, uint64_t seed) {
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
  auto elapsed = [&] {
    return std::chrono::duration<double, std::milli>(
               std::chrono::steady_clock::now() - start)
        .count();
  };
  for (int step = 0; step < max_steps; ++step) {
    // step() returns the loss before its update.
    if (optimizer->step(closure).item<double>() < kTarget) {
      return {true, step, elapsed()};
    }
  }
  return {false, max_steps, elapsed()};
}

double median(std::vector<double> values) {
  if (values.empty()) {
    return std::nan("");
  }
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

std::string json_number(double value) {
  if (!std::isfinite(value)) {
    return "null";
  }
  std::ostringstream text;
  text.precision(10);
  text << value;
  return text.str();
}

void write_records(const std::string& path, const std::vector<Row>& rows) {
  std::ofstream out(path);
  out << "{\"records\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const bool gradients = r.contender.uses_gradients;
    out << "  {\"front_end\": \"cpp\", \"task\": \"xor\", \"optimizer\": \""
        << r.contender.name
        << "\", \"config\": {\"lr\": " << json_number(r.contender.lr)
        << ", \"settings\": \"" << r.contender.settings
        << "\", \"seeds\": " << r.seeds << ", \"max_steps\": " << r.max_steps
        << ", \"target\": \"MSE < 0.01\"}, \"success_rate\": "
        << json_number(double(r.solved) / r.seeds)
        << ", \"median_steps_to_target\": " << json_number(r.median_steps)
        << ", \"median_seconds_to_target\": " << json_number(r.median_ms / 1000)
        << ", \"final_metric\": null, \"peak_memory_bytes\": null"
        << ", \"ms_per_step\": " << json_number(r.ms_per_step)
        << ", \"forward_passes_per_step\": " << r.contender.forwards_per_step
        << ", \"backward_passes_per_step\": " << (gradients ? 1 : 0)
        << ", \"torch_version\": \"" << TORCH_VERSION
        << "\", \"device\": \"cpu\", \"threads\": " << torch::get_num_threads()
        << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  out << "]}\n";
  TORCH_CHECK(out.good(), "could not write ", path);
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
      // The paper's Dopamine-2 form and standard WP: one direction.
      dopamine_contender("dopamine[rpe_tracking]",
                         DopamineOptions(1.0)
                             .sigma(0.01)
                             .lr_adaptation(LrAdaptation::RpeTracking)
                             .num_perturbations(1)),
      dopamine_contender("wp",
                         DopamineOptions(1.0)
                             .sigma(0.01)
                             .lr_adaptation(LrAdaptation::None)
                             .num_perturbations(1)),
      {"sgd",
       "lr 1.0",
       1.0,
       true,
       1,
       [](auto params, uint64_t) {
         return std::make_unique<torch::optim::SGD>(
             params, torch::optim::SGDOptions(1.0));
       }},
      {"adam",
       "lr 0.05",
       0.05,
       true,
       1,
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
  std::vector<Row> rows;
  for (const auto& contender : contenders) {
    std::vector<double> steps, milliseconds;
    double total_ms = 0, total_steps = 0;
    for (int seed = 0; seed < seeds; ++seed) {
      const Run run = train(contender, seed, max_steps);
      total_ms += run.milliseconds;
      total_steps += run.solved ? run.steps + 1 : run.steps;
      if (run.solved) {
        steps.push_back(run.steps);
        milliseconds.push_back(run.milliseconds);
      }
    }
    rows.push_back({contender,
                    seeds,
                    max_steps,
                    steps.size(),
                    median(steps),
                    median(milliseconds),
                    total_ms / total_steps});
    std::printf("| %s | %s | %zu/%d | %.0f | %.2f | %d | %d |\n",
                contender.name.c_str(),
                contender.settings.c_str(),
                steps.size(),
                seeds,
                median(steps),
                median(milliseconds),
                contender.forwards_per_step,
                contender.uses_gradients ? 1 : 0);
    std::fflush(stdout);
  }
  if (argc > 3) {
    write_records(argv[3], rows);
  }
  return 0;
}
