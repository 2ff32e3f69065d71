// Data parallel over c10d (docs/DESIGN.md, "Many processes"): each test runs
// as rank 0 and starts this executable again, filtered to the same test, as
// rank 1; both ranks make the test's assertions, and rank 0 fails when rank 1
// does or outlives the time limit.
#include <dopamine/distributed.h>
#include <dopamine/dopamine.h>
#include <gtest/gtest.h>

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "distributed/gloo_group.h"

extern char** environ;

namespace {

constexpr int kWorldSize = 2;
constexpr int kRows = 16;
constexpr auto kTimeout = std::chrono::seconds(60);

// A small regression in float64: the whole batch, and a rank's shard.
struct Regression {
  torch::Tensor x =
      torch::linspace(-1, 1, kRows * 3, torch::kDouble).reshape({kRows, 3});
  torch::Tensor y = torch::sin(x.sum(1, true));

  std::vector<torch::Tensor> params() const {
    return {torch::full({1, 3}, 0.1, torch::kDouble).requires_grad_(),
            torch::zeros({1}, torch::kDouble).requires_grad_()};
  }
  torch::Tensor loss(const std::vector<torch::Tensor>& p,
                     int64_t begin,
                     int64_t end) const {
    const auto rows = torch::indexing::Slice(begin, end);
    return (torch::tanh(x.index({rows}).matmul(p[0].t()) + p[1]) -
            y.index({rows}))
        .pow(2)
        .mean();
  }
};

std::vector<torch::Tensor> copies(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  for (const auto& p : params) {
    out.push_back(p.detach().clone());
  }
  return out;
}

class DataParallel : public ::testing::Test {
 protected:
  int rank = 0;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  pid_t child = -1;
  Regression task;

  void SetUp() override {
    const char* given = std::getenv("DOPAMINE_TEST_RANK");
    std::string store;
    if (given == nullptr) {
      const auto* test =
          ::testing::UnitTest::GetInstance()->current_test_info();
      store =
          "/tmp/dopamine_dp_" + std::to_string(getpid()) + "_" + test->name();
      std::remove(store.c_str());
      const std::string filter = std::string("--gtest_filter=") +
                                 test->test_suite_name() + "." + test->name();
      const std::string rank_env = "DOPAMINE_TEST_RANK=1";
      const std::string store_env = "DOPAMINE_TEST_STORE=" + store;
      std::vector<char*> env;
      for (char** e = environ; *e != nullptr; ++e) {
        env.push_back(*e);
      }
      env.push_back(const_cast<char*>(rank_env.c_str()));
      env.push_back(const_cast<char*>(store_env.c_str()));
      env.push_back(nullptr);
      char self[] = "/proc/self/exe";
      char* argv[] = {self, const_cast<char*>(filter.c_str()), nullptr};
      ASSERT_EQ(posix_spawn(&child, self, nullptr, nullptr, argv, env.data()),
                0);
    } else {
      rank = std::atoi(given);
      store = std::getenv("DOPAMINE_TEST_STORE");
    }
    group =
        make_gloo_group(c10::make_intrusive<c10d::FileStore>(store, kWorldSize),
                        rank,
                        kWorldSize,
                        kTimeout);
  }

