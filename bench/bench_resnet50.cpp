// Training throughput of torchvision's ResNet-50 (the ResNet example's torch::nn copy) under
// mpu::DistributedUpdater, for every strategy, precision and process count asked for:
//
//   bench_resnet50 [--gpus 1,2,4] [--precision fp32,bf16_autocast,bf16_mixed,fp16_mixed]
//   [--strategy master,replicated,sharded]
//                  [--batch-size 64] [--warmup 10] [--iters 30] [--json FILE] [--device cpu]
//                  [--image-size 224] [--arch resnet50] ...        (--help lists them all)
//
// Every configuration (a row) runs in fresh processes: mpu::spawn() forks one rank per GPU (or
// per CPU process with --device cpu, over Gloo), and each rank builds the model, SGD with
// momentum 0.9, lr 0.1 and weight decay 1e-4, and a DistributedUpdater with the row's strategy.
// The data are one synthetic ImageNet-shaped batch per rank, made once on the device in the
// training dtype and fed by a converter that ignores what the iterator serves, so that no data
// loading is timed. bf16 means the model's parameters are bf16 (model->to(kBFloat16)), as the
// example's --precision does; the loss is computed in fp32.
//
// Timing, per rank: --warmup updates, then a device synchronise and a barrier, --iters timed
// updates, and a device synchronise. The row's time is the slowest rank's, and
//   images/s = ranks * batch * iters / time.
// Also per rank: the CUDA caching allocator's peak allocated and reserved bytes over the whole
// process (GPUs only), and the bytes of the optimizer's state tensors after the last step.
//
// A row that fails (a strategy that throws, an out-of-memory) is reported with its error and the
// next row runs. The JSON (schema shared with bench/ddp_reference.py) is rewritten after every
// row, so that a run cut short keeps what it measured. bench/run_resnet_bench.sh runs this and
// the DDP reference; bench/resnet_report.py turns both into docs/benchmarks.md.
#include <torch/torch.h>
#include <torch/version.h>

#include <CLI/CLI.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "examples/resnet/models.h"
#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/updater.h"

#if MPU_HAS_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace {

namespace fs = std::filesystem;

constexpr const char* kProgram = "bench_resnet50";
// The optimizer of the benchmark (and of bench/ddp_reference.py).
constexpr double kLearningRate = 0.1;
constexpr double kMomentum = 0.9;
constexpr double kWeightDecay = 1e-4;

struct Options {
  std::vector<int> gpus{1, 2, 4};
  std::vector<std::string> precisions{"fp32", "bf16"};
  std::vector<std::string> strategies{"master", "replicated", "sharded"};
  std::string arch = "resnet50";
  std::string device = "auto";
  std::int64_t batch_size = 64;
  std::int64_t image_size = 224;
  std::int64_t classes = 1000;
  int warmup = 10;
  int iters = 30;
  double bucket_mb = -1;  // < 0: mpu::kDefaultBucketBytes
  std::string wire_dtype = "fp32";
  bool no_flat_step = false;
  bool channels_last = false;  // the batch in channels_last (convolutions follow its format)
  int threads = 1;             // intra-op threads of each CPU rank
  int row_time_limit = 900;
  std::uint64_t seed = 0;
  std::string json;
};

// "bf16" and "fp16": the whole model in that dtype. The policy names (bf16_autocast, ...) keep
// an fp32 model; the updater's precision policy does the rest.
bool is_policy(const std::string& name) {
  return name != "bf16" && name != "fp16";
}

torch::Dtype dtype_of(const std::string& name) {
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp16") return torch::kHalf;
  return torch::kFloat;
}

// The dtype gradients have: what "--wire-dtype param" sends, as DDP communicates them.
torch::Dtype gradient_dtype(const std::string& precision) {
  if (!is_policy(precision)) return dtype_of(precision);
  const mpu::Precision p = mpu::parse_precision(precision);
  return mpu::has_master_weights(p) ? mpu::compute_dtype(p) : torch::kFloat;
}

std::size_t bucket_bytes_of(const Options& o) {
  if (o.bucket_mb < 0) return mpu::kDefaultBucketBytes;
  return static_cast<std::size_t>(o.bucket_mb * 1024.0 * 1024.0);
}

