// The ops on scalars: the step-size rule and the option checks. They are
// ops, not C++ helpers, so that the Python optimizer and TorchScript code run
// this very code. With no tensor argument they dispatch to the
// CompositeExplicitAutograd kernel.
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace dopamine::ops {
namespace {

std::tuple<double, double, double> adapt_lr_kernel(c10::string_view mode,
                                                   double delta,
                                                   int64_t updates,
                                                   double base_lr,
                                                   double sigma,
                                                   double beta,
                                                   double beta_s,
                                                   double beta_eta,
                                                   double eps,
                                                   std::optional<double> lr_min,
                                                   std::optional<double> lr_max,
                                                   double rpe_trace,
                                                   double rpe_magnitude,
                                                   double current_lr) {
  TORCH_CHECK(updates >= 1,
              "dopamine::adapt_lr: updates must count this update (>= 1), "
              "got ",
              updates);
  double lr = base_lr;
  if (mode == "rpe_normalized") {
    rpe_trace = beta * rpe_trace + (1 - beta) * std::abs(delta) / sigma;
    const double bias_correction = 1 - std::pow(beta, updates);
    lr = base_lr / (rpe_trace / bias_correction + eps);
  } else if (mode == "rpe_tracking") {
    rpe_magnitude = beta_s * rpe_magnitude + (1 - beta_s) * std::abs(delta);
    const double previous = updates == 1 ? base_lr : current_lr;
    lr = (1 - beta_eta) * previous + beta_eta * rpe_magnitude;
  } else {
    TORCH_CHECK(mode == "none",
                "dopamine::adapt_lr: unknown mode '",
                mode,
                "' (expected none, rpe_normalized or rpe_tracking)");
  }
  if (lr_min) {
    lr = std::max(lr, *lr_min);
  }
  if (lr_max) {
    lr = std::min(lr, *lr_max);
  }
  return {rpe_trace, rpe_magnitude, lr};
}

void check(bool valid, const char* name, double value, const char* rule) {
  TORCH_CHECK(
      valid, "Dopamine: invalid ", name, ": ", value, " (expected ", rule, ")");
}

void check_options_kernel(double lr,
                          double sigma,
                          c10::string_view lr_adaptation,
                          double beta,
                          double beta_s,
                          double beta_eta,
                          double eps,
                          std::optional<double> lr_min,
                          std::optional<double> lr_max,
                          double weight_decay,
                          c10::string_view noise,
                          c10::string_view non_finite_loss) {
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
  if (lr_min) {
    check(*lr_min >= 0, "lr_min", *lr_min, ">= 0");
  }
  if (lr_max) {
    check(*lr_max >= 0, "lr_max", *lr_max, ">= 0");
  }
  if (lr_min && lr_max) {
    check(*lr_min <= *lr_max, "lr_min", *lr_min, "<= lr_max");
  }
  TORCH_CHECK(lr_adaptation == "none" || lr_adaptation == "rpe_normalized" ||
                  lr_adaptation == "rpe_tracking",
              "Dopamine: invalid lr_adaptation: '",
              lr_adaptation,
              "' (expected none, rpe_normalized or rpe_tracking)");
  TORCH_CHECK(noise == "gaussian" || noise == "rademacher",
              "Dopamine: invalid noise: '",
              noise,
              "' (expected gaussian or rademacher)");
  TORCH_CHECK(non_finite_loss == "skip" || non_finite_loss == "raise",
              "Dopamine: invalid non_finite_loss: '",
              non_finite_loss,
              "' (expected skip or raise)");
}

}  // namespace

TORCH_LIBRARY_IMPL(dopamine, CompositeExplicitAutograd, m) {
  m.impl("adapt_lr", &adapt_lr_kernel);
  m.impl("check_options", &check_options_kernel);
}

}  // namespace dopamine::ops
