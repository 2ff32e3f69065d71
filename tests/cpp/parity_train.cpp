// The C++ half of the C++/Python parity tests (tests/python/parity.py, used
// by test_interop.py and test_properties.py):
// trains a TorchScript module whose forward() takes no input and returns the
// loss, with dopamine::Dopamine over the groups given, then saves the module
// and prints each group's state; with --record it also writes the
// trajectory (torch::pickle_save, for Python's torch.load). --replay replays
// a trajectory that Python's torch.save wrote on a module's parameters.
//   dopamine_parity_train MODULE STEPS OUT [--antithetic]
//       [--record TRAJECTORY] GROUP...
//   dopamine_parity_train --replay MODULE TRAJECTORY OUT
// A GROUP is comma-separated key=value pairs: `size` (how many of the
// module's parameters, in order, the group takes) and any of lr, sigma,
// lr_adaptation, beta, beta_s, beta_eta, eps, lr_min, lr_max, weight_decay,
// beta_baseline, seed, noise, perturbation (enums by their to_string names),
// num_perturbations and rank; lr_min, lr_max and beta_baseline may be
// `none` (unset).
// --antithetic sets every
// group's antithetic option.
#include <dopamine/dopamine.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/script.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

template <typename Enum>
Enum parse_enum(const std::string& value, std::initializer_list<Enum> all) {
  for (const Enum candidate : all) {
    if (dopamine::to_string(candidate) == value) {
      return candidate;
    }
  }
  throw std::invalid_argument("unknown enum value " + value);
}

// The real-valued options a GROUP may set, by name.
const std::map<std::string,
               std::function<void(dopamine::DopamineOptions&, double)>>
    kRealOptions = {
        {"lr", [](auto& o, double x) { o.lr(x); }},
        {"sigma", [](auto& o, double x) { o.sigma(x); }},
        {"beta", [](auto& o, double x) { o.beta(x); }},
        {"beta_s", [](auto& o, double x) { o.beta_s(x); }},
        {"beta_eta", [](auto& o, double x) { o.beta_eta(x); }},
        {"eps", [](auto& o, double x) { o.eps(x); }},
        {"lr_min", [](auto& o, double x) { o.lr_min(x); }},
        {"lr_max", [](auto& o, double x) { o.lr_max(x); }},
        {"weight_decay", [](auto& o, double x) { o.weight_decay(x); }},
        {"beta_baseline", [](auto& o, double x) { o.beta_baseline(x); }},
};

// The optional real-valued options, which "none" unsets (Python's None).
const std::map<std::string, std::function<void(dopamine::DopamineOptions&)>>
    kUnsetOptions = {
        {"lr_min", [](auto& o) { o.lr_min(std::nullopt); }},
        {"lr_max", [](auto& o) { o.lr_max(std::nullopt); }},
        {"beta_baseline", [](auto& o) { o.beta_baseline(std::nullopt); }},
};

// The group's size and options, from "size=2,lr=0.1,...".
std::pair<size_t, dopamine::DopamineOptions> parse_group(
    const std::string& spec) {
  using dopamine::LrAdaptation;
  using dopamine::Noise;
  size_t size = 0;
  dopamine::DopamineOptions o;
  std::stringstream fields(spec);
  std::string field;
  while (std::getline(fields, field, ',')) {
    const auto equals = field.find('=');
    const std::string key = field.substr(0, equals);
    const std::string value = field.substr(equals + 1);
    if (key == "size") {
      size = std::stoul(value);
    } else if (key == "lr_adaptation") {
      o.lr_adaptation(parse_enum(value,
                                 {LrAdaptation::None,
                                  LrAdaptation::RpeNormalized,
                                  LrAdaptation::RpeTracking,
                                  LrAdaptation::LossSpread}));
    } else if (key == "noise") {
      o.noise(parse_enum(value, {Noise::Gaussian, Noise::Rademacher}));
    } else if (key == "seed") {
      o.seed(std::stoll(value));
    } else if (key == "num_perturbations") {
      o.num_perturbations(std::stoll(value));
    } else if (key == "perturbation") {
      o.perturbation(parse_enum(
          value,
          {dopamine::Perturbation::Full, dopamine::Perturbation::LowRank}));
    } else if (key == "rank") {
      o.rank(std::stoll(value));
    } else if (value == "none" && kUnsetOptions.count(key) != 0) {
      kUnsetOptions.at(key)(o);
    } else {
      const auto setter = kRealOptions.find(key);
      if (setter == kRealOptions.end()) {
        throw std::invalid_argument("unknown option " + key);
      }
      // strtod, not stod: a subnormal value is a value, not an error.
      setter->second(o, std::strtod(value.c_str(), nullptr));
    }
  }
  return {size, o};
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// --replay MODULE TRAJECTORY OUT: replays the trajectory (as Python's
// torch.save wrote it) on the module's parameters and saves the module.
int replay(char** argv) {
  torch::jit::Module module = torch::jit::load(argv[2]);
  std::vector<torch::Tensor> params;
  for (const auto& param : module.parameters()) {
    params.push_back(param);
  }
  dopamine::replay(params, torch::jit::pickle_load(read_file(argv[3])));
  module.save(argv[4]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "--replay") {
    return replay(argv);
  }
  if (argc < 5) {
    std::cerr << "usage: dopamine_parity_train MODULE STEPS OUT "
                 "[--antithetic] [--record TRAJECTORY] GROUP...\n"
                 "       dopamine_parity_train --replay MODULE TRAJECTORY "
                 "OUT\n";
    return 2;
  }
  torch::jit::Module module = torch::jit::load(argv[1]);
  const int steps = std::atoi(argv[2]);
  std::vector<torch::Tensor> params;
  for (const auto& param : module.parameters()) {
    params.push_back(param);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  size_t first = 0;
  int arg = 4;
  const bool antithetic = std::string(argv[arg]) == "--antithetic";
  arg += antithetic ? 1 : 0;
  std::string record;
  if (arg + 1 < argc && std::string(argv[arg]) == "--record") {
    record = argv[arg + 1];
    arg += 2;
  }
  for (; arg < argc; ++arg) {
    auto [size, options] = parse_group(argv[arg]);
    groups.emplace_back(
        std::vector<torch::Tensor>(params.begin() + first,
                                   params.begin() + first + size),
        std::make_unique<dopamine::DopamineOptions>(
            options.antithetic(antithetic)));
    first += size;
  }
  dopamine::Dopamine optimizer(groups);
  if (!record.empty()) {
    optimizer.record_trajectory();
  }
  for (int step = 0; step < steps; ++step) {
    optimizer.step([&] { return module.forward({}).toTensor(); });
  }
  module.save(argv[3]);
  if (!record.empty()) {
    write_file(record, torch::jit::pickle_save(optimizer.trajectory()));
  }
  std::cout << std::setprecision(17);
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto* state = optimizer.group_state(g);
    std::cout << state->step() << " " << state->skipped_steps() << " "
              << state->rpe_trace() << " " << state->rpe_magnitude() << " "
              << state->current_lr() << " " << state->rpe_baseline() << "\n";
  }
  return 0;
}