  void TearDown() override {
    group.reset();
    if (child <= 0) {
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + kTimeout;
    int status = 0;
    while (waitpid(child, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        FAIL() << "rank 1 did not finish in time";
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "rank 1 failed (its output is above)";
  }

  // This rank's shard of the batch.
  torch::Tensor shard_loss(const std::vector<torch::Tensor>& params) const {
    const int64_t size = kRows / kWorldSize;
    return task.loss(params, rank * size, (rank + 1) * size);
  }

  // Whether every rank holds these bits.
  bool ranks_agree(const std::vector<torch::Tensor>& tensors) {
    std::vector<torch::Tensor> mine{
        torch::tensor({dopamine::ops::digest(tensors)}, torch::kInt64)};
    std::vector<std::vector<torch::Tensor>> all(1);
    for (int r = 0; r < kWorldSize; ++r) {
      all[0].push_back(torch::empty_like(mine[0]));
    }
    group->allgather(all, mine)->wait();
    return all[0][0].equal(all[0][1]);
  }
};

TEST_F(DataParallel, RanksAgreeAndMatchOneProcessOnTheBatch) {
  for (const bool antithetic : {false, true}) {
    const auto options =
        dopamine::DopamineOptions(0.05).sigma(1e-3).antithetic(antithetic);
    auto params = task.params();
    dopamine::Dopamine optimizer(params, options);
    dopamine::make_parallel(optimizer, group);
    auto whole = task.params();
    dopamine::Dopamine single(whole, options);
    for (int step = 0; step < 12; ++step) {
      const auto mean =
          optimizer.step([&] { return shard_loss(params); }).item<double>();
      const auto expected =
          single.step([&] { return task.loss(whole, 0, kRows); })
              .item<double>();
      EXPECT_NEAR(mean, expected, 1e-12 * std::abs(expected));
    }
    EXPECT_TRUE(ranks_agree(params));
    // Within the rounding of the loss's reduction (a mean of shard means).
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(torch::allclose(params[i], whole[i], 1e-9, 1e-12));
    }
    EXPECT_EQ(optimizer.group_state(0)->step(), 12);
  }
}

// Population parallel: every rank evaluates the whole batch, rank 0 the
// unperturbed loss and rank r the directions r, r + W, ...; each loss is
// the one rank's, so the run is one process's, bit for bit, and every rank
// evaluates only its share.
TEST_F(DataParallel, PopulationRanksMatchOneProcessBitForBit) {
  for (const bool antithetic : {false, true}) {
    const auto options = dopamine::DopamineOptions(0.05)
                             .sigma(1e-3)
                             .antithetic(antithetic)
                             .num_perturbations(4);
    auto params = task.params();
    dopamine::Dopamine optimizer(params, options);
    dopamine::make_parallel(
        optimizer,
        group,
        dopamine::ParallelOptions().parallel(dopamine::Parallel::Population));
    auto whole = task.params();
    dopamine::Dopamine single(whole, options);
    int calls = 0;
    for (int step = 0; step < 6; ++step) {
      const auto shared = optimizer.step([&] {
        ++calls;
        return task.loss(params, 0, kRows);
      });
      const auto expected =
          single.step([&] { return task.loss(whole, 0, kRows); });
      EXPECT_TRUE(shared.equal(expected));
    }
    EXPECT_TRUE(ranks_agree(params));
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(params[i].equal(whole[i]));
    }
    // Four directions on two ranks: 2 (antithetic: 4) evaluations a step,
    // and rank 0 the unperturbed one too.
    EXPECT_EQ(calls, 6 * (antithetic ? 4 : 2 + (rank == 0)));
  }
  auto params = task.params();
  dopamine::Dopamine odd(params,
                         dopamine::DopamineOptions().num_perturbations(3));
  try {
    dopamine::make_parallel(
        odd,
        group,
        dopamine::ParallelOptions().parallel(dopamine::Parallel::Population));
    ADD_FAILURE() << "3 directions cannot be shared by 2 ranks";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what_without_backtrace())
                  .find("invalid num_perturbations: 3 with "
                        "Parallel::Population (expected a multiple of the "
                        "process group's 2 ranks"),
              std::string::npos)
        << error.what_without_backtrace();
  }
}

TEST_F(DataParallel, AClosureFailingOnOneRankThrowsOnEveryRankAndRestores) {
  for (const bool antithetic : {false, true}) {
    for (const int failing_call : {1, 2}) {
      auto params = task.params();
      // With two directions the failure is followed by evaluations that
      // the failing rank still moves through.
      dopamine::Dopamine optimizer(params,
                                   dopamine::DopamineOptions(0.05)
                                       .sigma(0.3)
                                       .antithetic(antithetic)
                                       .num_perturbations(2));
      dopamine::make_parallel(optimizer, group);
      optimizer.step([&] { return shard_loss(params); });
      const auto before = copies(params);
      int calls = 0;
      try {
        optimizer.step([&] {
          TORCH_CHECK(!(rank == 1 && ++calls == failing_call),
                      "the data loader failed");
          return shard_loss(params);
        });
        ADD_FAILURE() << "no rank may complete the step";
      } catch (const c10::Error& error) {
        const std::string message = error.what_without_backtrace();
        EXPECT_NE(message.find("the closure failed on rank 1: the data loader "
                               "failed"),
                  std::string::npos)
            << message;
      }
      // Within the round trips, and the same bits on every rank: the
      // failing rank moved through every perturbation the others did.
      for (size_t i = 0; i < params.size(); ++i) {
        EXPECT_TRUE(torch::allclose(params[i], before[i], 0, 1e-15));
      }
      EXPECT_TRUE(ranks_agree(params));
      EXPECT_EQ(optimizer.group_state(0)->step(), 1);
      optimizer.step([&] { return shard_loss(params); });
      EXPECT_TRUE(ranks_agree(params));
    }
  }
}

