// bench_flat_optimizer: torch::optim's own step() over ResNet-50's 161 parameter tensors
// (25,557,032 elements) beside mpu::FlatOptimizer::step() over the same parameters packed into
// one flat buffer (FlatBuffer, zero-copy), for SGD with momentum, Adam, AdamW, Adagrad and
// RMSprop, in fp32 and bf16, in the same run. Each time is the median over --iters steps after
// --warmup steps: wall clock around one step with the device synchronised before and after
// (so the flat step's host work counts), and on CUDA also the CUDA-event time of the step.
// Both optimizers start from the same parameters and see the same gradients, so their
// parameters must agree bit for bit afterwards; the "exact" column says whether they do.
// On CUDA it also times the fused step (one kernel per step; FlatOptimizerOptions::fused) on
// the same parameters for every optimizer, in fp32 and in bf16 master-weights mode (bf16
// gradients and parameters, fp32 master and state), beside the bytes that step must move (the
// gradient read, the master read and written, each state buffer read and written, the bf16
// parameter written) and the time a device-to-device copy of the same bytes takes on the same
// card, measured in the same run: the memory-bandwidth bound. The torch-operation rows above
// are the unfused flat step (fused = false), so their "exact" column still holds.
// Prints markdown tables and one JSON line; --json FILE also writes the JSON line to FILE.
// The goals: the flat step >= 10x faster than the plain step, on every row; the fused step
// within 1.3x of its bandwidth bound, on every row.
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_common.h"
#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/flat_buffer.h"
#include "mpu/flat_optimizer.h"
#include "mpu/version.h"

#if MPU_HAS_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace {

using mpu::bench::json_escape;
using mpu::bench::same_bits;

constexpr std::int64_t kResNet50Elements = 25557032;
constexpr std::int64_t kResNet50Tensors = 161;
constexpr double kGoalSpeedup = 10.0;
constexpr double kGoalBoundRatio = 1.3;

struct Options {
  int warmup = -1;  // -1: 10 on CUDA, 1 on CPU
  int iters = -1;   // -1: 50 on CUDA, 3 on CPU
  std::string json;
  std::string device = "auto";
  std::string only;  // run only optimizers whose name contains this
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--iters N] [--warmup N] [--device auto|cuda|cpu] [--only NAME] [--json FILE]\n"
      "Times torch::optim step() against mpu::FlatOptimizer::step() on ResNet-50's 161\n"
      "parameter tensors, for SGD momentum, Adam, AdamW, Adagrad and RMSprop, fp32 and bf16.\n",
      argv0);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      MPU_CHECK(i + 1 < argc, "bench_flat_optimizer: ", a, " needs a value");
      return argv[++i];
    };
    if (a == "--iters" || a == "--reps") {
      o.iters = std::stoi(value());
    } else if (a == "--warmup") {
      o.warmup = std::stoi(value());
    } else if (a == "--json") {
      o.json = value();
    } else if (a == "--device") {
      o.device = value();
    } else if (a == "--only") {
      o.only = value();
    } else if (a == "--help" || a == "-h") {
      usage(argv[0]);
      std::exit(0);
    } else {
      usage(argv[0]);
      MPU_THROW(mpu::InvalidArgument, "bench_flat_optimizer: unknown argument '", a, "'");
    }
  }
  return o;
}

// The parameter shapes of torchvision's resnet50(), in named_parameters() order: the stem
// (7x7 conv, batch norm), four stages of bottleneck blocks ([3, 4, 6, 3] blocks of widths 64,
// 128, 256, 512, expansion 4; the first block of a stage has a 1x1 downsample conv + bn), and
// the 2048 -> 1000 classifier. Convolutions have no bias; batch norms have weight and bias.
std::vector<std::vector<std::int64_t>> resnet50_shapes() {
  std::vector<std::vector<std::int64_t>> s;
  const auto conv = [&](std::int64_t out, std::int64_t in, std::int64_t k) {
    s.push_back({out, in, k, k});
  };
  const auto bn = [&](std::int64_t c) {
    s.push_back({c});
    s.push_back({c});
  };
  constexpr std::int64_t kExpansion = 4;
  conv(64, 3, 7);
  bn(64);
  const int blocks[4] = {3, 4, 6, 3};
  std::int64_t in = 64;
  for (int stage = 0; stage < 4; ++stage) {
    const std::int64_t width = std::int64_t{64} << stage;
    for (int b = 0; b < blocks[stage]; ++b) {
      conv(width, in, 1);
      bn(width);
      conv(width, width, 3);
      bn(width);
      conv(width * kExpansion, width, 1);
      bn(width * kExpansion);
      if (b == 0) {
        conv(width * kExpansion, in, 1);
        bn(width * kExpansion);
      }
      in = width * kExpansion;
    }
  }
  s.push_back({1000, in});
  s.push_back({1000});
  return s;
}

