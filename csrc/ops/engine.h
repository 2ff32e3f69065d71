#pragma once

// The step engine's arithmetic on a group's state (docs/DESIGN.md, "The step
// protocol"), shared by the host and the device: the CPU runs it on host
// memory, CUDA in a one-thread kernel on device memory, so a capturable step
// computes the same bits with no host synchronisation.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include <dopamine/perturbation.h>

#include "noise.h"

namespace dopamine::engine {

// A group's state: one float64 tensor of kStateSize entries. Counts are
// integers far below 2^53, so float64 holds them exactly.
constexpr int64_t kStep = 0;          // steps taken, skipped ones included
constexpr int64_t kSkippedSteps = 1;  // skipped for a non-finite loss or step
constexpr int64_t kRpeTrace = 2;      // m_t, EMA of |delta| / sigma
constexpr int64_t kRpeMagnitude = 3;  // s_t, EMA of |delta| (rpe_tracking)
constexpr int64_t kCurrentLr = 4;     // eta_t of the last completed step
// b_t, EMA of the steps' mean delta, the prediction of the next one
// (beta_baseline)
constexpr int64_t kRpeBaseline = 5;
constexpr int64_t kStateSize = 6;

// A group's plan for one step: the state it commits if the step is taken,
// then everything the update needs, so that finish_step_ takes no options;
// last, one step size per direction (num_perturbations), so a plan of k
// directions has kPlanHeader + k entries.
constexpr int64_t kNextState = 0;  // kStateSize entries
constexpr int64_t kDecay = kStateSize;
// 1 when every loss, step size and trace is finite.
constexpr int64_t kFinite = kStateSize + 1;
// The perturbation the parameters carry when the step finishes, in units of
// the last direction's z: sigma, or -sigma with antithetic.
constexpr int64_t kSigma = kStateSize + 2;
// The noise key's two words (exact in float64), its noise::Kind, and the
// rank of its low-rank perturbation (0: full; docs/DESIGN.md, "The noise").
constexpr int64_t kKeyLo = kStateSize + 3;
constexpr int64_t kKeyHi = kStateSize + 4;
constexpr int64_t kNoise = kStateSize + 5;
constexpr int64_t kRank = kStateSize + 6;
constexpr int64_t kPlanHeader = kStateSize + 7;
constexpr int64_t kStepSizes = kPlanHeader;  // one per direction
// The most directions a step may take (num_perturbations): far beyond any
// useful count, and few enough that a plan is a few pages.
constexpr int64_t kMaxDirections = 65536;

// The largest rank of a low-rank perturbation (perturbation="lowrank"): far
// above any useful one.
constexpr int64_t kMaxRank = 65536;

// Codes of the op arguments `lr_adaptation`, `noise`, `perturbation` and
// `non_finite_loss`:
// the values of the C++ enums (include/dopamine/options.h).
enum class Adaptation : int64_t {
  None = 0,
  RpeNormalized = 1,
  RpeTracking = 2,
  LossSpread = 3
};

// A group's options as pack_options returns them: one float64 list, the
// only form the other ops take (docs/DESIGN.md, "Adding an option"). The
// seed crosses as its noise key's two 32-bit words, exact in float64;
// optional bounds as a flag and a value; enums as their codes; bools as 0 or
// 1.
namespace packed {
enum Field : int64_t {
  kLr,
  kSigma,
  kLrAdaptation,
  kBeta,
  kBetaS,
  kBetaEta,
  kEps,
  kHasLrMin,
  kLrMin,
  kHasLrMax,
  kLrMax,
  kWeightDecay,
  kKeyLo,
  kKeyHi,
  kNoise,
  kNonFiniteLoss,
  kCapturable,
  kMasterWeights,
  kAntithetic,
  kNumPerturbations,
  kRestoreRng,
  kPerturbation,
  kRank,
  kHasBetaBaseline,
  kBetaBaseline,
  kSize
};
}  // namespace packed

// The options of a group that a plan depends on.
struct GroupOptions {
  Adaptation mode;
  double lr, sigma, beta, beta_s, beta_eta, eps, weight_decay;
  // Whether the update's RPEs are taken against the running baseline, and
  // its EMA constant (beta_baseline; unused with antithetic).
  bool has_baseline;
  double beta_baseline;
  bool has_lr_min, has_lr_max;
  double lr_min, lr_max;
  noise::Key key;
  noise::Kind noise;
  // The losses are L(theta + sigma z) and L(theta - sigma z), and the
  // parameters carry -sigma z when the step finishes.
  bool antithetic;
  int64_t directions;  // num_perturbations, >= 1
  // The rank of the perturbation of a parameter of two or more dimensions;
  // 0: every element drawn (perturbation="full").
  int64_t rank;
};

// The plan's options from their packed form (checked by the caller).
C10_HOST_DEVICE inline GroupOptions unpack(const double* p) {
  return {
      static_cast<Adaptation>(static_cast<int64_t>(p[packed::kLrAdaptation])),
      p[packed::kLr],
      p[packed::kSigma],
      p[packed::kBeta],
      p[packed::kBetaS],
      p[packed::kBetaEta],
      p[packed::kEps],
      p[packed::kWeightDecay],
      p[packed::kHasBetaBaseline] != 0,
      p[packed::kBetaBaseline],
      p[packed::kHasLrMin] != 0,
      p[packed::kHasLrMax] != 0,
      p[packed::kLrMin],
      p[packed::kLrMax],
      {static_cast<uint32_t>(p[packed::kKeyLo]),
       static_cast<uint32_t>(p[packed::kKeyHi])},
      static_cast<noise::Kind>(static_cast<int64_t>(p[packed::kNoise])),
      p[packed::kAntithetic] != 0,
      static_cast<int64_t>(p[packed::kNumPerturbations]),
      p[packed::kPerturbation] != 0 ? static_cast<int64_t>(p[packed::kRank])
                                    : 0};
}

// The number of losses a step of these options evaluates.
C10_HOST_DEVICE inline int64_t loss_count(bool antithetic, int64_t directions) {
  return antithetic ? 2 * directions : directions + 1;
}

// The order of a step's losses, the one place it is written (docs/DESIGN.md,
// "The algorithm"): L0, then L(theta + sigma z_j) for each direction j; or
// with antithetic L(theta + sigma z_j) and L(theta - sigma z_j) for each j in
// turn. Evaluation i is at evaluation_at(i); the loss at a perturbation is at
// loss_index of it. The front ends walk the list that the evaluations op
// makes from evaluation_at.
C10_HOST_DEVICE inline ops::Perturbation evaluation_at(bool antithetic,
                                                       int64_t i) {
  if (antithetic) {
    return {i % 2 == 0 ? 1 : -1, i / 2};
  }
  return {i > 0 ? 1 : 0, i > 0 ? i - 1 : 0};
}
C10_HOST_DEVICE inline int64_t loss_index(bool antithetic,
                                          ops::Perturbation at) {
  if (antithetic) {
    return 2 * at.direction + (at.offset < 0 ? 1 : 0);
  }
  return at.offset == 0 ? 0 : at.direction + 1;
}

// The sample standard deviation of a step's perturbed losses (every loss but
// L0), the scale loss_spread divides lr by (docs/DESIGN.md, "The
// algorithm"); pack_options ensures there are at least two.
C10_HOST_DEVICE inline double perturbed_loss_spread(const double* losses,
                                                    const GroupOptions& o) {
  const int64_t count = loss_count(o.antithetic, o.directions);
  double sum = 0, perturbed = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (evaluation_at(o.antithetic, i).offset != 0) {
      sum += losses[i];
      perturbed += 1;
    }
  }
  const double mean = sum / perturbed;
  double squares = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (evaluation_at(o.antithetic, i).offset != 0) {
      squares += (losses[i] - mean) * (losses[i] - mean);
    }
  }
  return std::sqrt(squares / (perturbed - 1));
}

