// Bandwidth of the communicator's collectives against the same NCCL calls made directly, in the
// same run, on the same buffers: allreduce, reduce + broadcast, reduce_scatter + allgather.
//
//   bench_collectives [--ranks N] [--min-bytes 1M] [--max-bytes 1G] [--iters 20] [--warmup 5]
//                     [--dtype float32|float16|bfloat16] [--backend auto|nccl|gloo]
//                     [--json PATH]
//
// One process per rank (mpu::spawn), one GPU each: by default every visible GPU. Without GPUs (or
// with --backend gloo) it runs the Gloo communicator on CPU ranks, with no raw comparison.
//
// Conventions (nccl-tests): algbw = bytes / time, where bytes is the size of the full tensor;
// busbw = algbw * factor, the bytes each rank's link carries per byte of tensor:
//   allreduce                    2(n-1)/n
//   reduce + broadcast           1 + 1 = 2
//   reduce_scatter + allgather   (n-1)/n + (n-1)/n = 2(n-1)/n
// The time of a rank is the mean over --iters back-to-back calls after --warmup calls, measured
// with CUDA events on the stream the caller uses (torch's current stream for the communicator,
// the raw stream for NCCL); the reported time is the slowest rank's.
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "mpu/communicator.h"
#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/launch.h"

#if MPU_HAS_NCCL
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace {

struct Args {
  int ranks = 0;  // 0: every visible GPU, or 2 CPU ranks
  std::int64_t min_bytes = std::int64_t{1} << 20;
  std::int64_t max_bytes = 0;  // 0: 1 GiB on GPUs, 16 MiB on CPUs
  int iters = 20;
  int warmup = 5;
  std::string dtype = "float32";
  std::string backend = "auto";
  std::string json;
};

const char* kOps[] = {"allreduce", "reduce+broadcast", "reduce_scatter+allgather"};
constexpr int kNumOps = 3;

std::int64_t parse_bytes(const std::string& text) {
  std::size_t pos = 0;
  const double value = std::stod(text, &pos);
  const std::string unit = text.substr(pos);
  double scale = 1;
  if (unit == "K" || unit == "KB" || unit == "KiB")
    scale = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MiB")
    scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GiB")
    scale = 1024.0 * 1024 * 1024;
  else
    MPU_CHECK(unit.empty(), "bench_collectives: unknown size unit in \"", text, "\"");
  return static_cast<std::int64_t>(value * scale);
}

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      MPU_CHECK(i + 1 < argc, "bench_collectives: ", flag, " needs a value");
      return argv[++i];
    };
    if (flag == "--ranks")
      args.ranks = std::stoi(value());
    else if (flag == "--min-bytes")
      args.min_bytes = parse_bytes(value());
    else if (flag == "--max-bytes")
      args.max_bytes = parse_bytes(value());
    else if (flag == "--iters")
      args.iters = std::stoi(value());
    else if (flag == "--warmup")
      args.warmup = std::stoi(value());
    else if (flag == "--dtype")
      args.dtype = value();
    else if (flag == "--backend")
      args.backend = value();
    else if (flag == "--json")
      args.json = value();
    else if (flag == "--help" || flag == "-h") {
      std::cout << "bench_collectives [--ranks N] [--min-bytes 1M] [--max-bytes 1G] [--iters 20] "
                   "[--warmup 5] [--dtype float32|float16|bfloat16] [--backend auto|nccl|gloo] "
                   "[--json PATH]\n";
      std::exit(0);
    } else {
      MPU_THROW(mpu::InvalidArgument, "bench_collectives: unknown argument ", flag);
    }
  }
  MPU_CHECK(args.iters > 0 && args.warmup >= 0, "bench_collectives: --iters must be positive");
  MPU_CHECK(args.backend == "auto" || args.backend == "nccl" || args.backend == "gloo",
            "bench_collectives: --backend ", args.backend, " is not auto, nccl or gloo");
  return args;
}

c10::ScalarType dtype_of(const std::string& name) {
  if (name == "float32") return torch::kFloat;
  if (name == "float16") return torch::kHalf;
  if (name == "bfloat16") return torch::kBFloat16;
  MPU_THROW(mpu::InvalidArgument, "bench_collectives: --dtype ", name,
            " is not float32, float16 or bfloat16");
}

double bus_factor(int op, int n) {
  const double ring = 2.0 * (n - 1) / n;
  return op == 1 ? 2.0 : ring;
}

// Seconds per iteration, this rank, for each (size, op, impl) where impl 0 is the communicator
// and impl 1 raw NCCL. Negative: not measured.
struct Timing {
  std::int64_t bytes;
  int op;
  int impl;
  double seconds;
};