std::string json_string(const std::string& text) {
  std::ostringstream out;
  out << '"';
  for (const char c : text) {
    switch (c) {
      case '"':
        out << "\\\"";
        break;
      case '\\':
        out << "\\\\";
        break;
      case '\n':
        out << "\\n";
        break;
      case '\t':
        out << "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out << "\\u" << std::hex << std::setw(4) << std::setfill('0')
              << static_cast<int>(static_cast<unsigned char>(c)) << std::dec << std::setfill(' ');
        } else {
          out << c;
        }
    }
  }
  out << '"';
  return out.str();
}

// A double as JSON: non-finite values (a diverged loss) become null.
std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  std::ostringstream out;
  out << std::setprecision(10) << value;
  return out.str();
}

template <typename T>
std::string json_array(const std::vector<T>& values) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out << ", ";
    if constexpr (std::is_floating_point_v<T>) {
      out << json_number(values[i]);
    } else {
      out << values[i];
    }
  }
  out << ']';
  return out.str();
}

// Makes `device` this process's current CUDA device, as torch.cuda.set_device does in the DDP
// reference, so that nothing of this rank lands on GPU 0 by default.
void use_device([[maybe_unused]] const torch::Device& device) {
#if MPU_HAS_CUDA
  if (device.is_cuda()) MPU_CUDA_CHECK(cudaSetDevice(device.index()));
#endif
}

void synchronize_device(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// Peak bytes of the CUDA caching allocator on `device` since the process started: allocated
// (what tensors held, as torch.cuda.max_memory_allocated) and reserved (what it took from the
// driver). -1 on the CPU. getDeviceStats has this spelling in LibTorch 1.13 and 2.x; entry 0 of
// each stat array is the aggregate over pools in both.
struct PeakMemory {
  std::int64_t allocated = -1;
  std::int64_t reserved = -1;
};
PeakMemory peak_memory([[maybe_unused]] const torch::Device& device) {
  PeakMemory peak;
#if MPU_HAS_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    peak.allocated = stats.allocated_bytes[0].peak;
    peak.reserved = stats.reserved_bytes[0].peak;
  }
#endif
  return peak;
}

std::string device_name([[maybe_unused]] const torch::Device& device) {
#if MPU_HAS_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop{};
    MPU_CUDA_CHECK(cudaGetDeviceProperties(&prop, device.index()));
    return prop.name;
  }
#endif
  return "cpu";
}

// One row's configuration.
struct Row {
  int ranks;
  std::string precision;
  std::string strategy;
};

// What a rank measured, as it travels through the store.
struct RankResult {
  double seconds = 0;
  std::int64_t peak_allocated = -1;
  std::int64_t peak_reserved = -1;
  std::int64_t optimizer_state = 0;
};

