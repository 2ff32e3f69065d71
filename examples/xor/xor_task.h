#pragma once

// XOR, the paper's first task: a 2-4-1 MLP (tanh hidden layer, sigmoid
// output) trained on the four points with full-batch MSE.
#include <torch/torch.h>

struct XorNetImpl : torch::nn::Module {
  XorNetImpl()
      : hidden(register_module("hidden", torch::nn::Linear(2, 4))),
        output(register_module("output", torch::nn::Linear(4, 1))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    return torch::sigmoid(output(torch::tanh(hidden(x))));
  }

  torch::nn::Linear hidden;
  torch::nn::Linear output;
};
TORCH_MODULE(XorNet);

inline torch::Tensor xor_inputs() {
  return torch::tensor({{0.f, 0.f}, {0.f, 1.f}, {1.f, 0.f}, {1.f, 1.f}});
}

inline torch::Tensor xor_targets() {
  return torch::tensor({{0.f}, {1.f}, {1.f}, {0.f}});
}

// The XOR net of seed `seed`: torch's default Linear initialisation drawn
// from the global generator seeded with it.
inline XorNet make_xor_net(uint64_t seed) {
  torch::manual_seed(seed);
  return XorNet();
}