struct Timing {
  double wall_ms = 0;   // median, synchronised wall clock
  double event_ms = 0;  // median CUDA-event time (0 on CPU)
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class Timer {
 public:
  Timer(torch::Device device, const Options& o) : device_(device), o_(o) {}

  Timing time(const std::function<void()>& fn) const {
    for (int i = 0; i < o_.warmup; ++i) fn();
    std::vector<double> wall;
    std::vector<double> events;
    for (int i = 0; i < o_.iters; ++i) {
#if MPU_HAS_CUDA
      if (device_.is_cuda()) {
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
        cudaEvent_t start = nullptr;
        cudaEvent_t stop = nullptr;
        MPU_CUDA_CHECK(cudaEventCreate(&start));
        MPU_CUDA_CHECK(cudaEventCreate(&stop));
        MPU_CUDA_CHECK(cudaStreamSynchronize(stream));
        const auto t0 = std::chrono::steady_clock::now();
        MPU_CUDA_CHECK(cudaEventRecord(start, stream));
        fn();
        MPU_CUDA_CHECK(cudaEventRecord(stop, stream));
        MPU_CUDA_CHECK(cudaStreamSynchronize(stream));
        wall.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count());
        float ms = 0;
        MPU_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        events.push_back(ms);
        MPU_CUDA_CHECK(cudaEventDestroy(start));
        MPU_CUDA_CHECK(cudaEventDestroy(stop));
        continue;
      }
#endif
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      wall.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return Timing{median(wall), events.empty() ? 0.0 : median(events)};
  }

 private:
  torch::Device device_;
  const Options& o_;
};

using Factory = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

struct OptimizerConfig {
  std::string name;
  Factory make;
};

std::vector<OptimizerConfig> optimizer_configs() {
  namespace optim = torch::optim;
  return {
      {"SGD momentum",
       [](std::vector<torch::Tensor> p) -> std::unique_ptr<optim::Optimizer> {
         return std::make_unique<optim::SGD>(
             std::move(p), optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4));
       }},
      {"Adam",
       [](std::vector<torch::Tensor> p) -> std::unique_ptr<optim::Optimizer> {
         return std::make_unique<optim::Adam>(std::move(p), optim::AdamOptions(1e-3));
       }},
      {"AdamW",
       [](std::vector<torch::Tensor> p) -> std::unique_ptr<optim::Optimizer> {
         return std::make_unique<optim::AdamW>(std::move(p), optim::AdamWOptions(1e-3));
       }},
      {"Adagrad",
       [](std::vector<torch::Tensor> p) -> std::unique_ptr<optim::Optimizer> {
         return std::make_unique<optim::Adagrad>(std::move(p), optim::AdagradOptions(1e-2));
       }},
      {"RMSprop",
       [](std::vector<torch::Tensor> p) -> std::unique_ptr<optim::Optimizer> {
         return std::make_unique<optim::RMSprop>(std::move(p), optim::RMSpropOptions(1e-2));
       }},
  };
}

struct Row {
  std::string dtype;
  std::string optimizer;
  Timing plain;
  Timing flat;
  bool exact = false;
  double speedup() const { return plain.wall_ms / flat.wall_ms; }
};

