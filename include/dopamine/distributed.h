#pragma once

// Dopamine over a c10d process group (docs/DESIGN.md, "Many processes"):
// the ranks exchange losses, never parameters. A step all-reduces
// [L0, L1, ..., Lk, failed] (8 (k + 2) bytes: 48 with the default four
// directions), so every rank applies the same update to its own copy of the
// parameters.
#include <dopamine/optimizer.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdint>

namespace dopamine {

// How the ranks share a step's evaluations.
enum class Parallel : int64_t {
  // Every rank's closure returns the loss of its own shard of the batch; the
  // step takes the mean over the ranks.
  Data = 0,
  // Every rank's closure returns the loss of the same batch; rank 0
  // evaluates the unperturbed loss and rank r the directions r, r + W, ...
  // (with antithetic, both evaluations of each), so num_perturbations must
  // be a multiple of the world size W. Each loss is the one rank's that
  // evaluated it, so the run is the one process's, bit for bit.
  Population = 1,
};

std::string to_string(Parallel parallel);

struct ParallelOptions {
  TORCH_ARG(Parallel, parallel) = Parallel::Data;
  // Every that many steps, compare a digest of every rank's parameters and
  // throw if they differ (0: never).
  TORCH_ARG(int64_t, verify_every) = 0;
};

// Makes every later step of `optimizer` parallel over `group`. A collective:
// call it on every rank at once, after building the optimizer alike
// everywhere. Throws on every rank unless every rank's optimizer has the
// same groups and options over parameters of the same shapes, dtypes and
// values and the same `options` (ranks built apart would drift silently),
// and when any rank refuses its arguments: a capturable optimizer (a
// distributed step reads on the host whether any rank failed), a negative
// verify_every, or Parallel::Population with num_perturbations not a
// multiple of the world size. A difference found by verify_every throws
// after the step.
void make_parallel(Dopamine& optimizer,
                   c10::intrusive_ptr<c10d::ProcessGroup> group,
                   ParallelOptions options = {});

}  // namespace dopamine