TEST_F(DataParallel, ANonFiniteLossOnOneRankSkipsTheStepOnEveryRank) {
  auto params = task.params();
  dopamine::Dopamine optimizer(params, dopamine::DopamineOptions().sigma(1e-3));
  dopamine::make_parallel(optimizer, group);
  int calls = 0;
  optimizer.step([&] {
    return rank == 1 && ++calls == 2
               ? torch::tensor(std::nan(""), torch::kDouble)
               : shard_loss(params);
  });
  EXPECT_EQ(optimizer.group_state(0)->skipped_steps(), 1);
  EXPECT_TRUE(ranks_agree(params));
}

TEST_F(DataParallel, WithNothingToTrainAFailingClosureMakesNoCollective) {
  auto frozen = task.params();
  for (auto& p : frozen) {
    p.requires_grad_(false);
  }
  dopamine::Dopamine idle(frozen);
  dopamine::make_parallel(idle, group);
  if (rank == 1) {
    EXPECT_THROW(idle.step([]() -> torch::Tensor {
      throw std::runtime_error("the data loader failed");
    }),
                 std::runtime_error);
  } else {
    idle.step([&] { return shard_loss(frozen); });
  }
  // The ranks' next collectives still pair up.
  auto params = task.params();
  dopamine::Dopamine optimizer(params);
  dopamine::make_parallel(optimizer, group);
  optimizer.step([&] { return shard_loss(params); });
  EXPECT_TRUE(ranks_agree(params));
}

TEST_F(DataParallel, RanksBuiltApartAreRefusedOnEveryRank) {
  const auto refused_with = [&](dopamine::Dopamine& optimizer,
                                dopamine::ParallelOptions options) {
    try {
      dopamine::make_parallel(optimizer, group, options);
    } catch (const c10::Error& error) {
      return std::string(error.what_without_backtrace());
    }
    return std::string();
  };
  const auto refused = [&](dopamine::Dopamine& optimizer) {
    return refused_with(optimizer, {});
  };
  auto params = task.params();
  dopamine::Dopamine seeded(params, dopamine::DopamineOptions().seed(rank));
  EXPECT_NE(
      refused(seeded).find("rank 1 of the process group was built "
                           "differently from rank 0 (its options differ)"),
      std::string::npos);
  auto apart = task.params();
  apart[1].detach().add_(rank * 1e-12);
  dopamine::Dopamine shifted(apart);
  EXPECT_NE(refused(shifted).find("(its parameter values differ)"),
            std::string::npos);
  dopamine::Dopamine checked(params);
  EXPECT_NE(
      refused_with(checked, dopamine::ParallelOptions().verify_every(rank))
          .find("(its verify_every differ)"),
      std::string::npos);
  // One rank refuses its arguments; the others are told, not left waiting.
  dopamine::Dopamine capturable(
      params, dopamine::DopamineOptions().capturable(rank == 1));
  const auto message = refused(capturable);
  EXPECT_NE(message.find(rank == 1 ? "capturable with a process group"
                                   : "rank 1 refused its arguments (Dopamine: "
                                     "capturable with a process group"),
            std::string::npos)
      << message;
}

TEST_F(DataParallel, VerifyEveryFindsRanksThatDriftedApart) {
  auto params = task.params();
  dopamine::Dopamine optimizer(params, dopamine::DopamineOptions().sigma(1e-3));
  dopamine::make_parallel(
      optimizer, group, dopamine::ParallelOptions().verify_every(2));
  optimizer.step([&] { return shard_loss(params); });
  optimizer.step([&] { return shard_loss(params); });
  params[0].detach().add_(rank * 1e-12);
  optimizer.step([&] { return shard_loss(params); });
  try {
    optimizer.step([&] { return shard_loss(params); });
    ADD_FAILURE() << "step 4 must find the drift";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what_without_backtrace())
                  .find("after step 4 the parameters of rank(s) 1 differ"),
              std::string::npos);
  }
}

}  // namespace
