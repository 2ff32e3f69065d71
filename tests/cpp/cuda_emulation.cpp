// The emulated grid of cuda_emulation.h.
#include "cuda_emulation.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "ops/cuda/launch.h"

namespace dopamine::testing {

void emulate_update(const ops::KernelTable& table,
                    int64_t sms,
                    uint64_t order_seed) {
  std::mt19937_64 order(order_seed);
  std::vector<int> threads(ops::cuda::kThreads);
  std::iota(threads.begin(), threads.end(), 0);
  ops::cuda::for_each_launch(
      table, sms, [&](const ops::cuda::Launch& launch, auto zero) {
        using scalar_t = decltype(zero);
        ops::cuda::LaunchTable arguments = launch.table;
        if (!launch.lowrank.empty()) {
          arguments.lowrank = launch.lowrank.data();
        }
        std::vector<int64_t> blocks(launch.blocks);
        std::iota(blocks.begin(), blocks.end(), 0);
        std::shuffle(blocks.begin(), blocks.end(), order);
        for (const int64_t block : blocks) {
          ops::cuda::BlockShared shared;
          std::memset(&shared, 0xA5, sizeof(shared));
          for (int phase = 0; phase < ops::cuda::kUpdatePhases; ++phase) {
            std::shuffle(threads.begin(), threads.end(), order);
            for (const int thread : threads) {
              ops::cuda::update_phase<scalar_t>(
                  phase, arguments, block, thread, ops::cuda::kThreads, shared);
            }
          }
        }
      });
}

double emulate_settle(const std::vector<double*>& states,
                      const std::vector<const double*>& plans) {
  ops::cuda::SettleTable groups{};
  groups.count = static_cast<int>(states.size());
  std::copy(states.begin(), states.end(), groups.states);
  std::copy(plans.begin(), plans.end(), groups.plans);
  double taken = -1;
  ops::cuda::settle_groups(groups, &taken);
  return taken;
}

}  // namespace dopamine::testing
