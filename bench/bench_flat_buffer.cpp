// bench_flat_buffer: how fast FlatBuffer packs and unpacks ResNet-50's gradients (161 tensors,
// 25.6 M elements), beside what it replaces:
//   (a) a device-to-device copy of the same flat buffer: the bandwidth roofline;
//   (b) the straightforward LibTorch ways: torch::cat of flattened views, and one copy_ per
//       tensor into (or out of) a preallocated flat buffer;
//   (c) the seed's kernel: one thread per element, which finds its tensor by binary search.
// Times are medians over many repetitions after a warm-up, taken with CUDA events on the
// current stream (std::chrono on CPU). Prints a markdown table and one JSON line; --json FILE
// also writes the JSON line to FILE. The goal: gather and scatter at >= 90% of the copy's GB/s
// and >= 3x faster than the faster LibTorch way, in fp32 and in fp16.
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_common.h"
#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/flat_buffer.h"
#include "mpu/version.h"

#if MPU_HAS_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "bench/reference_kernels.h"
#endif

namespace {

using mpu::bench::json_escape;
using mpu::bench::same_bits;

struct Options {
  int warmup = -1;  // -1: 20 on CUDA, 2 on CPU
  int reps = -1;    // -1: 200 on CUDA, 10 on CPU
  std::string json;
  std::string device = "auto";
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--reps N] [--warmup N] [--device auto|cuda|cpu] [--json FILE]\n"
      "Times FlatBuffer gather/scatter on ResNet-50's 161 parameter tensors against a D2D copy,\n"
      "LibTorch's cat and per-tensor copy_, and a per-element binary-search kernel.\n",
      argv0);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      MPU_CHECK(i + 1 < argc, "bench_flat_buffer: ", a, " needs a value");
      return argv[++i];
    };
    if (a == "--reps") {
      o.reps = std::stoi(value());
    } else if (a == "--warmup") {
      o.warmup = std::stoi(value());
    } else if (a == "--json") {
      o.json = value();
    } else if (a == "--device") {
      o.device = value();
    } else if (a == "--help" || a == "-h") {
      usage(argv[0]);
      std::exit(0);
    } else {
      usage(argv[0]);
      MPU_THROW(mpu::InvalidArgument, "bench_flat_buffer: unknown argument '", a, "'");
    }
  }
  return o;
}

// torchvision's resnet50(): named_parameters() names and shapes, in its order.
std::vector<std::pair<std::string, std::vector<std::int64_t>>> resnet50_shapes() {
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> s;
  const auto conv = [&](const std::string& name, std::int64_t out, std::int64_t in,
                        std::int64_t k) {
    s.push_back({name + ".weight", {out, in, k, k}});
  };
  const auto bn = [&](const std::string& name, std::int64_t c) {
    s.push_back({name + ".weight", {c}});
    s.push_back({name + ".bias", {c}});
  };
  conv("conv1", 64, 3, 7);
  bn("bn1", 64);
  const int blocks[4] = {3, 4, 6, 3};
  const std::int64_t widths[4] = {64, 128, 256, 512};
  std::int64_t in = 64;
  for (int l = 0; l < 4; ++l) {
    for (int b = 0; b < blocks[l]; ++b) {
      const std::string p = "layer" + std::to_string(l + 1) + "." + std::to_string(b);
      const std::int64_t w = widths[l];
      conv(p + ".conv1", w, in, 1);
      bn(p + ".bn1", w);
      conv(p + ".conv2", w, w, 3);
      bn(p + ".bn2", w);
      conv(p + ".conv3", 4 * w, w, 1);
      bn(p + ".bn3", 4 * w);
      if (b == 0) {
        conv(p + ".downsample.0", 4 * w, in, 1);
        bn(p + ".downsample.1", 4 * w);
      }
      in = 4 * w;
    }
  }
  s.push_back({"fc.weight", {1000, 2048}});
  s.push_back({"fc.bias", {1000}});
  return s;
}

// Median milliseconds of fn over o.reps runs after o.warmup runs.
class Timer {
 public:
  Timer(torch::Device device, const Options& o) : device_(device), o_(o) {}

