// mpu_resnet: trains a ResNet data-parallel with torch-mpu's MultiprocessParallelUpdater, on
// every local GPU or on CPU processes (Gloo) where there is none. Fashion-MNIST with
// augmentation and a test-set evaluation every epoch, or ImageNet-shaped random data to measure
// throughput (--synthetic). See docs/resnet.md.
#include <mpu/mpu.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "models.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace {

namespace fs = std::filesystem;
namespace datasets = mpu::datasets;

constexpr const char* kProgram = "mpu_resnet";
// Exit status for bad input (a usage error), as CLI tools conventionally use.
constexpr int kExitUsage = 2;
constexpr int kExitFailure = 1;

// Fashion-MNIST images and classes.
constexpr std::int64_t kImageSize = 28;
constexpr std::int64_t kClasses = 10;
// Synthetic data: ImageNet-shaped.
constexpr std::int64_t kSyntheticSize = 224;
constexpr std::int64_t kSyntheticClasses = 1000;
// Synthetic examples per device and per unit of batch: an epoch is this many iterations.
constexpr std::int64_t kSyntheticBatchesPerEpoch = 8;
constexpr double kPi = 3.14159265358979323846;

// Bad input: reported in one line, exit status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Config {
  std::string arch;             // "": resnet18 on GPUs, resnet20 on CPUs
  int devices = 0;              // 0: every GPU, or 2 CPU processes
  int epochs = 0;               // 0: by device kind
  std::int64_t batch_size = 0;  // per device; 0: by device kind
  double lr = 0.0;              // for the total batch; 0: by optimizer
  std::string optimizer = "sgd";
  double momentum = 0.9;
  double weight_decay = -1.0;  // < 0: by optimizer
  std::string schedule = "cosine";
  double warmup_epochs = -1.0;  // < 0: by device kind
  std::string precision = "fp32";
  std::string strategy = "master";
  double bucket_mb = -1.0;  // < 0: the library's default
  std::string wire_dtype = "auto";
  bool no_flat_step = false;
  int accumulate = 1;
  std::string data;  // "": datasets::fashion_mnist_dir()
  std::string out = "result/resnet";
  std::string resume;
  bool synthetic = false;
  std::int64_t iterations = 100;  // --synthetic only
  std::int64_t warmup_iterations = 10;
  std::int64_t train_size = 0;  // 0: all
  int crop_padding = 2;
  std::string data_on = "auto";  // auto: the device-resident path on GPUs
  bool channels_last = false;
  bool cuda_graph = false;
  int snapshot_every = 1;  // epochs; 0: none
  bool cudnn_benchmark = false;
  double label_smoothing = 0.0;
  std::int64_t trace_iterations = 0;  // diagnostics: wait and print the time of the first N
  int threads = 0;  // master's intra-op threads on CPUs; 0: 1 when CPU processes share cores
  std::uint64_t seed = 0;
};

// Defaults that depend on whether GPUs are present. The CPU ones make ./scripts/demo finish in
// about five minutes on two cores (docs/resnet.md has the measured run).
struct Defaults {
  const char* arch;
  int epochs;
  std::int64_t batch_size;
  double warmup_epochs;
};
constexpr Defaults kGpuDefaults{"resnet18", 30, 128, 1.0};
constexpr Defaults kCpuDefaults{"resnet20", 3, 64, 0.25};

// The dtype the model's parameters are built in: "bf16" and "fp16" store the whole model in
// that dtype; fp32 and the policies (bf16_autocast, fp16_mixed, ...) build it in fp32 and let
// the updater's precision policy do the rest.
torch::Dtype parse_precision(const std::string& p) {
  if (p == "bf16") return torch::kBFloat16;
  if (p == "fp16") return torch::kHalf;
  return torch::kFloat;
}

bool is_policy(const std::string& p) {
  return p != "bf16" && p != "fp16";
}

// --wire-dtype auto: the mixed policies send their low-precision gradients as they are,
// everything else fp32.
torch::Dtype wire_dtype_of(const std::string& wire, const std::string& precision) {
  if (wire != "auto") return parse_precision(wire);
  if (!is_policy(precision)) return torch::kFloat;
  const mpu::Precision policy = mpu::parse_precision(precision);
  return mpu::has_master_weights(policy) ? mpu::compute_dtype(policy) : torch::kFloat;
}