#if MPU_HAS_NCCL
#define NCCL_OK(call) MPU_NCCL_CHECK(call)
#define CUDA_OK(call) MPU_CUDA_CHECK(call)

ncclDataType_t nccl_type(c10::ScalarType dtype) {
  return dtype == torch::kFloat ? ncclFloat32 : dtype == torch::kHalf ? ncclFloat16 : ncclBfloat16;
}

// Mean seconds per call of `body` over `iters` calls after `warmup`, timed by events on `stream`.
template <typename Body>
double time_on_stream(cudaStream_t stream, int warmup, int iters, Body&& body) {
  for (int i = 0; i < warmup; ++i) body();
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  CUDA_OK(cudaEventRecord(start, stream));
  for (int i = 0; i < iters; ++i) body();
  CUDA_OK(cudaEventRecord(stop, stream));
  CUDA_OK(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
  return ms / 1000.0 / iters;
}
#endif

template <typename Body>
double time_on_host(int warmup, int iters, Body&& body) {
  for (int i = 0; i < warmup; ++i) body();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) body();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
}

std::vector<std::int64_t> sizes_of(const Args& args) {
  std::vector<std::int64_t> sizes;
  for (std::int64_t s = args.min_bytes; s <= args.max_bytes; s *= 2) sizes.push_back(s);
  return sizes;
}

