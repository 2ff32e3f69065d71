// Where the time of a fused CPU op goes, on one thread, per 1e7 float32
// elements: Philox alone, a tile's noise (Philox + the normal transform, or
// the Rademacher signs), and the whole move_ op (noise + reading and
// writing the parameters), on the widest CPU path (noise_tiles.h); and the
// optimizer's step from C++ (its evaluations computing nothing) on 1e7
// elements as 5, 200 or 2000 tensors.
//   dopamine_bench_noise [out.json]
// Prints a table; with a path, also writes the figures as JSON, which
// benchmarks/python/run_suite.py --noise-json adds to the report's ops
// section.
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <dopamine/ops.h>
#include <dopamine/optimizer.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ops/cpu/noise_tiles.h"

namespace {

using dopamine::ops::cpu::NoiseStream;
namespace cpu = dopamine::ops::cpu;
namespace noise = dopamine::noise;

constexpr int64_t kElements = 10'000'000;
constexpr int64_t kTiles = kElements / noise::kTile;
constexpr int kRepeats = 15;

// Keeps the compiler from dropping work whose result is otherwise unused.
volatile float sink;

double median_ms(const std::function<void()>& run) {
  run();
  std::vector<double> times;
  for (int i = 0; i < kRepeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    times.push_back(std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - start)
                        .count());
  }
  std::nth_element(times.begin(), times.begin() + kRepeats / 2, times.end());
  return times[kRepeats / 2];
}

NoiseStream stream_of(noise::Kind kind) {
  return {kind, noise::key_of(0), 0, 1};
}

// Philox of every Gaussian counter of kTiles tiles.
double philox_ms() {
  const NoiseStream stream = stream_of(noise::Kind::Gaussian);
  return median_ms([&] {
    cpu::on_path(cpu::cpu_path(), [&](auto lanes) DOPAMINE_PATH_BODY {
      uint32_t mixed = 0;
      for (int64_t tile = 0; tile < kTiles; ++tile) {
        uint32_t c0[noise::kLanes], c1[noise::kLanes], c2[noise::kLanes],
            c3[noise::kLanes];
        cpu::gaussian_counters(stream, tile, c0, c1, c2, c3);
        decltype(lanes)::philox(c0, c1, c2, c3, stream.key);
        mixed ^= c0[tile % noise::kLanes] ^ c3[(tile + 7) % noise::kLanes];
      }
      sink = static_cast<float>(mixed);
    });
  });
}

// The noise of kTiles tiles into a stack buffer, as the kernels draw it.
double noise_ms(noise::Kind kind) {
  const NoiseStream stream = stream_of(kind);
  return median_ms([&] {
    cpu::on_path(cpu::cpu_path(), [&](auto lanes) DOPAMINE_PATH_BODY {
      alignas(64) float z[noise::kTile];
      float sum = 0.0f;
      for (int64_t tile = 0; tile < kTiles; ++tile) {
        cpu::fill_tile<decltype(lanes)::philox>(stream, tile, z);
        sum += z[tile % noise::kTile];
      }
      sink = sum;
    });
  });
}

// move_ (one pass) over kElements float32 elements in 4 tensors.
double move_ms(dopamine::Noise kind) {
  std::vector<at::Tensor> params;
  for (int i = 0; i < 4; ++i) {
    params.push_back(at::zeros({kElements / 4}));
  }
  const auto state = at::zeros({dopamine::ops::kGroupStateSize}, at::kDouble);
  const auto options = dopamine::ops::pack_options(
      dopamine::DopamineOptions().sigma(1e-3).noise(kind));
  return median_ms([&] {
    dopamine::ops::move_(
        params, {}, {state}, options, {0, 1, 2, 3}, {4}, {0, 0}, {1, 0});
  });
}

// The same 1e7 elements as few large or many small tensors.
struct Layout {
  int64_t count, size;
};
constexpr Layout kLayouts[] = {{5, 2'000'000}, {200, 50'000}, {2000, 5'000}};

