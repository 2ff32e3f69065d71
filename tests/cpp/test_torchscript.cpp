// Dopamine trains TorchScript modules: one defined in C++ with define(), and
// one saved and loaded back with torch::jit::load.
#include <filesystem>

#include "test_utils.h"
#include "torchscript/scripted_xor.h"

namespace dopamine::testing {
namespace {

std::vector<torch::Tensor> train(const std::function<torch::Tensor()>& forward,
                                 const std::vector<torch::Tensor>& params,
                                 int steps,
                                 double* final_loss) {
  const auto targets = xor_targets();
  Dopamine optimizer(params, DopamineOptions().seed(12));
  auto closure = [&] { return torch::mse_loss(forward(), targets); };
  for (int i = 0; i < steps; ++i) {
    *final_loss = optimizer.step(closure).item<double>();
  }
  return clones(params);
}

TEST(TorchScript, DefinedModuleTrainsExactlyLikeTheCppModule) {
  auto net = make_xor_net(3);
  auto scripted = scripted_xor_net(net);
  const auto inputs = xor_inputs();
  double cpp_loss = 0, script_loss = 0;
  const double initial =
      torch::mse_loss(net->forward(inputs), xor_targets()).item<double>();
  const auto cpp = train(
      [&] { return net->forward(inputs); }, net->parameters(), 600, &cpp_loss);
  const auto script =
      train([&] { return scripted.forward({inputs}).toTensor(); },
            parameters_of(scripted),
            600,
            &script_loss);
  EXPECT_TRUE(bitwise_equal(cpp, script));
  EXPECT_EQ(cpp_loss, script_loss);
  EXPECT_LT(script_loss, initial / 2);
}

TEST(TorchScript, LoadedModuleTrains) {
  const auto path =
      (std::filesystem::temp_directory_path() /
       ("dopamine_scripted_" + std::to_string(::getpid()) + ".pt"))
          .string();
  auto in_memory = scripted_xor_net(make_xor_net(5));
  in_memory.save(path);
  auto loaded = torch::jit::load(path);
  std::filesystem::remove(path);
  const auto inputs = xor_inputs();
  const double initial =
      torch::mse_loss(loaded.forward({inputs}).toTensor(), xor_targets())
          .item<double>();
  double loaded_loss = 0, in_memory_loss = 0;
  const auto trained =
      train([&] { return loaded.forward({inputs}).toTensor(); },
            parameters_of(loaded),
            300,
            &loaded_loss);
  const auto reference =
      train([&] { return in_memory.forward({inputs}).toTensor(); },
            parameters_of(in_memory),
            300,
            &in_memory_loss);
  EXPECT_TRUE(bitwise_equal(trained, reference));
  EXPECT_LT(loaded_loss, initial / 2);
}

}  // namespace
}  // namespace dopamine::testing