  double median_ms(const std::function<void()>& fn) const {
    std::vector<double> ms(static_cast<std::size_t>(o_.reps));
    if (device_.is_cuda()) {
#if MPU_HAS_CUDA
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
      for (int i = 0; i < o_.warmup; ++i) fn();
      std::vector<cudaEvent_t> start(ms.size());
      std::vector<cudaEvent_t> stop(ms.size());
      for (std::size_t i = 0; i < ms.size(); ++i) {
        MPU_CUDA_CHECK(cudaEventCreate(&start[i]));
        MPU_CUDA_CHECK(cudaEventCreate(&stop[i]));
      }
      MPU_CUDA_CHECK(cudaStreamSynchronize(stream));
      for (std::size_t i = 0; i < ms.size(); ++i) {
        MPU_CUDA_CHECK(cudaEventRecord(start[i], stream));
        fn();
        MPU_CUDA_CHECK(cudaEventRecord(stop[i], stream));
      }
      MPU_CUDA_CHECK(cudaStreamSynchronize(stream));
      for (std::size_t i = 0; i < ms.size(); ++i) {
        float t = 0;
        MPU_CUDA_CHECK(cudaEventElapsedTime(&t, start[i], stop[i]));
        ms[i] = t;
        MPU_CUDA_CHECK(cudaEventDestroy(start[i]));
        MPU_CUDA_CHECK(cudaEventDestroy(stop[i]));
      }
#endif
    } else {
      for (int i = 0; i < o_.warmup; ++i) fn();
      for (auto& m : ms) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        m = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count();
      }
    }
    std::sort(ms.begin(), ms.end());
    const std::size_t n = ms.size();
    return n % 2 == 1 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  }

 private:
  torch::Device device_;
  const Options& o_;
};

struct Row {
  std::string config;  // "fp32", "fp16", "fp16->fp32"
  std::string op;      // "gather", "scatter", "copy"
  std::string impl;    // "flat kernel", "D2D copy", ...
  double ms = 0;
  double bytes = 0;  // read + written
  double gbps() const { return bytes / (ms * 1e-3) / 1e9; }
};

struct Config {
  std::string name;
  torch::Dtype param;
  torch::Dtype wire;
  bool goal;  // part of the benchmark's goal
};

struct Verdict {
  std::string config;
  std::string op;
  double vs_copy = 0;      // GB/s over the copy's GB/s
  double vs_libtorch = 0;  // the faster LibTorch way's time over ours
  bool met = false;
};

#if MPU_HAS_CUDA
mpu::kernels::FlatDtype kernel_dtype(torch::Dtype d) {
  return d == torch::kFloat  ? mpu::kernels::FlatDtype::kFloat32
         : d == torch::kHalf ? mpu::kernels::FlatDtype::kFloat16
                             : mpu::kernels::FlatDtype::kBFloat16;
}
#endif