// The rule of docs/DESIGN.md, "The algorithm", for one group: the plan of a
// step from its losses, in loss_index's order. Direction j's RPE compares
// L(theta + sigma z_j) with L0, or with antithetic with L(theta - sigma z_j),
// halved. One direction divides by k = 1, which is exact, so its plan is the
// one-direction rule's to the bit.
C10_HOST_DEVICE inline void plan_group(const double* state,
                                       const double* losses,
                                       const GroupOptions& o,
                                       double* plan) {
  const double k = static_cast<double>(o.directions);
  bool finite = true;
  double magnitude_sum = 0;  // sum over j of |delta_j|
  for (int64_t j = 0; j < o.directions; ++j) {
    const double plus = losses[loss_index(o.antithetic, {1, j})];
    const double delta =
        o.antithetic ? (plus - losses[loss_index(o.antithetic, {-1, j})]) / 2
                     : plus - losses[loss_index(o.antithetic, {0, 0})];
    // The step sizes are scaled by lr below, once it is known.
    plan[kStepSizes + j] = delta;
    magnitude_sum += std::fabs(delta);
  }
  for (int64_t i = 0; i < loss_count(o.antithetic, o.directions); ++i) {
    finite = finite && std::isfinite(losses[i]);
  }
  const double mean_magnitude = magnitude_sum / k;
  const double step = state[kStep] + 1;
  // The bias correction counts completed updates, skipped steps excluded.
  const double updates = step - state[kSkippedSteps];
  double trace = state[kRpeTrace];
  double magnitude = state[kRpeMagnitude];
  double baseline = state[kRpeBaseline];
  if (o.has_baseline && !o.antithetic) {
    // The update's RPE is delta_j less the prediction b of the earlier
    // updates (none before the first), so it stays unbiased; the trace keeps
    // |delta_j| (docs/DESIGN.md, "The algorithm").
    const double prediction =
        updates > 1 ? baseline / (1 - std::pow(o.beta_baseline, updates - 1))
                    : 0;
    double delta_sum = 0;
    for (int64_t j = 0; j < o.directions; ++j) {
      delta_sum += plan[kStepSizes + j];
      plan[kStepSizes + j] -= prediction;
    }
    baseline =
        o.beta_baseline * baseline + (1 - o.beta_baseline) * delta_sum / k;
  }
  double lr = o.lr;
  if (o.mode == Adaptation::RpeNormalized) {
    trace = o.beta * trace + (1 - o.beta) * mean_magnitude / o.sigma;
    lr = o.lr / (trace / (1 - std::pow(o.beta, updates)) + o.eps);
  } else if (o.mode == Adaptation::RpeTracking) {
    magnitude = o.beta_s * magnitude + (1 - o.beta_s) * mean_magnitude;
    const double previous = updates == 1 ? o.lr : state[kCurrentLr];
    lr = (1 - o.beta_eta) * previous + o.beta_eta * magnitude;
  } else if (o.mode == Adaptation::LossSpread) {
    // Equal perturbed losses give the step no scale, and their common
    // difference from L0 would be divided by eps: such a step does not move
    // (docs/DESIGN.md, "The algorithm").
    const double spread = perturbed_loss_spread(losses, o);
    lr = spread == 0 ? 0 : o.lr / (spread + o.eps);
  }
  if (o.has_lr_min) {
    lr = lr < o.lr_min ? o.lr_min : lr;
  }
  if (o.has_lr_max) {
    lr = lr > o.lr_max ? o.lr_max : lr;
  }
  // The update is the mean over the directions of lr (delta_j / sigma) z_j.
  for (int64_t j = 0; j < o.directions; ++j) {
    const double step_size = lr * plan[kStepSizes + j] / o.sigma / k;
    plan[kStepSizes + j] = step_size;
    finite = finite && std::isfinite(step_size);
  }
  plan[kNextState + kStep] = step;
  plan[kNextState + kSkippedSteps] = state[kSkippedSteps];
  plan[kNextState + kRpeTrace] = trace;
  plan[kNextState + kRpeMagnitude] = magnitude;
  plan[kNextState + kCurrentLr] = lr;
  plan[kNextState + kRpeBaseline] = baseline;
  plan[kDecay] = o.lr * o.weight_decay;
  finite = finite && std::isfinite(trace) && std::isfinite(magnitude) &&
           std::isfinite(baseline) && std::isfinite(lr);
  plan[kFinite] = finite ? 1 : 0;
  plan[kSigma] = o.antithetic ? -o.sigma : o.sigma;
  plan[kKeyLo] = o.key.lo;
  plan[kKeyHi] = o.key.hi;
  plan[kNoise] = static_cast<double>(o.noise);
  plan[kRank] = static_cast<double>(o.rank);
}

