// The CUDA kernels' code, run on the CPU over an emulated grid
// (cuda_emulation.h), against the CPU kernels bit for bit: the launch plan,
// the tile sums in shared memory, the tensor lookup, the offsets of shards,
// the k-direction finish and the capturable steps' device-side reads.
#include <random>

#include "cuda_emulation.h"
#include "ops/cuda/launch.h"
#include "test_utils.h"

namespace dopamine::testing {
namespace {

using ops::GroupEntry;
using ops::KernelTable;

// The same bits, NaN included.
bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  const auto as_int = [](const torch::Tensor& t) {
    switch (t.scalar_type()) {
      case torch::kDouble:
        return t.view(torch::kLong);
      case torch::kFloat:
        return t.view(torch::kInt);
      default:
        return t.view(torch::kShort);
    }
  };
  return a.scalar_type() == b.scalar_type() &&
         torch::equal(as_int(a), as_int(b));
}

// The tensors of a table: parameters and, where defined, master weights.
struct Tensors {
  std::vector<torch::Tensor> params;
  std::vector<torch::Tensor> masters;

  Tensors copy() const {
    Tensors out;
    for (size_t i = 0; i < params.size(); ++i) {
      out.params.push_back(params[i].clone());
      out.masters.push_back(masters[i].defined() ? masters[i].clone()
                                                 : torch::Tensor());
    }
    return out;
  }
};

// A table over `tensors` as the ops make it: parameter i has index 3 + i,
// element offset offsets[i] (0 if absent) and kernel group group_of[i] (the
// ops give tensors with and without a master weight separate groups; the
// cases do too).
struct Case {
  Tensors tensors;
  std::vector<int64_t> offsets;
  std::vector<uint32_t> group_of;
  std::vector<GroupEntry> groups;
  // Per parameter, if not empty: its columns and low-rank factors (undefined
  // for a parameter perturbed in full).
  std::vector<int64_t> cols;
  std::vector<torch::Tensor> factors;

  KernelTable table_over(const Tensors& t) const {
    KernelTable table;
    table.groups = groups;
    for (size_t i = 0; i < t.params.size(); ++i) {
      if (t.params[i].numel() == 0) {
        continue;
      }
      table.tensors.push_back(
          {t.params[i].data_ptr(),
           t.masters[i].defined() ? t.masters[i].data_ptr<float>() : nullptr,
           t.params[i].numel(),
           offsets.empty() ? 0 : offsets[i],
           static_cast<uint32_t>(3 + i),
           group_of.empty() ? 0 : group_of[i],
           t.params[i].scalar_type()});
      if (!factors.empty() && factors[i].defined()) {
        table.tensors.back().cols = cols[i];
        table.tensors.back().rows = t.params[i].numel() / cols[i];
        table.tensors.back().factors = factors[i].data_ptr<float>();
      }
    }
    return table;
  }