void run_config(const Config& c, torch::Device device, const Timer& timer, std::vector<Row>& rows,
                std::vector<Verdict>& verdicts) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const auto popts = torch::TensorOptions().dtype(c.param).device(device);
  const auto wopts = torch::TensorOptions().dtype(c.wire).device(device);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  std::vector<torch::Tensor> grads;
  std::vector<std::int64_t> offsets = {0};
  for (const auto& [name, shape] : resnet50_shapes()) {
    torch::Tensor p = torch::randn(shape, popts);
    p.mutable_grad() = torch::randn(shape, popts);
    grads.push_back(p.grad());
    named.emplace_back(name, p);
    offsets.push_back(offsets.back() + p.numel());
  }
  mpu::FlatBuffer fb(named);
  const std::int64_t n = fb.numel();
  const double pbytes = static_cast<double>(n) * torch::elementSize(c.param);
  const double wbytes = static_cast<double>(n) * torch::elementSize(c.wire);
  torch::Tensor flat = torch::empty({n}, wopts);
  torch::Tensor flat2 = torch::empty({n}, wopts);

  const auto add = [&](const char* op, const char* impl, double bytes,
                       const std::function<void()>& fn) {
    rows.push_back(Row{c.name, op, impl, timer.median_ms(fn), bytes});
    return rows.back();
  };

  // Correctness first: the flat kernel must match torch::cat bit for bit.
  const auto cat_gather = [&] {
    std::vector<torch::Tensor> parts;
    parts.reserve(grads.size());
    for (const auto& g : grads) parts.push_back(g.view({-1}).to(c.wire));
    return torch::cat(parts);
  };
  fb.gather_into(mpu::FlatTarget::kGrad, flat);
  MPU_CHECK(same_bits(flat.cpu(), cat_gather().cpu()),
            "bench_flat_buffer: FlatBuffer::gather_into disagrees with torch::cat (", c.name, ")");

  const bool gpu = device.is_cuda();
  const Row copy = add(
      "copy", gpu ? "D2D copy of the flat buffer" : "memcpy of the flat buffer", 2 * wbytes, [&] {
#if MPU_HAS_CUDA
        if (device.is_cuda()) {
          MPU_CUDA_CHECK(cudaMemcpyAsync(flat2.data_ptr(), flat.data_ptr(),
                                         static_cast<std::size_t>(wbytes), cudaMemcpyDeviceToDevice,
                                         c10::cuda::getCurrentCUDAStream(device.index()).stream()));
          return;
        }
#endif
        std::memcpy(flat2.data_ptr(), flat.data_ptr(), static_cast<std::size_t>(wbytes));
      });

  const Row gather =
      add("gather",
          gpu ? "FlatBuffer::gather_into (flat kernel)" : "FlatBuffer::gather_into (CPU path)",
          pbytes + wbytes, [&] { fb.gather_into(mpu::FlatTarget::kGrad, flat); });
  const Row cat = add("gather", "LibTorch torch::cat of flattened views", pbytes + wbytes,
                      [&] { (void)cat_gather(); });
  const Row copies = add("gather", "LibTorch copy_ per tensor", pbytes + wbytes, [&] {
    for (std::size_t i = 0; i < grads.size(); ++i) {
      flat.narrow(0, offsets[i], offsets[i + 1] - offsets[i]).copy_(grads[i].view({-1}));
    }
  });

  const Row scatter =
      add("scatter", gpu ? "FlatBuffer::scatter (flat kernel)" : "FlatBuffer::scatter (CPU path)",
          pbytes + wbytes, [&] { fb.scatter(flat, mpu::FlatTarget::kGrad); });
  const Row uncopies = add("scatter", "LibTorch copy_ per tensor", pbytes + wbytes, [&] {
    for (std::size_t i = 0; i < grads.size(); ++i) {
      grads[i].view({-1}).copy_(flat.narrow(0, offsets[i], offsets[i + 1] - offsets[i]));
    }
  });

#if MPU_HAS_CUDA
  if (device.is_cuda()) {
    std::vector<std::int64_t> ptrs;
    std::vector<std::int32_t> dtypes;
    for (const auto& g : grads) {
      ptrs.push_back(static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(g.data_ptr())));
      dtypes.push_back(static_cast<std::int32_t>(kernel_dtype(c.param)));
    }
    const torch::Tensor d_ptrs = torch::tensor(ptrs, torch::kLong).to(device);
    const torch::Tensor d_dtypes = torch::tensor(dtypes, torch::kInt).to(device);
    const torch::Tensor d_offsets = torch::tensor(offsets, torch::kLong).to(device);
    const auto num = static_cast<int>(grads.size());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    flat2.zero_();  // so that the check below sees the reference kernel's own output
    add("gather", "per-element binary search (seed-like reference)", pbytes + wbytes, [&] {
      MPU_CUDA_CHECK(mpu::kernels::flat_gather_bsearch_reference(
          static_cast<const void* const*>(d_ptrs.data_ptr()),
          static_cast<const mpu::kernels::FlatDtype*>(d_dtypes.data_ptr()),
          d_offsets.data_ptr<std::int64_t>(), num, flat2.data_ptr(), kernel_dtype(c.wire), n,
          stream));
    });
    MPU_CHECK(same_bits(flat2.cpu(), flat.cpu()),
              "bench_flat_buffer: the reference kernel disagrees with the flat kernel");
    add("scatter", "per-element binary search (seed-like reference)", pbytes + wbytes, [&] {
      MPU_CUDA_CHECK(mpu::kernels::flat_scatter_bsearch_reference(
          static_cast<void* const*>(d_ptrs.data_ptr()),
          static_cast<const mpu::kernels::FlatDtype*>(d_dtypes.data_ptr()),
          d_offsets.data_ptr<std::int64_t>(), num, flat.data_ptr(), kernel_dtype(c.wire), n,
          stream));
    });
  }
