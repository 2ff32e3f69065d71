// The options packed and checked, the checks of loaded states, and the
// parameters' digest that distributed runs compare: ops, not C++ helpers, so
// that the Python optimizer runs this very code. They dispatch to the
// CompositeExplicitAutograd kernels on any device.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "engine.h"
#include "kernel_common.h"

namespace dopamine::ops {
namespace {

void check(bool valid, const char* name, double value, const char* rule) {
  TORCH_CHECK(
      valid, "Dopamine: invalid ", name, ": ", value, " (expected ", rule, ")");
}

// The rules of every option, on their packed form: pack_options runs them
// on what it packs, and the ops that take a packed list on what they are
// given, so a list made by hand is held to the same rules.
void check_packed(const double* p) {
  using namespace engine::packed;
  const double lr = p[kLr], sigma = p[kSigma], eps = p[kEps];
  const double weight_decay = p[kWeightDecay];
  check(std::isfinite(lr) && lr >= 0, "lr", lr, ">= 0");
  check(std::isfinite(sigma) && sigma > 0, "sigma", sigma, "> 0");
  check(p[kBeta] >= 0 && p[kBeta] < 1, "beta", p[kBeta], "in [0, 1)");
  check(p[kBetaS] >= 0 && p[kBetaS] < 1, "beta_s", p[kBetaS], "in [0, 1)");
  check(p[kBetaEta] >= 0 && p[kBetaEta] <= 1,
        "beta_eta",
        p[kBetaEta],
        "in [0, 1]");
  check(std::isfinite(eps) && eps > 0, "eps", eps, "> 0");
  if (p[kHasBetaBaseline] != 0) {
    check(p[kBetaBaseline] >= 0 && p[kBetaBaseline] < 1,
          "beta_baseline",
          p[kBetaBaseline],
          "in [0, 1), or None");
  }
  check(std::isfinite(weight_decay) && weight_decay >= 0,
        "weight_decay",
        weight_decay,
        ">= 0");
  const double directions = p[kNumPerturbations];
  TORCH_CHECK(directions >= 1 &&
                  directions <= static_cast<double>(engine::kMaxDirections) &&
                  directions == std::floor(directions),
              "Dopamine: invalid num_perturbations: ",
              directions,
              " (expected an int in [1, ",
              engine::kMaxDirections,
              "])");
  const bool has_lr_min = p[kHasLrMin] != 0, has_lr_max = p[kHasLrMax] != 0;
  if (has_lr_min) {
    check(p[kLrMin] >= 0, "lr_min", p[kLrMin], ">= 0");
  }
  if (has_lr_max) {
    check(p[kLrMax] >= 0, "lr_max", p[kLrMax], ">= 0");
  }
  if (has_lr_min && has_lr_max) {
    check(p[kLrMin] <= p[kLrMax], "lr_min", p[kLrMin], "<= lr_max");
  }
  // The codes of the enums in include/dopamine/options.h.
  const auto is_code = [](double value, int last) {
    return value >= 0 && value <= last && value == std::floor(value);
  };
  TORCH_CHECK(is_code(p[kLrAdaptation], 3),
              "Dopamine: invalid lr_adaptation code ",
              p[kLrAdaptation],
              " (0 none, 1 rpe_normalized, 2 rpe_tracking, 3 loss_spread)");
  // The spread of the perturbed losses needs two of them.
  TORCH_CHECK_VALUE(
      !(p[kLrAdaptation] == 3 && p[kAntithetic] == 0 && directions < 2),
      "Dopamine: invalid num_perturbations: ",
      directions,
      " with lr_adaptation=loss_spread (expected >= 2, or antithetic=True: "
      "the rule divides by the spread of the perturbed losses)");
  TORCH_CHECK(is_code(p[kNoise], 1),
              "Dopamine: invalid noise code ",
              p[kNoise],
              " (0 gaussian, 1 rademacher)");
  TORCH_CHECK(is_code(p[kPerturbation], 1),
              "Dopamine: invalid perturbation code ",
              p[kPerturbation],
              " (0 full, 1 lowrank)");
  TORCH_CHECK_VALUE(p[kRank] >= 1 &&
                        p[kRank] <= static_cast<double>(engine::kMaxRank) &&
                        p[kRank] == std::floor(p[kRank]),
                    "Dopamine: invalid rank: ",
                    p[kRank],
                    " (expected an int in [1, ",
                    engine::kMaxRank,
                    "])");
  TORCH_CHECK(is_code(p[kNonFiniteLoss], 1),
              "Dopamine: invalid non_finite_loss code ",
              p[kNonFiniteLoss],
              " (0 skip, 1 raise)");
  for (const auto field : {kHasBetaBaseline,
                           kHasLrMin,
                           kHasLrMax,
                           kCapturable,
                           kMasterWeights,
                           kAntithetic,
                           kRestoreRng}) {
    TORCH_CHECK(is_code(p[field], 1),
                "Dopamine: packed options field ",
                static_cast<int64_t>(field),
                " must be 0 or 1, got ",
                p[field]);
  }
  for (const auto field : {kKeyLo, kKeyHi}) {
    TORCH_CHECK(p[field] >= 0 && p[field] <= 4294967295.0 &&
                    p[field] == std::floor(p[field]),
                "Dopamine: packed options field ",
                static_cast<int64_t>(field),
                " must be a 32-bit word of a noise key, got ",
                p[field]);
  }
  TORCH_CHECK_VALUE(!(p[kCapturable] != 0 && p[kPerturbation] != 0),
                    "Dopamine: invalid perturbation: lowrank with "
                    "capturable=True (its factors are sized on the host "
                    "each step)");
  TORCH_CHECK(!(p[kCapturable] != 0 && p[kNonFiniteLoss] == 1),
              "Dopamine: invalid non_finite_loss: raise with capturable=True "
              "(a capturable step never reads a loss on the host; a "
              "non-finite one skips the step)");
}

std::vector<double> pack_options_kernel(double lr,
                                        double sigma,
                                        int64_t lr_adaptation,
                                        double beta,
                                        double beta_s,
                                        double beta_eta,
                                        double eps,
                                        std::optional<double> lr_min,
                                        std::optional<double> lr_max,
                                        double weight_decay,
                                        int64_t seed,
                                        int64_t noise,
                                        int64_t non_finite_loss,
                                        bool capturable,
                                        bool master_weights,
                                        bool antithetic,
                                        int64_t num_perturbations,
                                        bool restore_rng,
                                        int64_t perturbation,
                                        int64_t rank,
                                        std::optional<double> beta_baseline) {
  using namespace engine::packed;
  const noise::Key key = noise::key_of(seed);
  std::vector<double> p(kSize);
  p[kLr] = lr;
  p[kSigma] = sigma;
  p[kLrAdaptation] = static_cast<double>(lr_adaptation);
  p[kBeta] = beta;
  p[kBetaS] = beta_s;
  p[kBetaEta] = beta_eta;
  p[kEps] = eps;
  p[kHasLrMin] = lr_min.has_value();
  p[kLrMin] = lr_min.value_or(0);
  p[kHasLrMax] = lr_max.has_value();
  p[kLrMax] = lr_max.value_or(0);
  p[kWeightDecay] = weight_decay;
  p[kKeyLo] = key.lo;
  p[kKeyHi] = key.hi;
  p[kNoise] = static_cast<double>(noise);
  p[kNonFiniteLoss] = static_cast<double>(non_finite_loss);
  p[kCapturable] = capturable;
  p[kMasterWeights] = master_weights;
  p[kAntithetic] = antithetic;
  p[kNumPerturbations] = static_cast<double>(num_perturbations);
  p[kRestoreRng] = restore_rng;
  p[kPerturbation] = static_cast<double>(perturbation);
  p[kRank] = static_cast<double>(rank);
  p[kHasBetaBaseline] = beta_baseline.has_value();
  p[kBetaBaseline] = beta_baseline.value_or(0);
  check_packed(p.data());
  return p;
}

std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<std::string>>
evaluations_kernel(bool antithetic, int64_t directions) {
  TORCH_CHECK(directions >= 1,
              "dopamine::evaluations: directions must be at least 1, got ",
              directions);
  const int64_t count = engine::loss_count(antithetic, directions);
  std::vector<int64_t> offsets(count), indices(count);
  std::vector<std::string> names(count);
  for (int64_t i = 0; i < count; ++i) {
    const auto at = engine::evaluation_at(antithetic, i);
    offsets[i] = at.offset;
    indices[i] = at.direction;
    const std::string z =
        directions == 1 ? "z" : "z_" + std::to_string(at.direction);
    if (at.offset == 0) {
      names[i] = "unperturbed";
    } else if (!antithetic && directions == 1) {
      names[i] = "perturbed";
    } else {
      names[i] =
          std::string("theta ") + (at.offset > 0 ? "+" : "-") + " sigma " + z;
    }
  }
  return {offsets, indices, names};
}

}  // namespace

engine::GroupOptions unpack_options(c10::ArrayRef<double> options,
                                    const char* op) {
  TORCH_CHECK(options.size() == engine::packed::kSize,
              "dopamine::",
              op,
              ": options must be the ",
              engine::packed::kSize,
              " numbers pack_options returns, got ",
              options.size());
  check_packed(options.data());
  return engine::unpack(options.data());
}

namespace {

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
  check(std::isfinite(v[engine::kRpeBaseline]),
        "state rpe_baseline",
        v[engine::kRpeBaseline],
        "finite");
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
  m.impl("pack_options", &pack_options_kernel);
  m.impl("evaluations", &evaluations_kernel);
  m.impl("digest", &digest_kernel);
}

// Under fake tensors only the shape is known.
TORCH_LIBRARY_IMPL(dopamine, Meta, m) {
  m.impl("check_state", &check_state_shape);
}

}  // namespace dopamine::ops