Row run(const OptimizerConfig& c, torch::Dtype dtype, torch::Device device, const Timer& timer) {
  const auto opts = torch::TensorOptions().dtype(dtype).device(device);
  // Two identical sets of parameters and gradients: one stepped by the plain optimizer, one
  // packed into flat buffers and stepped by FlatOptimizer.
  std::vector<torch::Tensor> plain;
  std::vector<torch::Tensor> flat;
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(0);
    for (const auto& shape : resnet50_shapes()) {
      torch::Tensor p = torch::randn(shape, opts);
      torch::Tensor g = torch::randn(shape, opts).mul_(1e-2);
      p.mutable_grad() = g;
      plain.push_back(p);
      torch::Tensor q = p.clone();
      q.mutable_grad() = g.clone();
      flat.push_back(q);
    }
  }
  mpu::FlatBufferOptions fo;
  fo.dtype = dtype;
  fo.zero_copy = mpu::ZeroCopy::kOn;
  mpu::FlatBuffer buffer(flat, fo);
  MPU_CHECK(buffer.numel() == kResNet50Elements && buffer.size() == kResNet50Tensors,
            "bench_flat_optimizer: the ResNet-50 layout has ", buffer.size(), " tensors and ",
            buffer.numel(), " elements, expected ", kResNet50Tensors, " and ", kResNet50Elements);

  auto plain_opt = c.make(plain);
  auto flat_opt = c.make(flat);
  mpu::FlatOptimizerOptions unfused;
  unfused.fused = false;
  mpu::FlatOptimizer flat_step(*flat_opt, buffer.flat_data(), buffer.flat_grad(), 0, -1, unfused);

  Row row;
  row.dtype = dtype == torch::kFloat ? "fp32" : "bf16";
  row.optimizer = c.name;
  row.plain = timer.time([&] { plain_opt->step(); });
  row.flat = timer.time([&] { flat_step.step(); });
  // The same number of steps from the same start with the same gradients.
  std::vector<torch::Tensor> parts;
  for (const auto& p : plain) parts.push_back(p.detach().reshape({-1}));
  row.exact = same_bits(torch::cat(parts).cpu(), buffer.flat_data().cpu());
  return row;
}

// --- The fused step against the bandwidth bound ---------------------------------------------

struct FusedRow {
  std::string mode;  // "fp32" or "bf16 master"
  std::string optimizer;
  Timing fused;
  std::int64_t bytes = 0;  // what one step must read and write
  double bound_ms = 0;     // bytes at the measured copy bandwidth
  double ratio() const { return fused.event_ms / bound_ms; }
};

// The device-to-device copy bandwidth (bytes read + bytes written per second) of a buffer of
// `bytes` bytes, timed with the same timer as the steps.
double copy_bandwidth(std::int64_t bytes, torch::Device device, const Timer& timer) {
  const auto opts = torch::TensorOptions().dtype(torch::kUInt8).device(device);
  torch::Tensor src = torch::ones({bytes}, opts);
  torch::Tensor dst = torch::empty({bytes}, opts);
  const Timing t = timer.time([&] { dst.copy_(src); });
  return 2.0 * static_cast<double>(bytes) / (t.event_ms * 1e-3);
}