// The noise key and kind a plan carries.
C10_HOST_DEVICE inline noise::Key plan_key(const double* plan) {
  return {static_cast<uint32_t>(plan[kKeyLo]),
          static_cast<uint32_t>(plan[kKeyHi])};
}
C10_HOST_DEVICE inline noise::Kind plan_noise(const double* plan) {
  return static_cast<noise::Kind>(static_cast<int64_t>(plan[kNoise]));
}
C10_HOST_DEVICE inline uint32_t plan_rank(const double* plan) {
  return static_cast<uint32_t>(plan[kRank]);
}

// Whether every group's plan is finite: a step is taken by all groups or by
// none.
C10_HOST_DEVICE inline bool all_finite(const double* const* plans, int count) {
  bool finite = true;
  for (int g = 0; g < count; ++g) {
    finite = finite && plans[g][kFinite] == 1;
  }
  return finite;
}

// The state after the step: the plan's when the step is taken, else one more
// step, counted as skipped.
C10_HOST_DEVICE inline void commit_group(double* state,
                                         const double* plan,
                                         bool taken) {
  if (taken) {
    for (int64_t i = 0; i < kStateSize; ++i) {
      state[i] = plan[kNextState + i];
    }
  } else {
    state[kStep] += 1;
    state[kSkippedSteps] += 1;
  }
}

