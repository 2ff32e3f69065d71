// Trains a TorchScript module on XOR with Dopamine (lr 0.1, sigma 0.01).
//   train_torchscript [module.pt|-] [steps] [trained.pt]
// With a path, the module is loaded with torch::jit::load (one saved by
// torch.jit.save in Python works); it must map a [4, 2] float tensor to
// [4, 1]. With "-", the XOR MLP is defined in C++ with define(). With a third
// argument, the trained module is saved there.
#include <dopamine/dopamine.h>

#include <cstdlib>
#include <iostream>

#include "scripted_xor.h"

int main(int argc, char** argv) {
  torch::jit::Module module = argc > 1 && std::string(argv[1]) != "-"
                                  ? torch::jit::load(argv[1])
                                  : scripted_xor_net(make_xor_net(0));
  const int steps = argc > 2 ? std::atoi(argv[2]) : 2000;
  const auto inputs = xor_inputs();
  const auto targets = xor_targets();

  dopamine::Dopamine optimizer(parameters_of(module),
                               dopamine::DopamineOptions(0.1).sigma(0.01));
  auto closure = [&] {
    return torch::mse_loss(module.forward({inputs}).toTensor(), targets);
  };

  double first = 0, loss = 0;
  for (int step = 1; step <= steps; ++step) {
    loss = optimizer.step(closure).item<double>();
    if (step == 1) {
      first = loss;
    }
    if (step % 200 == 0) {
      std::cout << "step " << step << "  loss " << loss << "\n";
    }
  }
  std::cout << "loss " << first << " -> " << loss << "\n";
  if (argc > 3) {
    module.save(argv[3]);
  }
  return loss < first ? 0 : 1;
}