FusedRow run_fused(const OptimizerConfig& c, bool master, torch::Device device, const Timer& timer,
                   double copy_bytes_per_s) {
  const torch::Dtype dtype = master ? torch::kBFloat16 : torch::kFloat;
  const auto opts = torch::TensorOptions().dtype(dtype).device(device);
  std::vector<torch::Tensor> params;
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(0);
    for (const auto& shape : resnet50_shapes()) {
      torch::Tensor p = torch::randn(shape, opts);
      p.mutable_grad() = torch::randn(shape, opts).mul_(1e-2);
      params.push_back(p);
    }
  }
  mpu::FlatBufferOptions fo;
  fo.dtype = dtype;
  fo.zero_copy = mpu::ZeroCopy::kOn;
  mpu::FlatBuffer buffer(params, fo);
  auto opt = c.make(params);
  mpu::FlatOptimizerOptions options;
  torch::Tensor flat_param = buffer.flat_data();
  if (master) {
    options.model_param = buffer.flat_data();
    flat_param = buffer.flat_data().to(torch::kFloat);
  }
  mpu::FlatOptimizer step(*opt, flat_param, buffer.flat_grad(), 0, -1, options);
  MPU_CHECK(step.fused(), "bench_flat_optimizer: the fused step is not in use for ", c.name);

  FusedRow row;
  row.mode = master ? "bf16 master" : "fp32";
  row.optimizer = c.name;
  row.fused = timer.time([&] { step.step(); });
  // Per element: the gradient read; the master read and written; each state buffer read and
  // written (SGD's momentum buffer is read from the second step on, which the warm-up passes);
  // the bf16 parameter written.
  const std::int64_t n = buffer.numel();
  const auto state_buffers = static_cast<std::int64_t>(step.state_names().size());
  const std::int64_t grad_bytes = static_cast<std::int64_t>(buffer.flat_grad().element_size());
  row.bytes = n * (grad_bytes + 2 * 4 + state_buffers * 2 * 4 + (master ? 2 : 0));
  row.bound_ms = static_cast<double>(row.bytes) / copy_bytes_per_s * 1e3;
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o = parse(argc, argv);
    const torch::Device device = mpu::bench::pick_device(o.device, "bench_flat_optimizer");
    const bool cuda = device.is_cuda();
    if (o.warmup < 0) o.warmup = cuda ? 10 : 1;
    if (o.iters < 0) o.iters = cuda ? 50 : 3;
    MPU_CHECK(o.iters > 0 && o.warmup >= 0,
              "bench_flat_optimizer: --iters must be > 0 and --warmup >= 0, got ", o.iters, " and ",
              o.warmup);

    std::int64_t elements = 0;
    const auto shapes = resnet50_shapes();
    for (const auto& shape : shapes) {
      std::int64_t k = 1;
      for (const auto d : shape) k *= d;
      elements += k;
    }
    MPU_CHECK(elements == kResNet50Elements &&
                  static_cast<std::int64_t>(shapes.size()) == kResNet50Tensors,
              "bench_flat_optimizer: the ResNet-50 shape list has ", shapes.size(), " tensors and ",
              elements, " elements, expected ", kResNet50Tensors, " and ", kResNet50Elements);

    std::string card = "CPU";
#if MPU_HAS_CUDA
    if (cuda) {
      cudaDeviceProp prop{};
      MPU_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
      card = prop.name;
    }