// The optimizer's step (dopamine::Dopamine::step with the default
// options but the noise, and a closure that computes nothing) on each
// layout of kLayouts, interleaved: one step of each layout per round,
// medians over rounds.
std::vector<double> layout_ms(dopamine::Noise kind) {
  std::vector<std::unique_ptr<dopamine::Dopamine>> optimizers;
  for (const auto& layout : kLayouts) {
    std::vector<at::Tensor> params;
    for (int64_t i = 0; i < layout.count; ++i) {
      params.push_back(at::zeros({layout.size}).requires_grad_());
    }
    optimizers.push_back(std::make_unique<dopamine::Dopamine>(
        params, dopamine::DopamineOptions().noise(kind)));
  }
  // Losses that differ, so that every step moves the parameters.
  int64_t evaluations = 0;
  const auto closure = [&] {
    return at::scalar_tensor(1.0 +
                             1e-6 * static_cast<double>(evaluations++ % 3));
  };
  std::vector<std::vector<double>> times(std::size(kLayouts));
  for (auto& optimizer : optimizers) {
    optimizer->step(closure);
  }
  for (int r = 0; r < kRepeats; ++r) {
    for (size_t l = 0; l < std::size(kLayouts); ++l) {
      const auto start = std::chrono::steady_clock::now();
      optimizers[l]->step(closure);
      times[l].push_back(std::chrono::duration<double, std::milli>(
                             std::chrono::steady_clock::now() - start)
                             .count());
    }
  }
  std::vector<double> medians;
  for (auto& t : times) {
    std::nth_element(t.begin(), t.begin() + kRepeats / 2, t.end());
    medians.push_back(t[kRepeats / 2]);
  }
  return medians;
}

}  // namespace

int main(int argc, char** argv) {
  // The layouts on the default thread count; the breakdown on one thread.
  const int threads = at::get_num_threads();
  const auto layouts_gaussian = layout_ms(dopamine::Noise::Gaussian);
  const auto layouts_rademacher = layout_ms(dopamine::Noise::Rademacher);
  at::set_num_threads(1);
  const double philox = philox_ms();
  const double gaussian = noise_ms(noise::Kind::Gaussian);
  const double rademacher = noise_ms(noise::Kind::Rademacher);
  const double move_gaussian = move_ms(dopamine::Noise::Gaussian);
  const double move_rademacher = move_ms(dopamine::Noise::Rademacher);
  const struct {
    const char* name;
    double ms;
  } rows[] = {
      {"philox", philox},
      {"box_muller", gaussian - philox},
      {"gaussian_noise", gaussian},
      {"move_gaussian", move_gaussian},
      {"memory_and_update_gaussian", move_gaussian - gaussian},
      {"rademacher_noise", rademacher},
      {"move_rademacher", move_rademacher},
  };
  const char* path = cpu::to_string(cpu::cpu_path());
  std::printf("ms per 1e7 float32 elements, one thread, %s path\n", path);
  for (const auto& row : rows) {
    std::printf("%-28s %8.2f\n", row.name, row.ms);
  }
  std::printf(
      "Dopamine::step on 1e7 elements, %d threads, ms (ratio to the "
      "first layout)\n",
      threads);
  for (size_t l = 0; l < std::size(kLayouts); ++l) {
    std::printf(
        "%5lld x %-9lld gaussian %8.2f (%.2fx)  rademacher %8.2f "
        "(%.2fx)\n",
        static_cast<long long>(kLayouts[l].count),
        static_cast<long long>(kLayouts[l].size),
        layouts_gaussian[l],
        layouts_gaussian[l] / layouts_gaussian[0],
        layouts_rademacher[l],
        layouts_rademacher[l] / layouts_rademacher[0]);
  }
  if (argc > 1) {
    std::ofstream out(argv[1]);
    out << "{\"elements\": " << kElements << ", \"threads\": 1, \"path\": \""
        << path << "\", \"ms\": {";
    for (size_t i = 0; i < std::size(rows); ++i) {
      out << (i ? ", " : "") << '"' << rows[i].name << "\": " << rows[i].ms;
    }
    out << "}, \"layout_threads\": " << threads << ", \"layouts\": {";
    for (size_t l = 0; l < std::size(kLayouts); ++l) {
      out << (l ? ", " : "") << '"' << kLayouts[l].count << 'x'
          << kLayouts[l].size << "\": {\"gaussian\": " << layouts_gaussian[l]
          << ", \"rademacher\": " << layouts_rademacher[l] << '}';
    }
    out << "}}\n";
  }
  return 0;
}
