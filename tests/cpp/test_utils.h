#pragma once

// Helpers shared by the C++ tests: an independent, double-precision
// implementation of docs/DESIGN.md, "The algorithm", to compare the optimizer
// against, and the noise the ops draw.
#include <dopamine/dopamine.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "noise_oracle.h"

namespace dopamine::testing {

// A path in the temporary directory, unique to this process.
inline std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("dopamine_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// A group state whose next step is `step`.
inline torch::Tensor state_at(int64_t step) {
  auto state = torch::zeros({dopamine::ops::kGroupStateSize}, torch::kDouble);
  state[0] = static_cast<double>(step - 1);
  return state;
}

// dopamine::ops::move_ over one group of these noise options: its
// parameters come from carrying `carried` to carrying `to`.
inline void move(const std::vector<torch::Tensor>& params,
                 const torch::Tensor& state,
                 const std::vector<int64_t>& indices,
                 int64_t seed,
                 double sigma,
                 Noise kind = Noise::Gaussian,
                 ops::Perturbation carried = {0, 0},
                 ops::Perturbation to = {1, 0}) {
  ops::move_(
      params,
      {},
      {state},
      ops::pack_options(DopamineOptions().seed(seed).sigma(sigma).noise(kind)),
      indices,
      {static_cast<int64_t>(params.size())},
      carried,
      to);
}

// z_direction for tensor `index` at `step`: perturbing zeros by sigma = 1
// yields z exactly, so the test reads the noise without a second noise
// source.
inline torch::Tensor noise_of(const torch::Tensor& like,
                              int64_t seed,
                              int64_t step,
                              int64_t index,
                              Noise kind = Noise::Gaussian,
                              int64_t direction = 0) {
  auto noise = torch::zeros_like(like);
  move({noise},
       state_at(step),
       {index},
       seed,
       1.0,
       kind,
       {0, 0},
       {1, direction});
  return noise;
}

// noise_of() in float32, after checking every element against the oracle
// (noise_oracle.h), converted to like's dtype: what the references use.
inline torch::Tensor oracle_checked_noise(const torch::Tensor& like,
                                          int64_t seed,
                                          int64_t step,
                                          int64_t index,
                                          Noise kind) {
  const auto z =
      noise_of(torch::zeros(like.sizes(), like.options().dtype(torch::kFloat)),
               seed,
               step,
               index,
               kind);
  const auto flat = z.cpu().to(torch::kDouble).contiguous();
  const double* data = flat.data_ptr<double>();
  int64_t mismatches = 0;
  for (int64_t e = 0; e < flat.numel(); ++e) {
    const auto expected = oracle_noise(kind,
                                       seed,
                                       static_cast<uint32_t>(step),
                                       static_cast<uint32_t>(index),
                                       static_cast<uint64_t>(e));
    mismatches += !(std::abs(data[e] - expected.z) <= expected.tolerance);
  }
  EXPECT_EQ(mismatches, 0) << "the ops' noise differs from the oracle at seed "
                           << seed << ", step " << step << ", index " << index;
  return z.to(like.dtype());
}

using LossFn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// docs/DESIGN.md, "The algorithm", written out step by step, on copies of the
// parameters, with the noise checked against the oracle. A step whose losses
// or step sizes are not all finite is skipped: it counts in the noise's step,
// not in the bias correction's count of updates.
class ReferenceDopamine {
 public:
  struct Group {
    std::vector<torch::Tensor> theta;
    DopamineOptions options;
    int64_t first_index = 0;
    int64_t t = 0;        // steps, skipped ones included
    int64_t updates = 0;  // steps taken
    double m = 0, s = 0, eta = 0;
  };

  // The reference follows the paper's rule, one direction and no baseline
  // (docs/DESIGN.md, "The algorithm"); several directions and the baseline
  // are checked against the Python reference, and C++ against Python.
  void add_group(const std::vector<torch::Tensor>& params,
                 const DopamineOptions& options) {
    TORCH_CHECK(options.num_perturbations() == 1 && !options.beta_baseline(),
                "ReferenceDopamine follows one direction with no baseline");
    Group group{{}, options, first_index_};
    for (const auto& p : params) {
      group.theta.push_back(p.detach().clone());
    }
    first_index_ += static_cast<int64_t>(params.size());
    groups_.push_back(std::move(group));
  }

  // theta + offset * sigma * z of the next step (offset 0, 1 or -1).
  std::vector<torch::Tensor> all(int offset) const {
    std::vector<torch::Tensor> out;
    for (const auto& g : groups_) {
      for (size_t i = 0; i < g.theta.size(); ++i) {
        out.push_back(offset == 0 ? g.theta[i]
                                  : g.theta[i] + offset * g.options.sigma() *
                                                     noise(g, i, g.t + 1));
      }
    }
    return out;
  }

  // One step; returns L0, or with antithetic (L+ + L-) / 2.
  double step(const LossFn& loss, bool antithetic = false) {
    const double l0 = loss(all(antithetic ? 1 : 0)).item<double>();
    const double l1 = loss(all(antithetic ? -1 : 1)).item<double>();
    const double delta = antithetic ? (l0 - l1) / 2 : l1 - l0;
    struct Next {
      double m, s, eta;
    };
    std::vector<Next> next;
    bool finite = std::isfinite(delta);
    for (auto& g : groups_) {
      const auto& o = g.options;
      const int64_t n = g.updates + 1;
      Next x{g.m, g.s, o.lr()};
      if (o.lr_adaptation() == LrAdaptation::RpeNormalized) {
        x.m = o.beta() * g.m + (1 - o.beta()) * std::abs(delta) / o.sigma();
        x.eta = o.lr() / (x.m / (1 - std::pow(o.beta(), n)) + o.eps());
      } else if (o.lr_adaptation() == LrAdaptation::RpeTracking) {
        x.s = o.beta_s() * g.s + (1 - o.beta_s()) * std::abs(delta);
        const double previous = n == 1 ? o.lr() : g.eta;
        x.eta = (1 - o.beta_eta()) * previous + o.beta_eta() * x.s;
      }
      if (o.lr_min()) {
        x.eta = std::max(x.eta, *o.lr_min());
      }
      if (o.lr_max()) {
        x.eta = std::min(x.eta, *o.lr_max());
      }
      finite = finite && std::isfinite(x.m) && std::isfinite(x.s) &&
               std::isfinite(x.eta) && std::isfinite(x.eta * delta / o.sigma());
      next.push_back(x);
    }
    for (size_t k = 0; k < groups_.size(); ++k) {
      auto& g = groups_[k];
      const auto& o = g.options;
      g.t += 1;
      if (!finite) {
        continue;
      }
      g.updates += 1;
      g.m = next[k].m;
      g.s = next[k].s;
      g.eta = next[k].eta;
      for (size_t i = 0; i < g.theta.size(); ++i) {
        const auto grad_estimate = (delta / o.sigma()) * noise(g, i, g.t);
        g.theta[i] = g.theta[i] - g.eta * grad_estimate -
                     o.lr() * o.weight_decay() * g.theta[i];
      }
    }
    return antithetic ? (l0 + l1) / 2 : l0;
  }

  Group& group(size_t i) {
    return groups_.at(i);
  }

 private:
  torch::Tensor noise(const Group& g, size_t i, int64_t step) const {
    return oracle_checked_noise(g.theta[i],
                                g.options.seed(),
                                step,
                                g.first_index + i,
                                g.options.noise());
  }

  std::vector<Group> groups_;
  int64_t first_index_ = 0;
};

// A loss evaluation to replace: the step's (counted from 1) unperturbed
// (which 0) or perturbed (which 1) one, and the value returned instead.
struct BadCall {
  int step;
  int which;
  double value;
};

// `loss`, except at `bad_calls`. The reference and the optimizer each get
// one.
inline LossFn non_finite_at(LossFn loss, std::vector<BadCall> bad_calls) {
  auto calls = std::make_shared<int>(0);
  return [=](const std::vector<torch::Tensor>& params) {
    const int call = ++*calls;
    for (const auto& bad : bad_calls) {
      if (call == 2 * (bad.step - 1) + 1 + bad.which) {
        return torch::full({}, bad.value, params.front().options());
      }
    }
    return loss(params);
  };
}

// 0.5 * sum(a * p^2) + sum(b * p) over all tensors, a > 0: a convex quadratic
// with known gradient a * p + b.
struct Quadratic {
  std::vector<torch::Tensor> a, b;

  Quadratic(const std::vector<torch::IntArrayRef>& shapes,
            torch::Dtype dtype,
            uint64_t seed) {
    torch::manual_seed(seed);
    for (const auto& shape : shapes) {
      a.push_back(torch::rand(shape, dtype) + 0.5);
      b.push_back(torch::randn(shape, dtype));
    }
  }

  torch::Tensor operator()(const std::vector<torch::Tensor>& params) const {
    auto loss = torch::zeros({}, params.front().options());
    for (size_t i = 0; i < params.size(); ++i) {
      loss = loss + (0.5 * a[i].to(params[i].device()) * params[i].square() +
                     b[i].to(params[i].device()) * params[i])
                        .sum();
    }
    return loss;
  }
};

inline std::vector<torch::Tensor> clones(
    const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) {
    out.push_back(t.detach().clone().requires_grad_(t.requires_grad()));
  }
  return out;
}

inline bool bitwise_equal(const std::vector<torch::Tensor>& x,
                          const std::vector<torch::Tensor>& y) {
  if (x.size() != y.size()) {
    return false;
  }
  for (size_t i = 0; i < x.size(); ++i) {
    if (!torch::equal(x[i], y[i])) {
      return false;
    }
  }
  return true;
}

// The largest elementwise difference; NaN where any element differs by NaN
// (std::max would drop it), infinity for lists of different lengths, so
// that every EXPECT_LT / LE on the result fails.
inline double max_abs_diff(const std::vector<torch::Tensor>& x,
                           const std::vector<torch::Tensor>& y) {
  if (x.size() != y.size()) {
    return std::numeric_limits<double>::infinity();
  }
  double diff = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d =
        (x[i].to(torch::kDouble) - y[i].to(torch::kDouble).to(x[i].device()))
            .abs()
            .max()
            .item<double>();
    if (std::isnan(d)) {
      return d;
    }
    diff = std::max(diff, d);
  }
  return diff;
}

// Runs `fn`, expects a c10::Error whose message holds every piece of `parts`.
template <typename Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected a c10::Error mentioning " << parts.front();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const auto& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos)
          << "message lacks '" << part << "': " << message;
    }
  }
}

}  // namespace dopamine::testing
