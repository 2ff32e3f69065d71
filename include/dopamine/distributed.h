#pragma once

// Data-parallel Dopamine over a c10d process group (docs/DESIGN.md, "Many
// processes"): every rank's closure returns the loss of its own shard of the
// batch; a step all-reduces [L0, L1, ..., Lk, failed] (8 (k + 2) bytes: 48
// with the default four directions), so every rank applies the same update
// and the parameters never travel.
#include <dopamine/optimizer.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdint>

namespace dopamine {

struct DataParallelOptions {
  // Every that many steps, compare a digest of every rank's parameters and
  // throw if they differ (0: never).
  TORCH_ARG(int64_t, verify_every) = 0;
};

// Makes every later step of `optimizer` data parallel over `group`. A
// collective: call it on every rank at once, after building the optimizer
// alike everywhere. Throws on every rank unless every rank's optimizer has
// the same groups and options over parameters of the same shapes, dtypes and
// values and the same `options` (ranks built apart would drift silently),
// and when any rank refuses its arguments: a capturable optimizer (a
// distributed step reads on the host whether any rank failed) or a negative
// verify_every. A difference found by verify_every throws after the step.
void make_data_parallel(Dopamine& optimizer,
                        c10::intrusive_ptr<c10d::ProcessGroup> group,
                        DataParallelOptions options = {});

}  // namespace dopamine