#endif

    const Timer timer(device, o);
    std::vector<Row> rows;
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      for (const auto& c : optimizer_configs()) {
        if (!o.only.empty() && c.name.find(o.only) == std::string::npos) continue;
        rows.push_back(run(c, dtype, device, timer));
        std::fflush(stdout);
      }
    }

    std::vector<FusedRow> fused_rows;
    double copy_bytes_per_s = 0;
    if (cuda) {
      // A copy of the fp32 master's size: 2 x 102 MB moved, as large as the step's buffers.
      copy_bytes_per_s = copy_bandwidth(elements * 4, device, timer);
      for (const bool master : {false, true}) {
        for (const auto& c : optimizer_configs()) {
          if (!o.only.empty() && c.name.find(o.only) == std::string::npos) continue;
          fused_rows.push_back(run_fused(c, master, device, timer, copy_bytes_per_s));
          std::fflush(stdout);
        }
      }
    }

    std::printf(
        "## torch::optim step() vs FlatOptimizer::step(), ResNet-50 parameters "
        "(%lld tensors, %lld elements)\n\n",
        static_cast<long long>(kResNet50Tensors), static_cast<long long>(elements));
    std::printf(
        "Device: %s. LibTorch %s. %s. Median of %d steps after %d warm-up; wall clock with the "
        "device synchronised around each step%s.\n\n",
        card.c_str(), TORCH_VERSION, mpu::build_info().c_str(), o.iters, o.warmup,
        cuda ? " (CUDA-event times in parentheses)" : "");
    std::printf("| dtype | optimizer | plain step (ms) | flat step (ms) | speed-up | exact |\n");
    std::printf("|---|---|---:|---:|---:|---|\n");
    bool all_met = !rows.empty();
    for (const auto& r : rows) {
      if (cuda) {
        std::printf("| %s | %s | %.3f (%.3f) | %.3f (%.3f) | %.1fx | %s |\n", r.dtype.c_str(),
                    r.optimizer.c_str(), r.plain.wall_ms, r.plain.event_ms, r.flat.wall_ms,
                    r.flat.event_ms, r.speedup(), r.exact ? "yes" : "no");
      } else {
        std::printf("| %s | %s | %.3f | %.3f | %.1fx | %s |\n", r.dtype.c_str(),
                    r.optimizer.c_str(), r.plain.wall_ms, r.flat.wall_ms, r.speedup(),
                    r.exact ? "yes" : "no");
      }
      all_met = all_met && r.speedup() >= kGoalSpeedup;
    }
    std::printf("\nGoal: the flat step >= %.0fx faster than the plain step on every row: %s.\n",
                kGoalSpeedup, all_met ? "met" : "not met");

    bool bound_met = !fused_rows.empty();
    if (cuda) {
      std::printf(
          "\n## Fused step (one kernel) vs the memory-bandwidth bound, ResNet-50 parameters\n\n"
          "Bound: the bytes the step must read and write at the device-to-device copy bandwidth "
          "measured in this run (%.1f GB/s, read + write, on a %.1f MB buffer). fp32: fp32 "
          "gradients, parameters and state. bf16 master: bf16 gradients and parameters, fp32 "
          "master and state. Times are CUDA-event medians (wall clock in parentheses).\n\n",
          copy_bytes_per_s * 1e-9, static_cast<double>(elements * 4) * 1e-6);
      std::printf(
          "| mode | optimizer | fused step (ms) | bytes (MB) | bound (ms) | time / bound |\n");
      std::printf("|---|---|---:|---:|---:|---:|\n");
      for (const auto& r : fused_rows) {
        std::printf("| %s | %s | %.3f (%.3f) | %.1f | %.3f | %.2fx |\n", r.mode.c_str(),
                    r.optimizer.c_str(), r.fused.event_ms, r.fused.wall_ms,
                    static_cast<double>(r.bytes) * 1e-6, r.bound_ms, r.ratio());
        bound_met = bound_met && r.ratio() <= kGoalBoundRatio;
      }
      std::printf("\nGoal: the fused step within %.1fx of the bound on every row: %s.\n",
                  kGoalBoundRatio, bound_met ? "met" : "not met");
    }

    std::ostringstream js;
    js << "{\"bench\":\"flat_optimizer\",\"device\":\"" << json_escape(card) << "\",\"torch\":\""
       << TORCH_VERSION << "\",\"tensors\":" << kResNet50Tensors << ",\"elements\":" << elements
       << ",\"iters\":" << o.iters << ",\"warmup\":" << o.warmup << ",\"results\":[";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      js << (i ? "," : "") << "{\"dtype\":\"" << r.dtype << "\",\"optimizer\":\""
         << json_escape(r.optimizer) << "\",\"plain_ms\":" << r.plain.wall_ms
         << ",\"flat_ms\":" << r.flat.wall_ms << ",\"plain_event_ms\":" << r.plain.event_ms
         << ",\"flat_event_ms\":" << r.flat.event_ms << ",\"speedup\":" << r.speedup()
         << ",\"exact\":" << (r.exact ? "true" : "false") << "}";
    }
    js << "],\"goal_speedup\":" << kGoalSpeedup << ",\"goal_met\":" << (all_met ? "true" : "false");
    js << ",\"copy_gbps\":" << copy_bytes_per_s * 1e-9 << ",\"fused\":[";
    for (std::size_t i = 0; i < fused_rows.size(); ++i) {
      const auto& r = fused_rows[i];
      js << (i ? "," : "") << "{\"mode\":\"" << r.mode << "\",\"optimizer\":\""
         << json_escape(r.optimizer) << "\",\"fused_ms\":" << r.fused.wall_ms
         << ",\"fused_event_ms\":" << r.fused.event_ms << ",\"bytes\":" << r.bytes
         << ",\"bound_ms\":" << r.bound_ms << ",\"ratio\":" << r.ratio() << "}";
    }
    js << "],\"goal_bound_ratio\":" << kGoalBoundRatio
       << ",\"bound_goal_met\":" << (bound_met ? "true" : "false") << "}";
    std::printf("\n%s\n", js.str().c_str());
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      MPU_CHECK(f.good(), "bench_flat_optimizer: cannot write --json ", o.json);
      f << js.str() << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_flat_optimizer: %s\n", e.what());
    return 1;
  }
}