  // Adds a parameter of `numel` elements of `dtype` in kernel group `group`,
  // with a master weight if `master`.
  void add(int64_t numel,
           torch::ScalarType dtype,
           uint32_t group = 0,
           bool master = false) {
    const auto values = torch::randn({numel});
    tensors.params.push_back(values.to(dtype));
    tensors.masters.push_back(master ? values.clone() : torch::Tensor());
    group_of.push_back(group);
  }
};

// Runs the CPU kernels and the emulated CUDA ones (`emulated_groups`, if
// given, in place of the case's groups: the device-side reads) on copies of
// the same tensors; expects the same bits, and that the update changed
// something.
void expect_same_bits(
    const Case& c,
    int64_t sms = 4,
    uint64_t order_seed = 1,
    const std::vector<GroupEntry>* emulated_groups = nullptr) {
  Tensors cpu = c.tensors.copy();
  Tensors emulated = c.tensors.copy();
  ops::backend_for(c10::DeviceType::CPU).update(c.table_over(cpu));
  KernelTable table = c.table_over(emulated);
  if (emulated_groups != nullptr) {
    table.groups = *emulated_groups;
  }
  emulate_update(table, sms, order_seed);
  bool changed = false;
  for (size_t i = 0; i < cpu.params.size(); ++i) {
    EXPECT_TRUE(same_bits(cpu.params[i], emulated.params[i]))
        << "params[" << i << "] of " << cpu.params[i].numel() << " "
        << cpu.params[i].scalar_type();
    changed = changed || !same_bits(cpu.params[i], c.tensors.params[i]);
    if (cpu.masters[i].defined()) {
      EXPECT_TRUE(same_bits(cpu.masters[i], emulated.masters[i]))
          << "masters[" << i << "]";
    }
  }
  EXPECT_TRUE(changed) << "the update changed nothing: the test is void";
}

engine::GroupOptions options_of(int64_t directions,
                                bool antithetic,
                                noise::Kind kind = noise::Kind::Gaussian,
                                double sigma = 0.05) {
  engine::GroupOptions o{};
  o.mode = engine::Adaptation::RpeNormalized;
  o.lr = 0.1;
  o.sigma = sigma;
  o.beta = 0.9;
  o.eps = 1e-8;
  o.has_baseline = true;
  o.beta_baseline = 0.8;
  o.key = noise::key_of(11);
  o.noise = kind;
  o.antithetic = antithetic;
  o.directions = directions;
  return o;
}

// A group's state and the plan of a step of `o` from losses that differ by
// direction (NaN among them if `fail`); owns the memory the entries read.
struct Plan {
  std::vector<double> state = {4, 1, 0.3, 0, 0.1, 0.02};
  std::vector<double> plan;
  double taken = 1;

  Plan(const engine::GroupOptions& o, bool fail = false)
      : plan(engine::kPlanHeader + o.directions) {
    std::vector<double> losses(engine::loss_count(o.antithetic, o.directions));
    for (size_t i = 0; i < losses.size(); ++i) {
      losses[i] = 1.0 + 0.01 * static_cast<double>(i * i);
    }
    if (fail) {
      losses.back() = std::nan("");
    }
    engine::plan_group(state.data(), losses.data(), o, plan.data());
  }

