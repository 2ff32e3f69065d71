// Trains the XOR MLP with Dopamine: forward passes only, no gradients.
//   xor_train [seed]
#include <dopamine/dopamine.h>

#include <cstdlib>
#include <iostream>

#include "xor_task.h"

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 0;
  auto net = make_xor_net(seed);
  const auto inputs = xor_inputs();
  const auto targets = xor_targets();

  dopamine::Dopamine optimizer(
      net->parameters(), dopamine::DopamineOptions(0.1).sigma(0.01).seed(seed));
  auto closure = [&] { return torch::mse_loss(net->forward(inputs), targets); };

  for (int step = 1; step <= 2000; ++step) {
    const double loss = optimizer.step(closure).item<double>();
    if (step % 100 == 0 || loss < 0.01) {
      std::cout << "step " << step << "  loss " << loss << "\n";
    }
    if (loss < 0.01) {
      std::cout << "solved in " << step << " steps\n";
      torch::NoGradGuard no_grad;
      std::cout << "predictions:\n" << net->forward(inputs) << "\n";
      return 0;
    }
  }
  std::cout << "not solved in 2000 steps\n";
  return 1;
}