// One rank of one row. Rank 0 gathers every rank's result through the store and writes the
// row's JSON members to `row_path`.
void run_rank(const mpu::SpawnContext& ctx, const Options& o, const Row& row,
              const std::string& row_path) {
  const torch::Device device = ctx.device;
  const torch::Dtype dtype = is_policy(row.precision) ? torch::kFloat : dtype_of(row.precision);
  use_device(device);
  at::globalContext().setBenchmarkCuDNN(true);
  torch::manual_seed(o.seed + static_cast<std::uint64_t>(ctx.rank));

  resnet::ModelOptions mo;
  mo.num_classes = o.classes;
  mo.in_channels = 3;
  std::shared_ptr<resnet::ClassifierImpl> model = resnet::make_model(o.arch, mo);
  const std::int64_t parameters = resnet::count_parameters(*model);
  model->to(dtype);
  torch::optim::SGD optimizer(
      model->parameters(),
      torch::optim::SGDOptions(kLearningRate).momentum(kMomentum).weight_decay(kWeightDecay));

  // The batch, made once on the device in the training dtype. The iterator serves a batch of
  // placeholders that the converter replaces by it.
  const auto on_device = torch::TensorOptions().device(device);
  const torch::Tensor images =
      torch::randn({o.batch_size, 3, o.image_size, o.image_size}, on_device.dtype(torch::kFloat))
          .to(dtype)
          .contiguous(o.channels_last ? at::MemoryFormat::ChannelsLast
                                      : at::MemoryFormat::Contiguous);
  const torch::Tensor labels =
      torch::randint(o.classes, {o.batch_size}, on_device.dtype(torch::kLong));
  auto placeholders = std::make_shared<mpu::TensorDataset>(
      torch::zeros({o.batch_size, 1}), torch::zeros({o.batch_size}, torch::kLong));
  auto iterator = std::make_shared<mpu::Iterator>(
      placeholders, mpu::IteratorOptions(o.batch_size).shuffle(false).prefetch(false));

  torch::Tensor last_loss;
  auto loss_fn = [model, &last_loss](const mpu::Batch& b) {
    auto logits = model->forward(b.data).to(torch::kFloat);
    auto loss = torch::nn::functional::cross_entropy(logits, b.target);
    last_loss = loss.detach();
    return loss;
  };

  mpu::UpdaterOptions uo;
  uo.strategy = mpu::parse_strategy(row.strategy);
  uo.bucket_bytes = bucket_bytes_of(o);
  uo.wire_dtype = o.wire_dtype == "param" ? gradient_dtype(row.precision) : dtype_of(o.wire_dtype);
  const std::string wire = uo.wire_dtype == torch::kBFloat16 ? "bf16"
                           : uo.wire_dtype == torch::kHalf   ? "fp16"
                                                             : "fp32";
  if (is_policy(row.precision)) uo.precision = mpu::parse_precision(row.precision);
  uo.flat_step = !o.no_flat_step;
  uo.converter = [images, labels](const mpu::Batch&, const torch::Device&) {
    return mpu::Batch(images, labels);
  };
  uo.timeout = ctx.timeout;
  auto comm = ctx.make_communicator();
  mpu::DistributedUpdater updater(model, optimizer, iterator, loss_fn, comm, uo);

  for (int i = 0; i < o.warmup; ++i) updater.update();
  synchronize_device(device);
  comm->barrier();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < o.iters; ++i) updater.update();
  synchronize_device(device);
  const auto end = std::chrono::steady_clock::now();

  RankResult mine;
  mine.seconds = std::chrono::duration<double>(end - start).count();
  const PeakMemory peak = peak_memory(device);
  mine.peak_allocated = peak.allocated;
  mine.peak_reserved = peak.reserved;
  // The updater counts its flat optimizer state too (Sharded keeps only its shard there).
  mine.optimizer_state = updater.optimizer_state_bytes();
  const double loss = last_loss.defined() ? last_loss.item<double>() : std::nan("");

  std::ostringstream text;
  text << std::setprecision(17) << mine.seconds << ' ' << mine.peak_allocated << ' '
       << mine.peak_reserved << ' ' << mine.optimizer_state;
  const std::string t = text.str();
  ctx.store->set("bench/rank/" + std::to_string(ctx.rank),
                 std::vector<std::uint8_t>(t.begin(), t.end()));

  if (ctx.rank == 0) {
    std::vector<RankResult> all(static_cast<std::size_t>(ctx.world_size));
    all[0] = mine;
    for (int r = 1; r < ctx.world_size; ++r) {
      const std::string key = "bench/rank/" + std::to_string(r);
      ctx.store->wait({key});
      const auto bytes = ctx.store->get(key);
      std::istringstream in(std::string(bytes.begin(), bytes.end()));
      RankResult& res = all[static_cast<std::size_t>(r)];
      in >> res.seconds >> res.peak_allocated >> res.peak_reserved >> res.optimizer_state;
      MPU_CHECK(!in.fail(), kProgram, ": rank ", r, "'s result \"", in.str(),
                "\" is not 4 numbers");
    }
    std::vector<double> seconds;
    std::vector<std::int64_t> allocated, reserved, state;
    for (const RankResult& res : all) {
      seconds.push_back(res.seconds);
      allocated.push_back(res.peak_allocated);
      reserved.push_back(res.peak_reserved);
      state.push_back(res.optimizer_state);
    }
    const double slowest = *std::max_element(seconds.begin(), seconds.end());
    const double images_per_s =
        static_cast<double>(ctx.world_size * o.batch_size * o.iters) / slowest;

    std::ostringstream members;
    members << "\"ok\": true, \"images_per_s\": " << json_number(images_per_s)
            << ", \"seconds\": " << json_number(slowest)
            << ", \"rank_seconds\": " << json_array(seconds)
            << ", \"peak_allocated_bytes\": " << json_array(allocated)
            << ", \"peak_reserved_bytes\": " << json_array(reserved)
            << ", \"optimizer_state_bytes\": " << json_array(state)
            << ", \"final_loss\": " << json_number(loss) << ", \"parameters\": " << parameters
            << ", \"device_name\": " << json_string(device_name(device))
            << ", \"backend\": " << json_string(comm->backend())
            << ", \"wire_dtype\": " << json_string(wire);
    std::ofstream(row_path) << members.str();

    const auto max_state = *std::max_element(state.begin(), state.end());
    const auto max_allocated = *std::max_element(allocated.begin(), allocated.end());
    std::cout << kProgram << ": " << row.ranks << " x " << device_name(device) << ", "
              << row.precision << ", " << row.strategy << ": " << std::fixed << std::setprecision(1)
              << images_per_s << " images/s, loss " << std::setprecision(3) << loss;
    if (max_allocated >= 0) {
      std::cout << ", peak " << std::setprecision(2) << static_cast<double>(max_allocated) / 1e9
                << " GB allocated";
    }
    std::cout << ", optimizer state " << std::setprecision(1)
              << static_cast<double>(max_state) / 1e6 << " MB on the fullest rank" << std::endl;
  }
  comm->barrier();
}