// LibTorch's CPU allocator takes every tensor from malloc. glibc serves large blocks (a batch's
// activations are megabytes) with fresh mmap()s and gives freed memory at the top of the heap
// back to the system, so every iteration page-faults its activations in again. Measured here on
// ResNet-20, batch 64, one thread: a quarter of the CPU time went to the kernel and a training
// step ran about 2x slower than with freed memory kept in the process.
void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

template <typename T>
std::string by_device(T gpu, T cpu) {
  std::ostringstream s;
  s << "(default: " << gpu << " on GPUs, " << cpu << " on CPUs)";
  return s.str();
}

std::string with_commas(std::int64_t n) {
  std::string s = std::to_string(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3)
    s.insert(static_cast<std::size_t>(i), ",");
  return s;
}

// The devices to train on: the first n GPUs, or n CPU processes where there is no GPU. Counts
// GPUs through NVML, so CUDA stays uninitialised for the updater's fork.
std::vector<torch::Device> choose_devices(int requested, int gpus) {
  if (gpus > 0) {
    const int n = requested > 0 ? requested : gpus;
    if (n > gpus) {
      throw UsageError("--devices " + std::to_string(n) + ": only " + std::to_string(gpus) +
                       " GPU(s) are visible to this process (CUDA_VISIBLE_DEVICES applies)");
    }
    std::vector<torch::Device> devices;
    for (int i = 0; i < n; ++i)
      devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
    return devices;
  }
  const int n = requested > 0 ? requested : 2;
  return std::vector<torch::Device>(static_cast<std::size_t>(n), torch::Device(torch::kCPU));
}

// Checks the data directory before anything starts, so that a wrong --data is one clear line.
std::string check_data_dir(const std::string& requested) {
  const std::string dir = requested.empty() ? datasets::fashion_mnist_dir() : requested;
  if (!fs::is_directory(dir)) {
    throw UsageError("--data " + dir +
                     ": no such directory (Debian's dataset-fashion-mnist "
                     "installs Fashion-MNIST in /usr/share/datasets/fashion-mnist; "
                     "$FASHION_MNIST_DIR or --data point elsewhere)");
  }
  for (const char* file : {datasets::kTrainImagesFile, datasets::kTrainLabelsFile,
                           datasets::kTestImagesFile, datasets::kTestLabelsFile}) {
    if (!fs::exists(fs::path(dir) / file)) {
      throw UsageError("--data " + dir + ": " + file + " is missing; the directory needs " +
                       datasets::kTrainImagesFile + ", " + datasets::kTrainLabelsFile + ", " +
                       datasets::kTestImagesFile + " and " + datasets::kTestLabelsFile);
    }
  }
  return dir;
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const Config& c,
                                                        std::vector<torch::Tensor> params) {
  if (c.optimizer == "sgd") {
    return std::make_unique<torch::optim::SGD>(
        std::move(params),
        torch::optim::SGDOptions(c.lr).momentum(c.momentum).weight_decay(c.weight_decay));
  }
  if (c.optimizer == "adam") {
    return std::make_unique<torch::optim::Adam>(
        std::move(params), torch::optim::AdamOptions(c.lr).weight_decay(c.weight_decay));
  }
  return std::make_unique<torch::optim::AdamW>(
      std::move(params), torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
}

// The learning-rate factor at a (fractional) epoch: a linear warm-up from 0 over
// `warmup` epochs, then cosine decay to 0 at `epochs`, step decay (x0.1 at 50 % and 75 %), or
// constant.
double lr_factor(const Config& c, double epoch) {
  if (c.warmup_epochs > 0 && epoch < c.warmup_epochs) return epoch / c.warmup_epochs;
  if (c.schedule == "constant") return 1.0;
  if (c.schedule == "step") {
    return epoch < 0.5 * c.epochs ? 1.0 : epoch < 0.75 * c.epochs ? 0.1 : 0.01;
  }
  const double span = c.epochs - std::max(c.warmup_epochs, 0.0);
  const double t = span > 0 ? std::min(1.0, (epoch - std::max(c.warmup_epochs, 0.0)) / span) : 1.0;
  return 0.5 * (1.0 + std::cos(kPi * t));
}

// Sets every group's learning rate to its rescaled base value times `factor`.
void set_lr(torch::optim::Optimizer& opt, const std::vector<double>& base, double factor) {
  auto& groups = opt.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) groups[g].options().set_lr(base[g] * factor);
}

