#include <dopamine/distributed.h>
#include <dopamine/ops.h>

#include <torch/types.h>

#include <c10/util/irange.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace dopamine {
namespace {

// What the ranks compare before the first step, mostly as digests: a
// difference names its kind.
constexpr const char* kConfigurationParts[] = {
    "parallel mode",
    "verify_every",
    "number of parameter groups",
    "options",
    "parameter shapes, dtypes or requires_grad",
    "parameter values"};
constexpr int64_t kConfigurationSize = 6;
// The longest error message one rank sends the others.
constexpr int64_t kMessageBytes = 1024;

int64_t bits_of(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

std::vector<int64_t> configuration(const Dopamine& optimizer,
                                   const ParallelOptions& parallel) {
  std::vector<int64_t> options, layout;
  std::vector<torch::Tensor> params;
  const auto& defaults =
      static_cast<const DopamineOptions&>(optimizer.defaults());
  for (const auto& group : optimizer.param_groups()) {
    for (const double value : ops::pack_options(
             static_cast<const DopamineOptions&>(group.options()))) {
      options.push_back(bits_of(value));
    }
    layout.push_back(static_cast<int64_t>(group.params().size()));
    for (const auto& param : group.params()) {
      layout.push_back(static_cast<int64_t>(param.scalar_type()));
      layout.push_back(param.requires_grad());
      layout.push_back(param.dim());
      layout.insert(layout.end(), param.sizes().begin(), param.sizes().end());
      params.push_back(param);
    }
  }
  // Read from the defaults, since a step spans all groups.
  for (const double value : ops::pack_options(defaults)) {
    options.push_back(bits_of(value));
  }
  const auto digest_of = [](const std::vector<int64_t>& words) {
    return ops::digest({torch::tensor(words, torch::kInt64)});
  };
  return {static_cast<int64_t>(parallel.parallel()),
          parallel.verify_every(),
          static_cast<int64_t>(optimizer.param_groups().size()),
          digest_of(options),
          digest_of(layout),
          ops::digest(params)};
}

// Why the ranks cannot share a step of `num_perturbations` directions, or
// an empty string.
std::string refusal(Parallel parallel,
                    int64_t num_perturbations,
                    int64_t world_size) {
  if (parallel != Parallel::Population || num_perturbations % world_size == 0) {
    return "";
  }
  return "Dopamine: invalid num_perturbations: " +
         std::to_string(num_perturbations) +
         " with Parallel::Population (expected a multiple of the process "
         "group's " +
         std::to_string(world_size) +
         " ranks, each evaluating as many directions; the default is 4)";
}

class ProcessGroupCollective : public StepCollective {
 public:
  ProcessGroupCollective(c10::intrusive_ptr<c10d::ProcessGroup> group,
                         ParallelOptions options)
      : group_(std::move(group)),
        parallel_(options.parallel()),
        verify_every_(options.verify_every()),
        // NCCL reduces only CUDA tensors; gloo (and others) take CPU ones.
        device_(group_->getBackendName() == "nccl"
                    ? torch::Device(torch::kCUDA)
                    : torch::Device(torch::kCPU)) {}

  // Every rank's `words`, gathered (one row per rank, on the CPU).
  torch::Tensor all_gather(const torch::Tensor& words) {
    std::vector<torch::Tensor> input{words.to(device_)};
    std::vector<std::vector<torch::Tensor>> output(1);
    for (int rank = 0; rank < group_->getSize(); ++rank) {
      output[0].push_back(torch::empty_like(input[0]));
    }
    group_->allgather(output, input)->wait();
    return torch::stack(output[0]).cpu();
  }

  torch::Tensor all_gather(const std::vector<int64_t>& words) {
    return all_gather(torch::tensor(words, torch::kInt64));
  }

  // Every rank's message (empty where a rank has none), from one all-gather
  // of kMessageBytes each; longer ones are cut.
  std::vector<std::string> all_gather(const std::string& message) {
    auto bytes = torch::zeros({kMessageBytes}, torch::kUInt8);
    std::memcpy(bytes.data_ptr(),
                message.data(),
                std::min<size_t>(message.size(), kMessageBytes - 1));
    const auto gathered = all_gather(bytes);
    std::vector<std::string> messages;
    for (const auto rank : c10::irange(gathered.size(0))) {
      messages.emplace_back(
          static_cast<const char*>(gathered[rank].data_ptr()));
    }
    return messages;
  }

  // The all-reduce of [losses..., failed] that every step makes; a rank
  // whose evaluation failed passes no losses. The sum has the same bits on
  // every rank, so the ranks agree on whether to fail, and the mean is the
  // same on every rank.
  torch::Tensor sum(const torch::Tensor& losses, int64_t loss_count) {
    auto buffer = torch::zeros({loss_count + 1}, torch::dtype(torch::kDouble));
    if (losses.defined()) {
      buffer.slice(0, 0, loss_count).copy_(losses);
    } else {
      buffer[loss_count] = 1;
    }
    std::vector<torch::Tensor> tensors{buffer.to(device_)};
    group_->allreduce(tensors)->wait();
    return tensors[0].cpu();
  }

  // Gathers every rank's error (`failure`: this rank's, empty if none) and
  // throws naming the failing ranks.
  [[noreturn]] void throw_failures(const std::string& failure) {
    const auto messages = all_gather(failure);
    std::ostringstream failed;
    for (const auto rank : c10::irange(messages.size())) {
      if (!messages[rank].empty()) {
        failed << (failed.tellp() > 0 ? "; " : "") << "rank " << rank << ": "
               << messages[rank];
      }
    }
    TORCH_CHECK(false,
                "Dopamine: the closure failed on ",
                failed.str(),
                "; parameters restored on every rank, step not taken");
  }

  void check(int64_t num_perturbations) const override {
    const auto refused =
        refusal(parallel_, num_perturbations, group_->getSize());
    TORCH_CHECK(refused.empty(), refused);
  }

  bool evaluates(const ops::Perturbation& at) const override {
    if (parallel_ == Parallel::Data) {
      return true;
    }
    if (at.offset == 0) {
      return group_->getRank() == 0;
    }
    return at.direction % group_->getSize() == group_->getRank();
  }

  // With Parallel::Data the mean over the ranks; with Parallel::Population
  // each loss as the one rank that evaluated it computed it (the others
  // add 0, exactly).
  torch::Tensor share_losses(const torch::Tensor& losses) override {
    const int64_t count = losses.size(0);
    const auto total = sum(losses, count);
    if (total[count].item<double>() != 0) {
      throw_failures("");
    }
    const auto shared = total.slice(0, 0, count);
    return (parallel_ == Parallel::Data ? shared / group_->getSize() : shared)
        .to(losses.device());
  }

  std::string describe_losses() const override {
    return parallel_ == Parallel::Data
               ? "the mean over the process group's ranks"
               : "as the rank that evaluated it computed it";
  }

  [[noreturn]] void fail(const std::string& error,
                         int64_t loss_count) override {
    sum({}, loss_count);
    throw_failures(error.empty() ? "an error without a message" : error);
  }

  void after_step(const std::vector<torch::Tensor>& params,
                  const std::vector<torch::Tensor>& masters,
                  const torch::Tensor& state) override {
    if (verify_every_ == 0) {
      return;
    }
    const auto step = static_cast<int64_t>(state[0].item<double>());
    if (step % verify_every_ != 0) {
      return;
    }
    std::vector<torch::Tensor> tensors = params;
    tensors.insert(tensors.end(), masters.begin(), masters.end());
    const auto digests = all_gather(std::vector<int64_t>{ops::digest(tensors)});
    std::ostringstream drifted;
    for (const auto rank : c10::irange(digests.size(0))) {
      if (!digests[rank].equal(digests[0])) {
        drifted << (drifted.tellp() > 0 ? ", " : "") << rank;
      }
    }
    TORCH_CHECK(drifted.tellp() == 0,
                "Dopamine: after step ",
                step,
                " the parameters of rank(s) ",
                drifted.str(),
                " differ from rank 0's; the ranks have drifted apart (were "
                "parameters changed outside the optimizer on some ranks?)");
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  Parallel parallel_;
  int64_t verify_every_;
  torch::Device device_;
};

}  // namespace

std::string to_string(Parallel parallel) {
  switch (parallel) {
    case Parallel::Data:
      return "data";
    case Parallel::Population:
      return "population";
  }
  return "Parallel(" + std::to_string(static_cast<int64_t>(parallel)) + ")";
}

void make_parallel(Dopamine& optimizer,
                   c10::intrusive_ptr<c10d::ProcessGroup> group,
                   ParallelOptions options) {
  TORCH_CHECK(group, "Dopamine: make_parallel needs a process group");
  const auto& defaults =
      static_cast<const DopamineOptions&>(optimizer.defaults());
  // A rank that refuses its arguments still takes part in the check, so
  // that no rank waits for the others (docs/DESIGN.md, "Many processes").
  std::string refused;
  if (options.verify_every() < 0) {
    refused = "Dopamine: invalid verify_every: " +
              std::to_string(options.verify_every()) + " (expected >= 0)";
  } else if (defaults.capturable()) {
    refused =
        "Dopamine: capturable with a process group is not supported: a "
        "distributed step reads on the host whether the closure failed on "
        "any rank";
  }
  for (const auto& param_group : optimizer.param_groups()) {
    if (refused.empty()) {
      refused =
          refusal(options.parallel(),
                  static_cast<const DopamineOptions&>(param_group.options())
                      .num_perturbations(),
                  group->getSize());
    }
  }
  auto collective =
      std::make_shared<ProcessGroupCollective>(std::move(group), options);
  std::ostringstream refusals;
  const auto messages = collective->all_gather(refused);
  for (const auto rank : c10::irange(messages.size())) {
    if (!messages[rank].empty()) {
      refusals << (refusals.tellp() > 0 ? "; " : "") << "rank " << rank
               << " refused its arguments (" << messages[rank] << ")";
    }
  }
  TORCH_CHECK(refused.empty(), refused);
  TORCH_CHECK(refusals.tellp() == 0, "Dopamine: ", refusals.str());
  const auto gathered =
      collective->all_gather(configuration(optimizer, options));
  for (const auto rank : c10::irange(1, gathered.size(0))) {
    for (const auto part : c10::irange(kConfigurationSize)) {
      TORCH_CHECK(gathered[rank][part].item<int64_t>() ==
                      gathered[0][part].item<int64_t>(),
                  "Dopamine: rank ",
                  rank,
                  " of the process group was built differently from rank 0 "
                  "(its ",
                  kConfigurationParts[part],
                  " differ); every rank must build the optimizer with the "
                  "same options over the same parameters (shapes, dtypes and "
                  "values: seed the model alike, or broadcast rank 0's "
                  "parameters before)");
    }
  }
  optimizer.set_collective(std::move(collective));
}

}  // namespace dopamine
