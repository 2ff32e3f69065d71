#pragma once

#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dopamine {

// How the reward prediction error (RPE) sets the step size eta_t
// (docs/DESIGN.md, "The algorithm").
enum class LrAdaptation : int64_t {
  // eta_t = lr: standard weight perturbation, the paper's baseline.
  None = 0,
  // eta_t = lr / (m_hat + eps), m the bias-corrected EMA of |delta| / sigma.
  RpeNormalized = 1,
  // eta_t = (1 - beta_eta) eta_{t-1} + beta_eta s_t, s the EMA of |delta|.
  RpeTracking = 2,
  // eta_t = lr / (d_t + eps), d_t the standard deviation of this step's
  // perturbed losses (0 when they are equal): FZOO's normalisation (arXiv
  // 2506.09034); lr about sigma times smaller than the others'. Needs two
  // perturbed losses: num_perturbations >= 2, or antithetic.
  LossSpread = 3,
};

// What a step does when a loss is NaN or infinite.
enum class NonFiniteLoss : int64_t {
  // Restore the parameters, count the step as skipped, return the loss.
  Skip = 0,
  // Restore the parameters, then throw with the loss value in the message.
  Raise = 1,
};

// The distribution of the perturbation z.
enum class Noise : int64_t {
  // Standard normal per element (docs/DESIGN.md, "The noise").
  Gaussian = 0,
  // +1 or -1 with equal probability per element, as in SPSA: E[z z^T] = I
  // still holds, from one random bit per element instead of 32.
  Rademacher = 1,
};

// Which elements of a parameter the noise draws (docs/DESIGN.md, "The
// noise").
enum class Perturbation : int64_t {
  // Every element: z is the noise itself.
  Full = 0,
  // A parameter of two or more dimensions, as rows by the rest, takes the
  // rank-`rank` z = U V^T / sqrt(rank), its factors drawn from the noise:
  // rank (rows + cols) draws instead of rows x cols. One-dimensional
  // parameters are perturbed in full. Not with capturable.
  LowRank = 1,
};

std::string to_string(LrAdaptation mode);
std::string to_string(Noise noise);
std::string to_string(Perturbation perturbation);
std::string to_string(NonFiniteLoss policy);

// Hyperparameters of one parameter group. `seed` is per group (a group's
// noise is keyed by it). `non_finite_loss`, `capturable` and `master_weights`
// are read from the optimizer's defaults, since a step spans all groups;
// `antithetic` and `num_perturbations` must be the same in every group.
struct DopamineOptions
    : public torch::optim::OptimizerCloneableOptions<DopamineOptions> {
  // One double, the lr, as torch's optimizer serializer requires.
  DopamineOptions(double lr = 0.1);
  TORCH_ARG(double, lr) = 0.1;
  TORCH_ARG(double, sigma) = 0.01;
  TORCH_ARG(LrAdaptation, lr_adaptation) = LrAdaptation::RpeNormalized;
  TORCH_ARG(double, beta) = 0.9;
  TORCH_ARG(double, beta_s) = 0.9998;
  TORCH_ARG(double, beta_eta) = 2e-4;
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(std::optional<double>, lr_min) = std::nullopt;
  TORCH_ARG(std::optional<double>, lr_max) = std::nullopt;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(int64_t, seed) = 0;
  // Rademacher by default: as effective as Gaussian on the benchmark's tasks
  // at a fraction of the cost (docs/DESIGN.md, "Defaults"); Gaussian is the
  // paper's.
  TORCH_ARG(Noise, noise) = Noise::Rademacher;
  TORCH_ARG(NonFiniteLoss, non_finite_loss) = NonFiniteLoss::Skip;
  // Losses, step sizes and state stay on the parameters' device: a step makes
  // no host synchronisation (and can be captured in a CUDA graph). A
  // non-finite loss then skips on the device; NonFiniteLoss::Raise is
  // refused.
  TORCH_ARG(bool, capturable) = false;
  // bfloat16/float16 parameters get a float32 master weight in the state;
  // perturbation and update are computed on it and the parameter is its
  // rounding (4 bytes per such element).
  TORCH_ARG(bool, master_weights) = false;
  // Evaluate L(theta + sigma z) and L(theta - sigma z) instead of L(theta)
  // and L(theta + sigma z): delta = (L+ - L-) / 2, the central difference of
  // MeZO and SPSA; step() returns (L+ + L-) / 2 (docs/DESIGN.md, "The
  // algorithm"). One evaluation serves every group, so all groups must have
  // the same value (a step throws otherwise).
  TORCH_ARG(bool, antithetic) = false;
  // Directions per step, k >= 1: z_j is keyed by (seed, step, j, parameter,
  // element) and the update is the mean over j of lr (delta_j / sigma) z_j;
  // k + 1 evaluations (2k with antithetic). Like antithetic, the same in
  // every group (docs/DESIGN.md, "Several directions"). Two by default: the
  // benchmark's choice (docs/DESIGN.md, "Defaults"); 1 is the paper's rule.
  TORCH_ARG(int64_t, num_perturbations) = 2;
  // Restore torch's random generators (the CPU's, and those of the CUDA
  // devices the parameters are on) before every evaluation of a step after
  // the first, so that dropout, or anything else the closure samples, draws
  // the same numbers in every evaluation and the losses differ by the
  // perturbation alone. The generators advance across steps as with one
  // evaluation per step. Read from the optimizer's defaults.
  TORCH_ARG(bool, restore_rng) = true;
  // Full or low-rank perturbations, and the rank of a low-rank one: an int
  // in [1, 65536], at most the smaller side (rows, or the rest) of every
  // parameter of two or more dimensions, which a step checks.
  TORCH_ARG(Perturbation, perturbation) = Perturbation::Full;
  TORCH_ARG(int64_t, rank) = 1;
  // The update's RPE of direction j is delta_j less b, the EMA with this
  // constant (in [0, 1)) of the earlier steps' mean delta: the prediction of
  // the shared curvature offset of one-sided RPEs (docs/DESIGN.md, "The
  // algorithm"). 0.98 by default (docs/DESIGN.md, "Defaults"); nullopt:
  // against L0 alone, the paper's RPE. Unused with antithetic, whose RPEs
  // have no such offset. A checkpoint without the option loads it unset.
  TORCH_ARG(std::optional<double>, beta_baseline) = 0.98;

 public:
  // Throws c10::Error naming the first invalid option and its value.
  void validate() const;

  // Every option as (name, value), named as the pack_options op names it,
  // enums as their integer codes: how the options are compared, saved and
  // packed.
  std::vector<std::pair<const char*, c10::IValue>> named_values() const;

  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const DopamineOptions& lhs,
                         const DopamineOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

}  // namespace dopamine
