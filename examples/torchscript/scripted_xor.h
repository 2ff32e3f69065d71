#pragma once

// The XOR MLP as a TorchScript module, built in C++ with define(). It computes
// exactly what XorNet computes (aten::linear, tanh, sigmoid). Its parameters
// require grad, as a module's do: Dopamine leaves the others untouched.
#include <torch/script.h>

#include "xor/xor_task.h"

inline torch::jit::Module scripted_xor_net(const XorNet& net) {
  torch::jit::Module module("ScriptedXorNet");
  torch::NoGradGuard no_grad;
  module.register_parameter(
      "w1", net->hidden->weight.clone().requires_grad_(), false);
  module.register_parameter(
      "b1", net->hidden->bias.clone().requires_grad_(), false);
  module.register_parameter(
      "w2", net->output->weight.clone().requires_grad_(), false);
  module.register_parameter(
      "b2", net->output->bias.clone().requires_grad_(), false);
  module.define(R"(
def forward(self, x):
    hidden = torch.tanh(torch.linear(x, self.w1, self.b1))
    return torch.sigmoid(torch.linear(hidden, self.w2, self.b2))
)");
  return module;
}

inline std::vector<torch::Tensor> parameters_of(const torch::jit::Module& m) {
  std::vector<torch::Tensor> params;
  for (const auto& param : m.parameters()) {
    params.push_back(param);
  }
  return params;
}