void run_rank(const mpu::SpawnContext& ctx, const Args& args) {
  const int n = ctx.world_size;
  const int rank = ctx.rank;
  const c10::ScalarType dtype = dtype_of(args.dtype);
  auto comm = ctx.make_communicator();
  const auto options = torch::TensorOptions().dtype(dtype).device(ctx.device);
  const std::int64_t element = torch::empty({0}, options).element_size();
  const std::int64_t max_count = args.max_bytes / element;
  torch::Tensor a = torch::zeros({max_count}, options);
  torch::Tensor b = torch::zeros({max_count}, options);

#if MPU_HAS_NCCL
  const bool raw = ctx.device.is_cuda();
  ncclComm_t raw_comm = nullptr;
  cudaStream_t raw_stream = nullptr;
  if (raw) {
    CUDA_OK(cudaSetDevice(ctx.device.index()));
    ncclUniqueId id;
    if (rank == 0) {
      NCCL_OK(ncclGetUniqueId(&id));
      const auto* bytes = reinterpret_cast<const std::uint8_t*>(&id);
      ctx.store->set("bench/raw_id", std::vector<std::uint8_t>(bytes, bytes + sizeof(id)));
    } else {
      ctx.store->wait({"bench/raw_id"});
      const auto bytes = ctx.store->get("bench/raw_id");
      MPU_CHECK(bytes.size() == sizeof(id), "bench_collectives: bad unique id in the store");
      std::memcpy(&id, bytes.data(), sizeof(id));
    }
    NCCL_OK(ncclCommInitRank(&raw_comm, n, id, rank));
    CUDA_OK(cudaStreamCreateWithFlags(&raw_stream, cudaStreamNonBlocking));
  }
  auto raw_barrier = [&] {
    NCCL_OK(ncclAllReduce(b.data_ptr(), b.data_ptr(), 1, nccl_type(dtype), ncclSum, raw_comm,
                          raw_stream));
    CUDA_OK(cudaStreamSynchronize(raw_stream));
  };
#else
  [[maybe_unused]] const bool raw = false;
#endif

  std::vector<Timing> timings;
  for (const std::int64_t bytes : sizes_of(args)) {
    // A multiple of n elements, so that every shard is equal, as in nccl-tests.
    const std::int64_t count = std::max<std::int64_t>(n, bytes / element / n * n);
    torch::Tensor full = a.narrow(0, 0, count);
    torch::Tensor shard = b.narrow(0, 0, count / n);

    // Check the communicator once per size: rank-valued fill, closed-form sum.
    full.fill_(rank + 1);
    comm->allreduce(full);
    const bool exact = full.eq(n * (n + 1) / 2).all().item<bool>();
    MPU_CHECK(exact, "bench_collectives: allreduce of ", count, " elements on rank ", rank,
              " gave a wrong result");
    full.zero_();

    for (int op = 0; op < kNumOps; ++op) {
      auto comm_body = [&] {
        if (op == 0) {
          comm->allreduce(full);
        } else if (op == 1) {
          comm->reduce(full, 0);
          comm->broadcast(full, 0);
        } else {
          comm->reduce_scatter(shard, full);
          comm->allgather(full, shard);
        }
      };
      comm->barrier();
      double seconds = 0;
#if MPU_HAS_NCCL
      if (raw) {
        const cudaStream_t current = c10::cuda::getCurrentCUDAStream(ctx.device.index()).stream();
        seconds = time_on_stream(current, args.warmup, args.iters, comm_body);
        comm->synchronize();
      } else {
        seconds = time_on_host(args.warmup, args.iters, comm_body);
      }
#else
      seconds = time_on_host(args.warmup, args.iters, comm_body);
#endif
      timings.push_back({bytes, op, 0, seconds});

#if MPU_HAS_NCCL
      if (raw) {
        const ncclDataType_t type = nccl_type(dtype);
        void* f = full.data_ptr();
        void* s = shard.data_ptr();
        const auto c = static_cast<std::size_t>(count);
        const auto sc = static_cast<std::size_t>(count / n);
        auto raw_body = [&] {
          if (op == 0) {
            NCCL_OK(ncclAllReduce(f, f, c, type, ncclSum, raw_comm, raw_stream));
          } else if (op == 1) {
            NCCL_OK(ncclReduce(f, f, c, type, ncclSum, 0, raw_comm, raw_stream));
            NCCL_OK(ncclBroadcast(f, f, c, type, 0, raw_comm, raw_stream));
          } else {
            NCCL_OK(ncclReduceScatter(f, s, sc, type, ncclSum, raw_comm, raw_stream));
            NCCL_OK(ncclAllGather(s, f, sc, type, raw_comm, raw_stream));
          }
        };
        raw_barrier();
        timings.push_back(
            {bytes, op, 1, time_on_stream(raw_stream, args.warmup, args.iters, raw_body)});
      }
#endif
    }
  }

  // The slowest rank's time: every rank publishes its own, rank 0 reads them all.
  std::ostringstream mine;
  mine << std::setprecision(17);
  for (const Timing& t : timings) mine << t.seconds << ' ';
  const std::string mine_text = mine.str();
  ctx.store->set("bench/times/" + std::to_string(rank),
                 std::vector<std::uint8_t>(mine_text.begin(), mine_text.end()));
  if (rank == 0) {
    for (int r = 1; r < n; ++r) {
      const std::string key = "bench/times/" + std::to_string(r);
      ctx.store->wait({key});
      const auto text = ctx.store->get(key);
      std::istringstream in(std::string(text.begin(), text.end()));
      for (Timing& t : timings) {
        double s = 0;
        in >> s;
        t.seconds = std::max(t.seconds, s);
      }
    }

    std::ostringstream table;
    std::ostringstream json;
    table << "\n## bench_collectives: " << n << " ranks, " << comm->backend() << ", " << args.dtype
          << ", " << args.iters << " iterations\n\n";
    table
        << "| op | bytes | comm time (us) | comm algbw (GB/s) | comm busbw (GB/s) | raw time (us) "
           "| raw algbw (GB/s) | raw busbw (GB/s) | comm/raw busbw |\n";
    table << "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    json << "{\n  \"ranks\": " << n << ",\n  \"backend\": \"" << comm->backend()
         << "\",\n  \"dtype\": \"" << args.dtype << "\",\n  \"iters\": " << args.iters;
#if MPU_HAS_NCCL
    int version = 0;
    if (raw) NCCL_OK(ncclGetVersion(&version));
    json << ",\n  \"nccl_version\": " << version;
#endif
    json << ",\n  \"results\": [";
    double worst_ratio_64m = 1e9;
    double allreduce_busbw_256m = -1;
    bool first = true;
    table << std::fixed;
    for (const std::int64_t bytes : sizes_of(args)) {
      for (int op = 0; op < kNumOps; ++op) {
        double t_comm = -1;
        double t_raw = -1;
        for (const Timing& t : timings) {
          if (t.bytes == bytes && t.op == op) (t.impl == 0 ? t_comm : t_raw) = t.seconds;
        }
        const std::int64_t count = std::max<std::int64_t>(n, bytes / element / n * n);
        const double real_bytes = static_cast<double>(count * element);
        const double comm_alg = real_bytes / t_comm / 1e9;
        const double comm_bus = comm_alg * bus_factor(op, n);
        table << "| " << kOps[op] << " | " << static_cast<std::int64_t>(real_bytes) << " | "
              << std::setprecision(1) << t_comm * 1e6 << " | " << std::setprecision(2) << comm_alg
              << " | " << comm_bus << " | ";
        if (!first) json << ",";
        first = false;
        json << "\n    {\"op\": \"" << kOps[op]
             << "\", \"bytes\": " << static_cast<std::int64_t>(real_bytes)
             << ", \"comm\": {\"time_us\": " << t_comm * 1e6 << ", \"algbw_gbs\": " << comm_alg
             << ", \"busbw_gbs\": " << comm_bus << "}";
        if (t_raw > 0) {
          const double raw_alg = real_bytes / t_raw / 1e9;
          const double raw_bus = raw_alg * bus_factor(op, n);
          // comm busbw / raw busbw, as the time ratio: also defined at one rank, where busbw is 0.
          const double ratio = t_raw / t_comm;
          table << std::setprecision(1) << t_raw * 1e6 << " | " << std::setprecision(2) << raw_alg
                << " | " << raw_bus << " | " << std::setprecision(3) << ratio << " |\n";
          json << ", \"raw\": {\"time_us\": " << t_raw * 1e6 << ", \"algbw_gbs\": " << raw_alg
               << ", \"busbw_gbs\": " << raw_bus << "}, \"comm_over_raw_busbw\": " << ratio
               << ", \"comm_over_raw_time\": " << t_comm / t_raw;
          if (bytes >= (std::int64_t{64} << 20)) worst_ratio_64m = std::min(worst_ratio_64m, ratio);
        } else {
          table << "- | - | - | - |\n";
        }
        json << "}";
        if (op == 0 && bytes == (std::int64_t{256} << 20)) allreduce_busbw_256m = comm_bus;
      }
    }
    json << "\n  ]";
    if (worst_ratio_64m < 1e9)
      json << ",\n  \"worst_comm_over_raw_busbw_from_64MiB\": " << worst_ratio_64m;
    if (allreduce_busbw_256m >= 0)
      json << ",\n  \"allreduce_busbw_256MiB_gbs\": " << allreduce_busbw_256m;
    json << "\n}\n";

    std::cout << table.str() << "\n";
    if (worst_ratio_64m < 1e9) {
      std::cout << std::setprecision(3) << "goal: comm busbw >= 0.98 x raw from 64 MiB: worst "
                << worst_ratio_64m << (worst_ratio_64m >= 0.98 ? " (met)" : " (NOT met)") << "\n";
    }
    if (allreduce_busbw_256m >= 0) {
      std::cout << std::fixed << std::setprecision(1)
                << "allreduce busbw at 256 MiB: " << allreduce_busbw_256m << " GB/s"
                << (n == 4 ? (allreduce_busbw_256m >= 330 ? " (goal 330 on 4 GPUs: met)"
                                                          : " (goal 330 on 4 GPUs: NOT met)")
                           : "")
                << "\n";
    }
    if (!args.json.empty()) {
      std::ofstream(args.json) << json.str();
      std::cout << "JSON written to " << args.json << "\n";
    } else {
      std::cout << "\n```json\n" << json.str() << "```\n";
    }
    std::cout.flush();
  }

  comm->barrier();
#if MPU_HAS_NCCL
  if (raw) {
    CUDA_OK(cudaStreamSynchronize(raw_stream));
    NCCL_OK(ncclCommDestroy(raw_comm));
    CUDA_OK(cudaStreamDestroy(raw_stream));
  }
#endif
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args args = parse_args(argc, argv);
    // Count GPUs through NVML only: CUDA must stay untouched before the fork.
    const int gpus = mpu::local_gpu_count();
    const bool use_gpus = args.backend == "nccl" || (args.backend == "auto" && gpus >= 2);
    MPU_CHECK(!use_gpus || gpus >= 1, "bench_collectives: --backend nccl needs a GPU, ", gpus,
              " visible");
    mpu::SpawnOptions options;
    if (use_gpus) {
      const int n = args.ranks > 0 ? args.ranks : gpus;
      // One rank measures the host cost of a call: NCCL's own kernel is a local copy then.
      MPU_CHECK(n >= 1 && n <= gpus, "bench_collectives: --ranks ", n, " with ", gpus,
                " GPUs visible");
      for (int i = 0; i < n; ++i)
        options.devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
      if (args.max_bytes == 0) args.max_bytes = std::int64_t{1} << 30;
    } else {
      const int n = args.ranks > 0 ? args.ranks : 2;
      MPU_CHECK(n >= 2, "bench_collectives: --ranks must be at least 2");
      options.devices.assign(static_cast<std::size_t>(n), torch::kCPU);
      options.threads_per_rank = 1;
      if (args.max_bytes == 0) args.max_bytes = std::int64_t{16} << 20;
    }
    MPU_CHECK(args.min_bytes > 0 && args.min_bytes <= args.max_bytes,
              "bench_collectives: --min-bytes ", args.min_bytes, " and --max-bytes ",
              args.max_bytes, " make no range");
    mpu::spawn(
        static_cast<int>(options.devices.size()),
        [&](const mpu::SpawnContext& ctx) { run_rank(ctx, args); }, options);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "bench_collectives: " << e.what() << "\n";
    return 1;
  }
}