// The synthetic data set: ImageNet-shaped random images, generated once, already in the
// training dtype (bf16 batches are half the bytes to collate and copy to the GPU).
mpu::DatasetPtr synthetic_dataset(std::int64_t n, std::uint64_t seed, torch::Dtype dtype) {
  auto gen = torch::make_generator<at::CPUGeneratorImpl>(seed);
  auto images = torch::randn({n, 3, kSyntheticSize, kSyntheticSize}, gen, torch::kFloat).to(dtype);
  auto labels = torch::randint(kSyntheticClasses, {n}, gen, torch::kLong);
  return std::make_shared<mpu::TensorDataset>(images, labels);
}

std::string format_percent(double fraction) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(2) << 100.0 * fraction << " %";
  return s.str();
}

int run(Config c) {
  // --- Validate and complete the configuration, before anything starts -----------------------
  mpu::Strategy strategy = mpu::Strategy::kMasterStep;
  try {
    strategy = mpu::parse_strategy(c.strategy);
  } catch (const mpu::InvalidArgument&) {
    throw UsageError("--strategy " + c.strategy +
                     ": valid strategies: master, replicated, sharded");
  }
  const int gpus = mpu::local_gpu_count();
  const auto devices = choose_devices(c.devices, gpus);
  const int n = static_cast<int>(devices.size());
  const bool on_gpu = devices.front().is_cuda();
  const Defaults& d = on_gpu ? kGpuDefaults : kCpuDefaults;
  if (c.arch.empty()) c.arch = d.arch;
  if (c.epochs == 0) c.epochs = d.epochs;
  if (c.batch_size == 0) c.batch_size = d.batch_size;
  if (c.warmup_epochs < 0) c.warmup_epochs = c.synthetic ? 0.0 : d.warmup_epochs;
  if (c.synthetic) c.schedule = "constant";  // a throughput run has no schedule to follow
  if (c.lr == 0.0) c.lr = c.optimizer == "sgd" ? 0.1 : 1e-3;
  if (c.weight_decay < 0) {
    c.weight_decay = c.optimizer == "sgd" ? 5e-4 : c.optimizer == "adamw" ? 5e-2 : 0.0;
  }
  const torch::Dtype dtype = parse_precision(c.precision);
  const bool fp16 = dtype == torch::kHalf || c.precision.rfind("fp16", 0) == 0;
  if (fp16 && !on_gpu) {
    throw UsageError("--precision " + c.precision +
                     " is for GPUs: LibTorch's CPU kernels lack fp16 convolution and batch "
                     "norm; use bf16_mixed or bf16_autocast");
  }
  std::string data_dir;
  if (!c.synthetic) data_dir = check_data_dir(c.data);
  std::optional<std::string> resume_path;
  if (c.resume == "auto") {
    resume_path = mpu::find_latest_snapshot(c.out);
  } else if (!c.resume.empty()) {
    if (!fs::is_regular_file(c.resume)) {
      throw UsageError("--resume " + c.resume +
                       ": no such file (--resume auto takes the latest "
                       "snapshot in --out, if any)");
    }
    resume_path = c.resume;
  }

  // CPU processes share the machine's cores: one intra-op thread each (the workers set theirs),
  // so that they do not oversubscribe the cores.
  if (!on_gpu) {
    keep_freed_memory();  // the workers inherit it through fork()
    if (c.threads > 0 || n > 1) at::set_num_threads(c.threads > 0 ? c.threads : 1);
  }
  // --cudnn-benchmark: cuDNN times its convolution algorithms for the shapes of the first steps
  // (a flag of the process, inherited by the workers; it does not initialise CUDA). Off by
  // default: on short runs the timing costs more than its faster steps save.
  if (on_gpu) at::globalContext().setBenchmarkCuDNN(c.cudnn_benchmark);
  mpu::manual_seed(c.seed);  // CPU only: torch::manual_seed would initialise CUDA before the fork

  // --- Data ----------------------------------------------------------------------------------
  // On GPUs the images live on each device (uint8), augmented there per batch; on CPUs, and
  // with --data-on host, the host pipeline of transforms and a prefetching iterator.
  if (c.data_on == "device" && !on_gpu) {
    throw UsageError("--data-on device needs GPUs; this run uses CPU processes");
  }
  const bool device_data = on_gpu && !c.synthetic && c.data_on != "host";
  mpu::DatasetPtr raw_train;  // device path: the untransformed images
  mpu::DatasetPtr raw_test;
  mpu::DatasetPtr train;
  mpu::DatasetPtr test;
  std::int64_t in_channels = 1;
  std::int64_t classes = kClasses;
  if (c.synthetic) {
    train = synthetic_dataset(
        c.batch_size * n * std::max<std::int64_t>(kSyntheticBatchesPerEpoch, c.accumulate), c.seed,
        dtype);
    in_channels = 3;
    classes = kSyntheticClasses;
  } else {
    mpu::DatasetPtr base = datasets::FashionMNIST(datasets::Split::Train, data_dir);
    if (c.train_size > 0 && c.train_size < base->size()) {
      // A fixed random subset, for short CPU runs.
      auto order = mpu::random_permutation(base->size(), mpu::derive_seed(c.seed, 1));
      order.resize(static_cast<std::size_t>(c.train_size));
      base = std::make_shared<mpu::SubsetDataset>(base, std::move(order));
    }
    raw_train = base;
    raw_test = datasets::FashionMNIST(datasets::Split::Test, data_dir);
    train = datasets::transform(
        base,
        {datasets::RandomCrop(kImageSize, c.crop_padding), datasets::RandomHorizontalFlip(),
         datasets::Normalize(datasets::kFashionMnistMean, datasets::kFashionMnistStd)},
        c.seed);
    test = datasets::transform(
        raw_test, {datasets::Normalize(datasets::kFashionMnistMean, datasets::kFashionMnistStd)});
  }
  if (train->size() < c.batch_size * n * c.accumulate) {
    throw UsageError("the training set has " + std::to_string(train->size()) +
                     " images, fewer than one step's batches on every device (" +
                     std::to_string(c.batch_size) + " x " + std::to_string(n) + " x " +
                     std::to_string(c.accumulate) +
                     " accumulated); lower --batch-size or --accumulate, or raise --train-size");
  }

  // --- Model, optimizer, updater -------------------------------------------------------------
  resnet::ModelOptions mo;
  mo.num_classes = classes;
  mo.in_channels = in_channels;
  mo.small_input = !c.synthetic;
  mo.channels_last = c.channels_last;
  std::shared_ptr<resnet::ClassifierImpl> model = resnet::make_model(c.arch, mo);
  const std::int64_t parameters = resnet::count_parameters(*model);
  // Parameters in the training dtype; the packing layer converts gradients and parameters to
  // and from the fp32 wire.
  model->to(dtype);
  auto optimizer = make_optimizer(c, model->parameters());

  const auto cross_entropy =
      torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(c.label_smoothing);
  auto loss_fn = [model, dtype, cross_entropy](const mpu::Batch& b) {
    auto logits = model->forward(b.data.to(dtype)).to(torch::kFloat);
    auto loss = torch::nn::functional::cross_entropy(logits, b.target, cross_entropy);
    mpu::report("loss", loss);
    mpu::report("accuracy", mpu::accuracy(logits, b.target));
    return loss;
  };

  mpu::UpdaterOptions uo;
  uo.strategy = strategy;
  if (c.bucket_mb >= 0) uo.bucket_bytes = static_cast<std::size_t>(c.bucket_mb * 1024.0 * 1024.0);
  uo.wire_dtype = wire_dtype_of(c.wire_dtype, c.precision);
  if (is_policy(c.precision)) uo.precision = mpu::parse_precision(c.precision);
  uo.flat_step = !c.no_flat_step;
  uo.accumulation_steps = c.accumulate;
  uo.cuda_graph = c.cuda_graph;
  const auto placement =
      c.data_on == "device" ? datasets::Placement::kDevice : datasets::Placement::kAuto;
  const datasets::DeviceAugment normalise = datasets::DeviceAugment()
                                                .mean({datasets::kFashionMnistMean})
                                                .stddev({datasets::kFashionMnistStd});
  auto iterators =
      device_data ? datasets::device_split_iterators(
                        raw_train, devices, mpu::IteratorOptions(c.batch_size).seed(c.seed),
                        datasets::DeviceDataOptions(devices.front())
                            .augment(datasets::DeviceAugment(normalise)
                                         .padding(c.crop_padding)
                                         .flip(true)
                                         .seed(c.seed))
                            .placement(placement))
                  : mpu::split_iterators(train, n, mpu::IteratorOptions(c.batch_size).seed(c.seed));
  mpu::MultiprocessParallelUpdater updater(model, *optimizer, iterators, loss_fn, devices, uo);
  // The updater rescaled the optimizer for n processes; the schedule scales these values.
  std::vector<double> base_lr;
  for (auto& g : optimizer->param_groups()) base_lr.push_back(g.options().get_lr());
  // The factor of an iteration is taken at its middle, in epochs: the first iteration of a
  // warm-up does not get a zero learning rate, nor the last of a cosine decay.
  const double half_step = 0.5 * static_cast<double>(c.batch_size * c.accumulate) /
                           static_cast<double>(iterators.front()->dataset_size());

  const auto stop =
      c.synthetic ? mpu::stop_after_iterations(c.iterations) : mpu::stop_after_epochs(c.epochs);
  mpu::Trainer trainer(updater, stop, c.out);

  // Learning-rate schedule, per iteration. A writer, so that "lr" (the learning rate of the
  // total batch, as --lr gives it) is in the observation before LogReport reads it.
  auto factor = std::make_shared<double>(0.0);
  trainer.extend(mpu::make_extension(
      "lr_schedule",
      [&c, &updater, &optimizer, base_lr, factor, half_step](mpu::Trainer&) {
        mpu::report("lr", c.lr * *factor);
        *factor = lr_factor(c, updater.epoch_detail() + half_step);
        set_lr(*optimizer, base_lr, *factor);
      },
      mpu::every_iterations(1), mpu::kPriorityWriter));

  const std::string log_path = (fs::path(c.out) / mpu::kDefaultLogFilename).string();
  const std::string loss_plot = (fs::path(c.out) / "loss.png").string();
  const std::string accuracy_plot = (fs::path(c.out) / "accuracy.png").string();
  std::shared_ptr<mpu::PlotReport> loss_plotter;
  if (c.synthetic) {
    trainer.extend(mpu::LogReport(mpu::every_iterations(10)));
    trainer.extend(mpu::PrintReport({"epoch", "iteration", "main/loss", "lr", "elapsed_time"}));
    trainer.extend(mpu::ProgressBar(10));
  } else {
    auto test_it = std::make_shared<mpu::Iterator>(
        device_data ? std::make_shared<datasets::DeviceImageDataset>(
                          raw_test, datasets::DeviceDataOptions(devices.front())
                                        .augment(normalise)
                                        .placement(placement))
                    : test,
        mpu::IteratorOptions(1000).repeat(false).shuffle(false));
    // The evaluation, timed apart from training (after the device finished the epoch's steps),
    // so that "eval_seconds" (the total so far) can be taken off elapsed_time.
    auto evaluator = std::make_shared<mpu::Evaluator>(test_it, loss_fn);
    auto eval_seconds = std::make_shared<double>(0.0);
    trainer.extend(mpu::make_extension(
        "Evaluator",
        [evaluator, eval_seconds, on_gpu](mpu::Trainer& t) {
          if (on_gpu) torch::cuda::synchronize();
          const auto start = std::chrono::steady_clock::now();
          (*evaluator)(t);
          if (on_gpu) torch::cuda::synchronize();
          *eval_seconds +=
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          mpu::report("eval_seconds", *eval_seconds);
        },
        mpu::every_epochs(1), evaluator->priority()));
    trainer.extend(mpu::LogReport());
    trainer.extend(mpu::PrintReport({"epoch", "iteration", "main/loss", "main/accuracy",
                                     "validation/main/loss", "validation/main/accuracy", "lr",
                                     "elapsed_time"}));
    trainer.extend(mpu::ProgressBar(on_gpu ? 100 : 20));
    if (c.snapshot_every > 0) {
      trainer.extend(mpu::Snapshot(mpu::kDefaultSnapshotPattern, 2),
                     mpu::every_epochs(c.snapshot_every));
    }
    loss_plotter = std::make_shared<mpu::PlotReport>(
        std::vector<std::string>{"main/loss", "validation/main/loss"}, "epoch",
        mpu::every_epochs(1), "loss.png");
    trainer.extend(loss_plotter);
    trainer.extend(mpu::PlotReport({"main/accuracy", "validation/main/accuracy"}, "epoch",
                                   mpu::every_epochs(1), "accuracy.png"));
  }

  // Throughput: from the end of the warm-up iterations to the end of the last one, each taken
  // after the device has finished its work, and before the other extensions (logging) and the
  // teardown of the workers.
  const std::int64_t warmup =
      std::min(c.warmup_iterations, std::max<std::int64_t>(c.iterations - 1, 0));
  struct Timing {
    std::chrono::steady_clock::time_point start, end;
  };
  auto timing = std::make_shared<Timing>();
  if (c.synthetic) {
    trainer.extend(mpu::make_extension(
        "throughput",
        [&updater, &model, warmup, last = c.iterations, timing](mpu::Trainer&) {
          const std::int64_t it = updater.iteration();
          if (it != warmup && it != last) return;
          (void)model->parameters().front().sum().item<double>();  // waits for the device
          (it == warmup ? timing->start : timing->end) = std::chrono::steady_clock::now();
        },
        mpu::every_iterations(1), mpu::kPriorityWriter + 100));
  }

  // --trace-iterations: the wall time of each of the first N iterations, each taken after the
  // device has finished it, to tell start-up costs (uploads, autotuning) from steady ones.
  if (c.trace_iterations > 0) {
    auto last =
        std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
    trainer.extend(mpu::make_extension(
        "trace_iterations",
        [&updater, &model, limit = c.trace_iterations, last](mpu::Trainer&) {
          const std::int64_t it = updater.iteration();
          if (it > limit) return;
          (void)model->parameters().front().sum().item<double>();  // waits for the device
          const auto now = std::chrono::steady_clock::now();
          std::cout << kProgram << ": iteration " << it << " took " << std::fixed
                    << std::setprecision(2)
                    << std::chrono::duration<double, std::milli>(now - *last).count() << " ms\n";
          *last = now;
        },
        mpu::every_iterations(1), mpu::kPriorityWriter + 100));
  }

  if (resume_path) {
    std::cout << kProgram << ": resuming from " << *resume_path << "\n";
    trainer.resume(*resume_path);
  } else if (c.resume == "auto") {
    std::cout << kProgram << ": no snapshot in " << c.out << "; starting from the beginning\n";
  }
  *factor = lr_factor(c, updater.epoch_detail() + half_step);
  set_lr(*optimizer, base_lr, *factor);

  std::cout << kProgram << ": " << c.arch << " (" << with_commas(parameters) << " parameters, "
            << c.precision << ") on " << n
            << (on_gpu ? " GPU(s) (NCCL)" : " CPU process(es) (Gloo)") << "; batch " << c.batch_size
            << " per device ("
            << (c.accumulate > 1 ? "x " + std::to_string(c.accumulate) + " accumulated, " : "")
            << c.batch_size * n * c.accumulate << " per step in all); " << c.strategy
            << " strategy; " << c.optimizer << " lr " << c.lr << ", " << c.schedule << " schedule; "
            << (c.synthetic
                    ? std::to_string(c.iterations) + " iterations of synthetic " +
                          std::to_string(kSyntheticSize) + "x" + std::to_string(kSyntheticSize) +
                          " data"
                    : std::to_string(c.epochs) + " epoch(s) of Fashion-MNIST (" +
                          std::to_string(train->size()) + " training images) from " + data_dir)
            << "\n";
  std::cout.flush();

  if (c.synthetic && warmup == 0) timing->start = std::chrono::steady_clock::now();
  trainer.run();
  updater.finalize();

  if (c.synthetic) {
    const double seconds = std::chrono::duration<double>(timing->end - timing->start).count();
    const double images =
        static_cast<double>((updater.iteration() - warmup) * c.batch_size * n * c.accumulate);
    std::cout << kProgram << ": " << std::fixed << std::setprecision(1) << images / seconds
              << " images/s (" << c.arch << ", " << c.precision << ", " << c.strategy << ", " << n
              << " device(s), " << updater.iteration() - warmup << " iterations after " << warmup
              << " warm-up, batch " << c.batch_size << " per device"
              << (c.accumulate > 1 ? " x " + std::to_string(c.accumulate) + " accumulated" : "")
              << ")\n";
    return 0;
  }
  const auto log = trainer.get_extension<mpu::LogReport>("LogReport");
  if (log && !log->log().empty()) {
    const auto& row = log->log().back();
    const auto acc = row.values.find("validation/main/accuracy");
    if (acc != row.values.end()) {
      std::cout << kProgram << ": final test accuracy " << format_percent(acc->second) << " after "
                << row.epoch << " epoch(s), " << std::fixed << std::setprecision(0)
                << row.elapsed_time << " s of training\n";
    }
  }
  std::cout << kProgram << ": log   " << log_path << "\n";
  if (loss_plotter && !loss_plotter->drawn()) {
    std::cout << kProgram << ": plots not drawn (no gnuplot); their data is in " << c.out
              << "/loss.dat and " << c.out << "/accuracy.dat\n";
  } else {
    std::cout << kProgram << ": plots " << loss_plot << ", " << accuracy_plot << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  const std::string description =
      std::string(
          "Trains a ResNet on Fashion-MNIST (or synthetic ImageNet-shaped data) with "
          "torch-mpu's MultiprocessParallelUpdater: one process per GPU (NCCL), or CPU "
          "processes (Gloo) where there is no GPU. Defaults depend on that: on GPUs ") +
      kGpuDefaults.arch + ", batch " + std::to_string(kGpuDefaults.batch_size) + " per device, " +
      std::to_string(kGpuDefaults.epochs) + " epochs; on CPUs " + kCpuDefaults.arch +
      ", 2 processes, batch " + std::to_string(kCpuDefaults.batch_size) + ", " +
      std::to_string(kCpuDefaults.epochs) + " epochs.";
  CLI::App app{description, kProgram};
  app.add_option("--arch", c.arch, "Model (default: resnet18 on GPUs, resnet20 on CPUs)")
      ->check(CLI::IsMember(resnet::architectures()));
  app.add_option("--devices", c.devices,
                 "Processes: the first N GPUs, or N CPU processes where there is no GPU "
                 "(default: every GPU, or 2)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--epochs", c.epochs,
                 "Epochs " + by_device(kGpuDefaults.epochs, kCpuDefaults.epochs))
      ->check(CLI::Range(1, 100000));
  app.add_option("--batch-size", c.batch_size,
                 "Batch per device " + by_device(kGpuDefaults.batch_size, kCpuDefaults.batch_size))
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  app.add_option("--lr", c.lr,
                 "Learning rate for the total batch (default: 0.1 for sgd, 0.001 for adam/adamw); "
                 "torch-mpu rescales the optimizer for the number of processes")
      ->check(CLI::PositiveNumber);
  app.add_option("--optimizer", c.optimizer, "sgd (momentum), adam or adamw")
      ->check(CLI::IsMember({"sgd", "adam", "adamw"}))
      ->capture_default_str();
  app.add_option("--momentum", c.momentum, "SGD momentum")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--weight-decay", c.weight_decay,
                 "Weight decay (default: 5e-4 for sgd, 0 for adam, 0.05 for adamw)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--schedule", c.schedule,
                 "Learning-rate schedule after the warm-up: cosine, step (x0.1 at 50 % and 75 % "
                 "of the epochs) or constant")
      ->check(CLI::IsMember({"cosine", "step", "constant"}))
      ->capture_default_str();
  app.add_option("--warmup-epochs", c.warmup_epochs,
                 "Epochs of linear learning-rate warm-up " +
                     by_device(kGpuDefaults.warmup_epochs, kCpuDefaults.warmup_epochs) +
                     "; none with --synthetic")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--precision", c.precision,
                 "Precision policy: fp32; bf16_autocast or fp16_autocast (fp32 parameters, the "
                 "forward under autocast; fp16 with dynamic loss scaling); bf16_mixed or "
                 "fp16_mixed (parameters in bf16/fp16, fp32 master weights in the flat step; "
                 "fp16 with loss scaling). bf16 and fp16: the whole model in that dtype, no "
                 "master copy (less accurate). fp16 policies are for GPUs")
      ->check(CLI::IsMember(
          {"fp32", "bf16_autocast", "fp16_autocast", "bf16_mixed", "fp16_mixed", "bf16", "fp16"}))
      ->capture_default_str();
  app.add_option("--strategy", c.strategy,
                 "Synchronisation: master (gradients reduced to the master, which alone steps "
                 "and broadcasts the parameters), replicated (gradients allreduced, every "
                 "process steps, as DDP) or sharded (ZeRO-1: reduce-scatter, each process steps "
                 "its shard of the parameters and optimizer state, allgather)")
      ->capture_default_str();
  app.add_option("--bucket-mb", c.bucket_mb,
                 "Gradients are communicated in buckets of this many MiB (of the wire dtype) "
                 "while backward runs; 0: one bucket after backward (default: 25)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--wire-dtype", c.wire_dtype,
                 "Dtype in which gradients travel: fp32, bf16 or fp16 (fp16 is scaled by 1/N "
                 "before the cast, so that the sum cannot overflow); auto: the compute dtype "
                 "under bf16_mixed/fp16_mixed, else fp32")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}))
      ->capture_default_str();
  app.add_flag("--no-flat-step", c.no_flat_step,
               "Step the optimizer per parameter (its own step()) instead of over the flat "
               "parameter buffer");
  app.add_option("--accumulate", c.accumulate,
                 "Gradient accumulation: each step runs K micro-batches of --batch-size per "
                 "device and communicates once; the effective batch is K times larger")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  app.add_option("--data", c.data,
                 "Fashion-MNIST directory (default: $FASHION_MNIST_DIR, else "
                 "/usr/share/datasets/fashion-mnist)");
  app.add_option("--out", c.out, "Output directory: log, plots, snapshots")->capture_default_str();
  app.add_option("--resume", c.resume,
                 "Continue from a snapshot: its path, or 'auto' for the latest in --out (if any)");
  app.add_flag("--synthetic", c.synthetic,
               "Random ImageNet-shaped data (3x224x224, 1000 classes) to measure throughput; "
               "prints images/s. No evaluation, no snapshots");
  app.add_option("--iterations", c.iterations, "Iterations with --synthetic")
      ->check(CLI::Range(std::int64_t{2}, std::int64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--warmup-iterations", c.warmup_iterations,
                 "Iterations left out of the --synthetic throughput")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--train-size", c.train_size,
                 "Train on a fixed random subset of this many training images, for short runs "
                 "(default: all 60,000)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--label-smoothing", c.label_smoothing,
                 "Label smoothing of the cross-entropy loss (training and test loss alike)")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  app.add_option("--crop-padding", c.crop_padding, "Zero padding of the random 28x28 crop")
      ->check(CLI::Range(0, 14))
      ->capture_default_str();
  app.add_option("--data-on", c.data_on,
                 "Where batches are formed: device (the images uploaded once to each GPU, "
                 "augmented there by one kernel per batch; an error when they do not fit), host "
                 "(transforms on the CPU, a prefetching iterator), or auto (device on GPUs when "
                 "the images fit in half the free memory, else host, said in one line)")
      ->check(CLI::IsMember({"auto", "device", "host"}))
      ->capture_default_str();
  app.add_flag("--cuda-graph", c.cuda_graph,
               "Capture the training step into a CUDA graph after 3 eager steps and replay it "
               "(one GPU; bf16_mixed, bf16_autocast or fp32)");
  app.add_flag("--channels-last", c.channels_last,
               "Run the convolutions in channels_last (NHWC) memory format: the activations "
               "are made channels_last after the stem");
  app.add_option("--snapshot-every", c.snapshot_every,
                 "Write a snapshot every this many epochs, keeping the last two (0: none; "
                 "--resume then has nothing to resume from)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_flag("--cudnn-benchmark", c.cudnn_benchmark,
               "Time cuDNN's convolution algorithms for each new shape on the first steps "
               "instead of taking its heuristics' choice (on GPUs). Measured on an H100 with "
               "ResNet-18: about 4 % faster steps, for 2 to 9 s more start-up (docs/resnet.md)");
  app.add_option("--trace-iterations", c.trace_iterations,
                 "Diagnostics: wait for the device after each of the first N iterations and "
                 "print its wall time (slows those iterations; 0: off)")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--threads", c.threads,
                 "Intra-op threads of the master process on CPUs (default: 1 with several CPU "
                 "processes; workers always use 1)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--seed", c.seed, "Seed of initialisation, shuffling, augmentation")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    std::cerr << kProgram << ": " << e.what() << " (see --help)\n";
    return kExitUsage;
  }
  try {
    return run(c);
  } catch (const UsageError& e) {
    std::cerr << kProgram << ": " << e.what() << "\n";
    return kExitUsage;
  } catch (const mpu::Interrupted& e) {
    // The status a shell reports for a process killed by that signal.
    std::cerr << kProgram << ": " << e.what() << "\n";
    return 128 + e.signal();
  } catch (const std::exception& e) {
    std::cerr << kProgram << ": " << e.what() << "\n";
    return kExitFailure;
  }
}