// The whole JSON document: the run's settings and the rows so far.
std::string document(const Options& o, const std::string& device_kind,
                     const std::vector<std::string>& rows) {
  std::ostringstream out;
  out << "{\n  \"benchmark\": \"resnet_training_throughput\",\n  \"implementation\": \"torch-mpu\""
      << ",\n  \"arch\": " << json_string(o.arch) << ",\n  \"device\": " << json_string(device_kind)
      << ",\n  \"torch_version\": " << json_string(TORCH_VERSION)
      << ",\n  \"mpu_version\": " << json_string(MPU_VERSION_STRING)
      << ",\n  \"batch_size\": " << o.batch_size << ",\n  \"image_size\": " << o.image_size
      << ",\n  \"classes\": " << o.classes << ",\n  \"warmup\": " << o.warmup
      << ",\n  \"iters\": " << o.iters
      << ",\n  \"optimizer\": {\"name\": \"sgd\", \"lr\": " << json_number(kLearningRate)
      << ", \"momentum\": " << json_number(kMomentum)
      << ", \"weight_decay\": " << json_number(kWeightDecay) << "}"
      << ",\n  \"updater\": {\"bucket_bytes\": " << bucket_bytes_of(o)
      << ", \"wire_dtype\": " << json_string(o.wire_dtype)
      << ", \"flat_step\": " << (o.no_flat_step ? "false" : "true") << "}"
      << ",\n  \"memory_format\": " << json_string(o.channels_last ? "channels_last" : "contiguous")
      << ",\n  \"results\": [";
  for (std::size_t i = 0; i < rows.size(); ++i) out << (i > 0 ? ",\n    " : "\n    ") << rows[i];
  out << "\n  ]\n}\n";
  return out.str();
}

void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << text;
    MPU_CHECK(out.good(), kProgram, ": could not write ", tmp);
  }
  fs::rename(tmp, path);
}

