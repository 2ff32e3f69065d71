#pragma once

// A c10d process group over gloo, made as torch.distributed's
// init_process_group("gloo") makes one: a ProcessGroup whose CPU backend is
// a ProcessGroupGloo. Needs gloo's headers, which torch's pip wheels lack
// (Debian: libgloo-dev).
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

inline c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int size,
    std::chrono::milliseconds timeout) {
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
      store,
      rank,
      size,
      c10d::ProcessGroupGloo::Options::create_default(timeout));
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setBackend(
      c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  return group;
}