#endif

  if (!c.goal) return;
  const double libtorch_gather = std::min(cat.ms, copies.ms);
  verdicts.push_back(
      Verdict{c.name, "gather", gather.gbps() / copy.gbps(), libtorch_gather / gather.ms, false});
  verdicts.push_back(
      Verdict{c.name, "scatter", scatter.gbps() / copy.gbps(), uncopies.ms / scatter.ms, false});
  for (auto& v : verdicts) v.met = v.vs_copy >= 0.9 && v.vs_libtorch >= 3.0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o = parse(argc, argv);
    const torch::Device device = mpu::bench::pick_device(o.device, "bench_flat_buffer");
    const bool cuda = device.is_cuda();
    if (o.warmup < 0) o.warmup = cuda ? 20 : 2;
    if (o.reps < 0) o.reps = cuda ? 200 : 10;
    MPU_CHECK(o.reps > 0 && o.warmup >= 0,
              "bench_flat_buffer: --reps must be > 0 and --warmup "
              ">= 0, got ",
              o.reps, " and ", o.warmup);

    std::string card = "CPU";
#if MPU_HAS_CUDA
    if (cuda) {
      cudaDeviceProp prop{};
      MPU_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
      card = prop.name;
    }
#endif
    std::int64_t tensors = 0;
    std::int64_t elements = 0;
    for (const auto& [name, shape] : resnet50_shapes()) {
      ++tensors;
      std::int64_t k = 1;
      for (const auto d : shape) k *= d;
      elements += k;
    }

    const Timer timer(device, o);
    const std::vector<Config> configs = {{"fp32", torch::kFloat, torch::kFloat, true},
                                         {"fp16", torch::kHalf, torch::kHalf, true},
                                         {"fp16->fp32", torch::kHalf, torch::kFloat, false}};
    std::vector<Row> rows;
    std::vector<Verdict> verdicts;
    for (const auto& c : configs) run_config(c, device, timer, rows, verdicts);

    std::printf(
        "## FlatBuffer gather/scatter, ResNet-50 parameters (%lld tensors, %lld elements)\n\n",
        static_cast<long long>(tensors), static_cast<long long>(elements));
    std::printf("Device: %s. LibTorch %s. %s. Median of %d repetitions after %d warm-up.\n\n",
                card.c_str(), TORCH_VERSION, mpu::build_info().c_str(), o.reps, o.warmup);
    std::printf(
        "| params -> wire | operation | implementation | time (ms) | GB/s (read+write) |\n");
    std::printf("|---|---|---|---:|---:|\n");
    for (const auto& r : rows) {
      std::printf("| %s | %s | %s | %.4f | %.1f |\n", r.config.c_str(), r.op.c_str(),
                  r.impl.c_str(), r.ms, r.gbps());
    }
    std::printf(
        "\nGoal: flat kernel >= 90%% of the D2D copy's GB/s and >= 3x faster than the faster "
        "LibTorch way.\n\n");
    std::printf("| params -> wire | operation | GB/s vs D2D copy | speed-up vs LibTorch | met |\n");
    std::printf("|---|---|---:|---:|---|\n");
    bool all_met = true;
    for (const auto& v : verdicts) {
      std::printf("| %s | %s | %.1f%% | %.2fx | %s |\n", v.config.c_str(), v.op.c_str(),
                  100 * v.vs_copy, v.vs_libtorch, v.met ? "yes" : "no");
      all_met = all_met && v.met;
    }

    std::ostringstream js;
    js << "{\"bench\":\"flat_buffer\",\"device\":\"" << json_escape(card) << "\",\"torch\":\""
       << TORCH_VERSION << "\",\"tensors\":" << tensors << ",\"elements\":" << elements
       << ",\"reps\":" << o.reps << ",\"warmup\":" << o.warmup << ",\"results\":[";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      js << (i ? "," : "") << "{\"config\":\"" << r.config << "\",\"op\":\"" << r.op
         << "\",\"impl\":\"" << json_escape(r.impl) << "\",\"ms\":" << r.ms
         << ",\"bytes\":" << static_cast<long long>(r.bytes) << ",\"gbps\":" << r.gbps() << "}";
    }
    js << "],\"goal\":[";
    for (std::size_t i = 0; i < verdicts.size(); ++i) {
      const auto& v = verdicts[i];
      js << (i ? "," : "") << "{\"config\":\"" << v.config << "\",\"op\":\"" << v.op
         << "\",\"vs_copy\":" << v.vs_copy << ",\"vs_libtorch\":" << v.vs_libtorch
         << ",\"met\":" << (v.met ? "true" : "false") << "}";
    }
    js << "],\"goal_met\":" << (all_met ? "true" : "false") << "}";
    std::printf("\n%s\n", js.str().c_str());
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      MPU_CHECK(f.good(), "bench_flat_buffer: cannot write --json ", o.json);
      f << js.str() << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_flat_buffer: %s\n", e.what());
    return 1;
  }
}
