// The checks of options and of loaded states, and the parameters' digest
// that distributed runs compare: ops, not C++ helpers, so that the Python
// optimizer runs this very code. They dispatch to the
// CompositeExplicitAutograd kernels on any device.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "engine.h"

namespace dopamine::ops {
namespace {

void check(bool valid, const char* name, double value, const char* rule) {
  TORCH_CHECK(
      valid, "Dopamine: invalid ", name, ": ", value, " (expected ", rule, ")");
}

void check_options_kernel(double lr,
                          double sigma,
                          int64_t lr_adaptation,
                          double beta,
                          double beta_s,
                          double beta_eta,
                          double eps,
                          std::optional<double> lr_min,
                          std::optional<double> lr_max,
                          double weight_decay,
                          int64_t noise,
                          int64_t non_finite_loss,
                          bool capturable,
                          int64_t num_perturbations) {
  check(std::isfinite(lr) && lr >= 0, "lr", lr, ">= 0");
  check(std::isfinite(sigma) && sigma > 0, "sigma", sigma, "> 0");
  check(beta >= 0 && beta < 1, "beta", beta, "in [0, 1)");
  check(beta_s >= 0 && beta_s < 1, "beta_s", beta_s, "in [0, 1)");
  check(beta_eta >= 0 && beta_eta <= 1, "beta_eta", beta_eta, "in [0, 1]");
  check(std::isfinite(eps) && eps > 0, "eps", eps, "> 0");
  check(std::isfinite(weight_decay) && weight_decay >= 0,
        "weight_decay",
        weight_decay,
        ">= 0");
  TORCH_CHECK(
      num_perturbations >= 1 && num_perturbations <= engine::kMaxDirections,
      "Dopamine: invalid num_perturbations: ",
      num_perturbations,
      " (expected an int in [1, ",
      engine::kMaxDirections,
      "])");
  if (lr_min) {
    check(*lr_min >= 0, "lr_min", *lr_min, ">= 0");
  }
  if (lr_max) {
    check(*lr_max >= 0, "lr_max", *lr_max, ">= 0");
  }
  if (lr_min && lr_max) {
    check(*lr_min <= *lr_max, "lr_min", *lr_min, "<= lr_max");
  }
  // The codes of the enums in include/dopamine/options.h.
  TORCH_CHECK(lr_adaptation >= 0 && lr_adaptation <= 2,
              "Dopamine: invalid lr_adaptation code ",
              lr_adaptation,
              " (0 none, 1 rpe_normalized, 2 rpe_tracking)");
  TORCH_CHECK(noise == 0 || noise == 1,
              "Dopamine: invalid noise code ",
              noise,
              " (0 gaussian, 1 rademacher)");
  TORCH_CHECK(non_finite_loss == 0 || non_finite_loss == 1,
              "Dopamine: invalid non_finite_loss code ",
              non_finite_loss,
              " (0 skip, 1 raise)");
  TORCH_CHECK(!(capturable && non_finite_loss == 1),
              "Dopamine: invalid non_finite_loss: raise with capturable=True "
              "(a capturable step never reads a loss on the host; a "
              "non-finite one skips the step)");
}

// A loaded state must be one a run can reach: the next step's noise counter
// in range, traces finite, so that no later step writes NaN into the
// parameters.
void check_state_shape(const at::Tensor& state) {
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.dim() == 1 &&
                  state.sym_size(0) == engine::kStateSize,
              "Dopamine: a group state must be a float64 tensor of shape [",
              engine::kStateSize,
              "], got ",
              state.scalar_type(),
              " of shape ",
              state.sym_sizes());
}

void check_state_kernel(const at::Tensor& state) {
  check_state_shape(state);
  const auto values = state.to(at::kCPU).contiguous();
  const double* v = values.data_ptr<double>();
  const double step = v[engine::kStep];
  const double skipped = v[engine::kSkippedSteps];
  check(std::isfinite(step) && step >= 0 && step < 4294967295.0 &&
            step == std::floor(step),
        "state step",
        step,
        "an integer in [0, 2^32 - 1)");
  check(skipped >= 0 && skipped <= step && skipped == std::floor(skipped),
        "state skipped_steps",
        skipped,
        "an integer in [0, step]");
  for (const auto field :
       {engine::kRpeTrace, engine::kRpeMagnitude, engine::kCurrentLr}) {
    check(std::isfinite(v[field]) && v[field] >= 0,
          field == engine::kRpeTrace       ? "state rpe_trace"
          : field == engine::kRpeMagnitude ? "state rpe_magnitude"
                                           : "state current_lr",
          v[field],
          "finite and >= 0");
  }
}

// One 64-bit word into the digest: both steps are bijections of h, so a
// single differing word always changes the digest.
uint64_t mix(uint64_t h, uint64_t word) {
  h ^= word * 0x9FB21C651E98DF25ULL;
  h = (h << 29) | (h >> 35);
  return h * 0xC2B2AE3D27D4EB4FULL;
}

int64_t digest_kernel(at::TensorList tensors) {
  uint64_t h = 0x9E3779B97F4A7C15ULL;
  for (const auto& tensor : tensors) {
    const auto bytes = tensor.detach().to(at::kCPU).contiguous();
    const auto* data = static_cast<const unsigned char*>(bytes.data_ptr());
    const size_t size = bytes.nbytes();
    h = mix(h, size);
    size_t i = 0;
    for (; i + sizeof(uint64_t) <= size; i += sizeof(uint64_t)) {
      uint64_t word;
      std::memcpy(&word, data + i, sizeof(word));
      h = mix(h, word);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, data + i, size - i);
    h = mix(h, tail);
  }
  return tensors.empty() ? 0 : static_cast<int64_t>(h);
}

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, CompositeExplicitAutograd, m) {
  m.impl("check_state", &check_state_kernel);
  m.impl("check_options", &check_options_kernel);
  m.impl("digest", &digest_kernel);
}

// Under fake tensors only the shape is known.
TORCH_LIBRARY_IMPL(dopamine, Meta, m) {
  m.impl("check_state", &check_state_shape);
}

}  // namespace dopamine::ops