// An element update x' = keep * (x - shift * z) - move * z, where x is the
// float32 master weight when the parameter has one (and the parameter becomes
// x' rounded), else the parameter. Without decay the two noise terms are one
// (shift = sigma + step size), a single rounding.
struct Coefficients {
  double keep = 1, shift = 0, move = 0;
  // Whether x' is stored in the master weight; else only the parameter
  // changes (a perturbation of a parameter with a master weight).
  bool writes_master = false;
};

// move_, one pass: parameters carrying previous * sigma * z come to carry
// offset * sigma * z (each -1, 0 or 1): theta + (offset - previous) sigma z.
// A master weight is never perturbed: the parameter becomes the rounding of
// master + offset * sigma * z, so every round trip is exact.
C10_HOST_DEVICE inline Coefficients perturb_coefficients(double sigma,
                                                         int64_t previous,
                                                         int64_t offset,
                                                         bool has_master) {
  Coefficients c;
  c.shift =
      -static_cast<double>(has_master ? offset : offset - previous) * sigma;
  return c;
}

// finish_step_: removes the perturbation, which is along the last
// direction, and, when the step is taken, applies decay and moves along that
// direction (docs/DESIGN.md, "The algorithm"); the kernels then move along
// the other directions (their step sizes are in the plan).
C10_HOST_DEVICE inline Coefficients finish_coefficients(const double* plan,
                                                        int64_t directions,
                                                        bool taken,
                                                        bool has_master) {
  Coefficients c;
  const double unperturb = has_master ? 0 : plan[kSigma];
  const double step_size = plan[kStepSizes + directions - 1];
  c.writes_master = has_master && taken;
  if (!taken) {
    c.shift = unperturb;
  } else if (plan[kDecay] == 0) {
    c.shift = unperturb + step_size;
  } else {
    c.keep = 1 - plan[kDecay];
    c.shift = unperturb;
    c.move = step_size;
  }
  return c;
}

}  // namespace dopamine::engine