std::string first_line(const std::string& text) {
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

int run(const Options& o) {
  // Count GPUs through NVML only: this process must not initialise CUDA before spawn() forks.
  const int gpus = mpu::local_gpu_count();
  const bool cuda = o.device == "cuda" || (o.device == "auto" && gpus > 0);
  if (cuda && gpus == 0) {
    MPU_THROW(mpu::InvalidArgument, kProgram,
              ": --device cuda, but no GPU is visible (NVML finds none)");
  }
  const std::string device_kind = cuda ? "cuda" : "cpu";
  const fs::path row_path = fs::temp_directory_path() /
                            (std::string(kProgram) + "." + std::to_string(::getpid()) + ".row");

  std::vector<std::string> rows;
  int failures = 0;
  for (const int n : o.gpus) {
    for (const std::string& precision : o.precisions) {
      for (const std::string& strategy : o.strategies) {
        const Row row{n, precision, strategy};
        std::ostringstream head;
        head << "{\"gpus\": " << n << ", \"precision\": " << json_string(precision)
             << ", \"strategy\": " << json_string(strategy) << ", ";
        std::string members;
        try {
          MPU_CHECK(!cuda || n <= gpus, kProgram, ": ", n, " GPUs asked for, ", gpus, " visible");
          mpu::SpawnOptions so;
          if (cuda) {
            for (int i = 0; i < n; ++i)
              so.devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
          } else {
            so.devices.assign(static_cast<std::size_t>(n), torch::Device(torch::kCPU));
            so.threads_per_rank = o.threads;
          }
          so.time_limit = std::chrono::seconds(o.row_time_limit);
          fs::remove(row_path);
          mpu::spawn(
              n, [&](const mpu::SpawnContext& ctx) { run_rank(ctx, o, row, row_path.string()); },
              so);
          std::ifstream in(row_path);
          std::stringstream text;
          text << in.rdbuf();
          members = text.str();
          MPU_CHECK(!members.empty(), kProgram, ": rank 0 wrote no result to ", row_path.string());
        } catch (const std::exception& e) {
          ++failures;
          members = "\"ok\": false, \"error\": " + json_string(e.what());
          std::cout << kProgram << ": " << n << " x " << device_kind << ", " << precision << ", "
                    << strategy << ": FAILED: " << first_line(e.what()) << std::endl;
        }
        fs::remove(row_path);
        rows.push_back(head.str() + members + "}");
        if (!o.json.empty()) write_atomically(o.json, document(o, device_kind, rows));
      }
    }
  }
  if (!o.json.empty()) std::cout << kProgram << ": JSON written to " << o.json << "\n";
  if (failures > 0) {
    std::cout << kProgram << ": " << failures << " of " << rows.size() << " rows failed\n";
  }
  return failures > 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{
      "Training throughput of ResNet-50 (torchvision's architecture) under "
      "mpu::DistributedUpdater on synthetic ImageNet-shaped data, for each process count, "
      "precision and strategy; one row per combination, each in fresh processes.",
      kProgram};
  app.add_option("--gpus", o.gpus,
                 "Process counts, comma-separated: GPUs per row (CPU processes with --device cpu)")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--precision", o.precisions,
                 "Precision policies (fp32, bf16_autocast, fp16_autocast, bf16_mixed, "
                 "fp16_mixed), or bf16/fp16: the whole model in that dtype")
      ->delimiter(',')
      ->check(CLI::IsMember(
          {"fp32", "bf16", "fp16", "bf16_autocast", "fp16_autocast", "bf16_mixed", "fp16_mixed"}))
      ->capture_default_str();
  app.add_option("--strategy", o.strategies, "Strategies: master, replicated, sharded")
      ->delimiter(',')
      ->check(CLI::IsMember({"master", "replicated", "sharded"}))
      ->capture_default_str();
  app.add_option("--arch", o.arch, "Model")
      ->check(CLI::IsMember(resnet::architectures()))
      ->capture_default_str();
  app.add_option("--device", o.device, "auto (GPUs when NVML finds any), cuda or cpu (Gloo)")
      ->check(CLI::IsMember({"auto", "cuda", "cpu"}))
      ->capture_default_str();
  app.add_option("--batch-size", o.batch_size, "Batch per process")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20))
      ->capture_default_str();
  app.add_option("--image-size", o.image_size, "Image height and width")
      ->check(CLI::Range(std::int64_t{8}, std::int64_t{4096}))
      ->capture_default_str();
  app.add_option("--classes", o.classes, "Classes")
      ->check(CLI::Range(std::int64_t{2}, std::int64_t{1} << 20))
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "Updates before timing")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--iters", o.iters, "Timed updates")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--bucket-mb", o.bucket_mb,
                 "Gradient bucket size in MiB of the wire dtype; 0: one bucket after backward "
                 "(default: the library's)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--wire-dtype", o.wire_dtype,
                 "Dtype in which gradients travel; param: the row's parameter dtype, as DDP "
                 "communicates")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16", "param"}))
      ->capture_default_str();
  app.add_flag("--no-flat-step", o.no_flat_step,
               "Step the optimizer per parameter instead of over the flat buffer");
  app.add_flag("--channels-last", o.channels_last,
               "Make the batch channels_last; cuDNN then runs every convolution in that format "
               "(the parameters stay contiguous views into the flat buffer)");
  app.add_option("--threads", o.threads, "Intra-op threads of each CPU process")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--row-time-limit", o.row_time_limit,
                 "Seconds after which a row's processes are stopped and the row fails")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--seed", o.seed, "Seed of the initialisation and the data")
      ->capture_default_str();
  app.add_option("--json", o.json, "Write the results here (rewritten after every row)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::cerr << kProgram << ": " << e.what() << "\n";
    return 2;
  }
}
