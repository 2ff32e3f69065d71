// Data-parallel XOR over gloo: each rank holds the four points' share of
// its rank and the same net; a step exchanges 24 bytes of losses and the
// ranks stay bit-identical (docs/DESIGN.md, "Many processes"). Launch with
//   torchrun --standalone --nproc_per_node=2 --no-python ./data_parallel
// or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself.
#include <dopamine/distributed.h>
#include <dopamine/dopamine.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>

#include "distributed/gloo_group.h"
#include "xor/xor_task.h"

namespace {

std::string environment(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : fallback;
}

}  // namespace

int main() {
  const int rank = std::stoi(environment("RANK", "0"));
  const int size = std::stoi(environment("WORLD_SIZE", "1"));
  c10d::TCPStoreOptions store_options;
  store_options.port =
      static_cast<uint16_t>(std::stoi(environment("MASTER_PORT", "29500")));
  // Under torchrun its agent already serves the store.
  store_options.isServer =
      rank == 0 && environment("TORCHELASTIC_USE_AGENT_STORE", "") != "True";
  store_options.numWorkers = size;
  auto store = c10::make_intrusive<c10d::PrefixStore>(
      "dopamine_data_parallel",
      c10::make_intrusive<c10d::TCPStore>(
          environment("MASTER_ADDR", "127.0.0.1"), store_options));
  auto group = make_gloo_group(store, rank, size, std::chrono::seconds(60));

  // The same net on every rank (make_parallel checks it), and this
  // rank's share of the four points.
  auto net = make_xor_net(0);
  const auto rows = torch::arange(rank, 4, size);
  const auto inputs = xor_inputs().index_select(0, rows);
  const auto targets = xor_targets().index_select(0, rows);

  dopamine::Dopamine optimizer(net->parameters(),
                               dopamine::DopamineOptions(0.1).sigma(0.01));
  dopamine::make_parallel(
      optimizer, group, dopamine::ParallelOptions().verify_every(500));
  auto closure = [&] { return torch::mse_loss(net->forward(inputs), targets); };
  for (int step = 1; step <= 2000; ++step) {
    // The mean over the ranks: the same on every rank.
    const double loss = optimizer.step(closure).item<double>();
    if (loss < 0.01) {
      if (rank == 0) {
        std::cout << "solved in " << step << " steps on " << size << " ranks\n";
      }
      return 0;
    }
  }
  if (rank == 0) {
    std::cout << "not solved in 2000 steps\n";
  }
  return 1;
}