  GroupEntry finish(bool has_master, bool on_host = true) const {
    return ops::finish_group(
        plan.data(),
        static_cast<int64_t>(plan.size()) - engine::kPlanHeader,
        &taken,
        has_master,
        on_host);
  }
};

GroupEntry move(const engine::GroupOptions& o,
                const std::vector<double>& state,
                ops::Perturbation carried,
                ops::Perturbation to,
                bool has_master,
                bool on_host = true) {
  return ops::move_group(o, state.data(), carried, to, has_master, on_host);
}

const std::vector<double> kState = {6, 0, 0.2, 0, 0.1, 0.01};

// Low-rank tensors (their factors arbitrary numbers here, the same for both
// kernels) beside one perturbed in full, in a move between directions and a
// three-direction finish, with a master weight: the emulated kernels read
// the factors through the launch's low-rank table as the CPU kernels do.
TEST(CudaEmulation, LowRankTensorsMatchTheCpuKernels) {
  for (const auto kind : {noise::Kind::Gaussian, noise::Kind::Rademacher}) {
    auto o = options_of(3, false, kind);
    o.rank = 2;
    const Plan plan(o);
    for (const bool finish : {false, true}) {
      Case c;
      c.add(7 * 5, torch::kFloat);
      c.add(300 * 6, torch::kBFloat16, 1, true);
      c.add(40, torch::kFloat);
      c.cols = {5, 6, 0};
      // Three directions' factors: 2 (rows + cols) floats each.
      c.factors = {torch::randn({3 * 2 * (7 + 5)}),
                   torch::randn({3 * 2 * (300 + 6)}),
                   torch::Tensor()};
      if (finish) {
        c.groups = {plan.finish(false), plan.finish(true)};
      } else {
        c.groups = {move(o, kState, {1, 0}, {1, 1}, false),
                    move(o, kState, {1, 0}, {1, 1}, true)};
      }
      expect_same_bits(c);
    }
  }
}

TEST(CudaEmulation, LaunchesHoldAHundredTensorsAndThreeGroups) {
  KernelTable table;
  const auto o = options_of(1, false);
  for (uint32_t g = 0; g < 7; ++g) {
    table.groups.push_back(move(o, kState, {0, 0}, {1, g}, false));
  }
  // 300 tensors of group 0, then 2 of each of groups 1..6.
  for (uint32_t i = 0; i < 312; ++i) {
    const uint32_t group = i < 300 ? 0 : 1 + (i - 300) / 2;
    table.tensors.push_back({nullptr, nullptr, 1000, 0, i, group, at::kFloat});
  }
  const auto launches = ops::cuda::plan_launches(table, at::kFloat, 132);
  std::vector<int> sizes;
  for (const auto& launch : launches) {
    sizes.push_back(launch.table.tensors);
    // The blocks cover the launch's tiles, 8 a tensor, exactly.
    const int64_t tiles = 8 * launch.table.tensors;
    EXPECT_EQ(
        launch.blocks,
        (tiles + launch.table.chunk_tiles - 1) / launch.table.chunk_tiles);
  }
  // Tensors 300..311 are 6 groups of 2: 3 groups a launch.
  EXPECT_EQ(sizes, (std::vector<int>{100, 100, 100, 6, 6}));
  EXPECT_TRUE(ops::cuda::plan_launches(table, at::kHalf, 132).empty());
}

TEST(CudaEmulation, TensorsBeyondThirtyTwoBitCountsAreSplitIntoPieces) {
  KernelTable table;
  table.groups.push_back(
      move(options_of(1, false), kState, {0, 0}, {1, 0}, true));
  auto* data = reinterpret_cast<void*>(uintptr_t{1} << 20);
  auto* master = reinterpret_cast<float*>(uintptr_t{1} << 40);
  const int64_t numel = 5 * (int64_t{1} << 29) + 3;  // 2.5 pieces
  table.tensors.push_back({data, master, numel, 77, 9, 0, at::kBFloat16});
  const auto launches = ops::cuda::plan_launches(table, at::kBFloat16, 8);
  ASSERT_EQ(launches.size(), 1u);
  const auto& t = launches[0].table;
  ASSERT_EQ(t.tensors, 3);
  const int64_t piece = ops::cuda::kMaxPieceElements;
  for (int p = 0; p < 3; ++p) {
    EXPECT_EQ(t.data[p], static_cast<char*>(data) + 2 * p * piece);
    EXPECT_EQ(t.master[p], master + p * piece);
    EXPECT_EQ(t.offset[p], 77 + p * piece);
    EXPECT_EQ(t.index[p], 9u);
    EXPECT_EQ(t.group[p], 0);
  }
  EXPECT_EQ(t.numel[0], piece);
  EXPECT_EQ(t.numel[2], numel - 2 * piece);
}

TEST(CudaEmulation, TablesOfOneToThreeHundredTensors) {
  std::mt19937 sizes(5);
  for (const int count : {1, 2, 99, 100, 101, 300}) {
    torch::manual_seed(count);
    Case c;
    c.groups.push_back(
        move(options_of(1, false), kState, {0, 0}, {1, 0}, false));
    for (int i = 0; i < count; ++i) {
      c.add(1 + static_cast<int64_t>(sizes() % 700), torch::kFloat);
    }
    SCOPED_TRACE(count);
    expect_same_bits(c, /*sms=*/3);
  }
}

TEST(CudaEmulation, TensorsOfEdgeSizes) {
  torch::manual_seed(6);
  Case c;
  c.groups.push_back(
      move(options_of(1, false), kState, {1, 2}, {-1, 2}, false));
  for (const int64_t numel : {0, 1, 127, 128, 129, 1000000, 1, 0, 129}) {
    c.add(numel, torch::kFloat);
  }
  expect_same_bits(c, /*sms=*/132);
}

TEST(CudaEmulation, MixedDtypesFinishThreeDirections) {
  torch::manual_seed(7);
  const Plan plan(options_of(3, false));
  Case c;
  c.groups.push_back(plan.finish(false));
  for (int i = 0; i < 12; ++i) {
    for (const auto dtype :
         {torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kDouble}) {
      c.add(50 + 97 * i, dtype);
    }
  }
  expect_same_bits(c);
}

TEST(CudaEmulation, MasterWeightsPerturbedFinishedAndSkipped) {
  const auto o = options_of(2, false);
  Plan taken(o);
  Plan skipped(o);
  skipped.taken = 0;
  for (const auto& entry : {move(o, kState, {0, 0}, {1, 1}, true),
                            taken.finish(true),
                            skipped.finish(true)}) {
    torch::manual_seed(8);
    Case c;
    // Group 0 (no master) and group 1 (master), as the ops split them.
    c.groups = {move(o, kState, {1, 0}, {1, 1}, false), entry};
    for (int i = 0; i < 9; ++i) {
      c.add(300 + 41 * i, i % 2 ? torch::kHalf : torch::kBFloat16, 1, true);
      c.add(70, torch::kFloat, 0, false);
    }
    expect_same_bits(c);
  }
}

TEST(CudaEmulation, OneAndThreeDirectionsBothNoisesAntithetic) {
  for (const int64_t k : {1, 3}) {
    for (const bool antithetic : {false, true}) {
      for (const auto kind : {noise::Kind::Gaussian, noise::Kind::Rademacher}) {
        torch::manual_seed(9);
        const auto o = options_of(k, antithetic, kind);
        const Plan plan(o);
        Case c;
        c.groups = {plan.finish(false),
                    move(o, kState, {antithetic ? -1 : 1, 0}, {0, 0}, false),
                    move(o, kState, {antithetic ? -1 : 1, 0}, {1, 1}, false)};
        for (int i = 0; i < 20; ++i) {
          c.add(1 + 333 * i, torch::kFloat, static_cast<uint32_t>(i % 3));
        }
        SCOPED_TRACE(::testing::Message()
                     << "k " << k << " antithetic " << antithetic << " noise "
                     << static_cast<int>(kind));
        expect_same_bits(c);
      }
    }
  }
}

TEST(CudaEmulation, ShardsWithElementOffsets) {
  torch::manual_seed(10);
  const Plan plan(options_of(3, false));
  Case c;
  c.groups.push_back(plan.finish(false));
  const std::vector<int64_t> offsets = {
      0, 5, 127, 128, 129, 1000003, (int64_t{1} << 40) + 3, 64};
  for (size_t i = 0; i < offsets.size(); ++i) {
    c.add(1 + 211 * static_cast<int64_t>(i), torch::kFloat);
  }
  c.offsets = offsets;
  expect_same_bits(c);
}

TEST(CudaEmulation, FailedStepsUndoThePerturbationOnly) {
  // A NaN loss: the plan is not finite, so settle skips the step and the
  // finish only removes the perturbation.
  const auto o = options_of(3, false);
  Plan failed(o, /*fail=*/true);
  ASSERT_EQ(failed.plan[engine::kFinite], 0);
  std::vector<double> state = failed.state;
  failed.taken = emulate_settle({state.data()}, {failed.plan.data()});
  ASSERT_EQ(failed.taken, 0);
  torch::manual_seed(11);
  Case c;
  c.groups = {failed.finish(false), failed.finish(true)};
  for (int i = 0; i < 10; ++i) {
    c.add(500 + i,
          i % 2 ? torch::kFloat : torch::kBFloat16,
          i % 2 ? 0 : 1,
          i % 2 == 0);
  }
  expect_same_bits(c);
}

TEST(CudaEmulation, SettleCommitsLikeTheCpuKernel) {
  for (const bool fail : {false, true}) {
    const auto o = options_of(2, false);
    const Plan a(o);
    const Plan b(o, fail);
    const std::vector<torch::Tensor> states = {
        torch::tensor(a.state, torch::kDouble),
        torch::tensor(b.state, torch::kDouble)};
    const std::vector<torch::Tensor> plans = {
        torch::tensor(a.plan, torch::kDouble),
        torch::tensor(b.plan, torch::kDouble)};
    const double cpu_taken = ops::backend_for(c10::DeviceType::CPU)
                                 .settle(states, plans)
                                 .item<double>();
    std::vector<double> state_a = a.state;
    std::vector<double> state_b = b.state;
    const double taken = emulate_settle({state_a.data(), state_b.data()},
                                        {a.plan.data(), b.plan.data()});
    EXPECT_EQ(taken, fail ? 0 : 1);
    EXPECT_EQ(taken, cpu_taken);
    EXPECT_TRUE(same_bits(torch::tensor(state_a, torch::kDouble), states[0]));
    EXPECT_TRUE(same_bits(torch::tensor(state_b, torch::kDouble), states[1]));
  }
}

TEST(CudaEmulation, CapturableStepsReadTheirStepOnTheDevice) {
  // The kernels resolve each group's step from the state, plan and `taken`
  // in device memory (here host memory) as the host would.
  const auto o = options_of(3, true);
  const Plan plan(o);
  Plan skipped(o);
  skipped.taken = 0;
  torch::manual_seed(12);
  Case c;
  c.groups = {plan.finish(false),
              plan.finish(true),
              skipped.finish(false),
              move(o, kState, {-1, 1}, {1, 2}, false)};
  const std::vector<GroupEntry> on_device = {
      plan.finish(false, false),
      plan.finish(true, false),
      skipped.finish(false, false),
      move(o, kState, {-1, 1}, {1, 2}, false, false)};
  for (int i = 0; i < 16; ++i) {
    c.add(100 + 37 * i,
          i % 4 == 1 ? torch::kHalf : torch::kFloat,
          static_cast<uint32_t>(i % 4),
          i % 4 == 1);
  }
  expect_same_bits(c, 4, 1, &on_device);
}

TEST(CudaEmulation, BlockAndThreadOrderDoNotChangeTheBits) {
  const Plan plan(options_of(3, false));
  torch::manual_seed(13);
  Case c;
  c.groups = {plan.finish(false)};
  for (int i = 0; i < 40; ++i) {
    c.add(1 + 977 * i, torch::kFloat);
  }
  for (const uint64_t seed : {2, 3, 4}) {
    for (const int64_t sms : {1, 7, 132}) {
      SCOPED_TRACE(::testing::Message() << "seed " << seed << " sms " << sms);
      expect_same_bits(c, sms, seed);
    }
  }
}

TEST(CudaEmulation, SevenGroupsSpanSeveralLaunches) {
  torch::manual_seed(14);
  std::vector<Plan> plans;
  for (int g = 0; g < 7; ++g) {
    plans.emplace_back(
        options_of(1 + g % 3, false, noise::Kind::Gaussian, 0.01 * (g + 1)));
  }
  Case c;
  for (int g = 0; g < 7; ++g) {
    c.groups.push_back(plans[g].finish(false));
    for (int i = 0; i < 5; ++i) {
      c.add(129 * (i + 1), torch::kFloat, g);
    }
  }
  expect_same_bits(c);
}

// The optimizer's ops with the CPU backend's update replaced by the
// emulated CUDA kernels: the tables the ops build, end to end.
TEST(CudaEmulation, OptimizerStepsThroughTheEmulatedKernels) {
  const ops::Backend cpu = ops::backend_for(c10::DeviceType::CPU);
  ops::Backend emulated = cpu;
  emulated.update = [](const KernelTable& table) {
    emulate_update(table, 5, 17);
  };
  // Restores the CPU kernels however the test ends.
  struct Restore {
    ops::Backend cpu;
    ~Restore() {
      ops::register_backend(c10::DeviceType::CPU, cpu);
    }
  } restore{cpu};
  const auto train = [](const ops::Backend& backend) {
    torch::manual_seed(15);
    std::vector<torch::Tensor> params = {
        torch::randn({300}).to(torch::kBFloat16).requires_grad_(),
        torch::randn({129}).requires_grad_(),
        torch::randn({0}).requires_grad_()};
    ops::register_backend(c10::DeviceType::CPU, backend);
    Dopamine optimizer(params,
                       DopamineOptions(0.05)
                           .master_weights(true)
                           .num_perturbations(3)
                           .weight_decay(0.01));
    for (int t = 0; t < 6; ++t) {
      optimizer.step([&] {
        return (params[0].to(torch::kFloat).square().sum() +
                params[1].sin().sum())
            .to(torch::kFloat);
      });
    }
    return params;
  };
  const auto reference = train(cpu);
  const auto through_emulation = train(emulated);
  for (size_t i = 0; i < reference.size(); ++i) {
    EXPECT_TRUE(same_bits(reference[i].detach(), through_emulation[i].detach()))
        << i;
  }
}

}  // namespace
}  // namespace dopamine::testing
