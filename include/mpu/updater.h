/// \file
/// Updaters: what one training iteration does. The Trainer drives any `Updater`.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mpu/defaults.h"
#include "mpu/iterator.h"
#include "mpu/precision.h"
#include "mpu/scaling.h"

#include "mpu/error.h"

namespace mpu {

class Communicator;

/// One training iteration, as the `Trainer` and its extensions see it.
///
/// Contract:
/// - `update()` runs exactly one iteration: fetch, forward, backward, synchronise, step.
/// - `iteration()` counts completed `update()` calls, including those before a resume.
/// - `epoch()`, `epoch_detail()` and `is_new_epoch()` come from the main iterator.
/// - `is_main()` is true in the process that runs the extensions: the master of a
///   `MultiprocessParallelUpdater`, rank 0 of a `DistributedUpdater`, the only process of a
///   `StandardUpdater`.
/// - `save()`/`load()` carry everything a resume needs: model, optimizer, iterator position
///   and the iteration count. `load()` after construction continues exactly where `save()` was.
/// - `finalize()` releases processes and communicators; it is idempotent and is also called by
///   the destructor.
class Updater {
 public:
  virtual ~Updater() = default;

  /// Runs one training iteration (see the class contract).
  virtual void update() = 0;
  /// Completed `update()` calls, including those before a resume.
  virtual std::int64_t iteration() const = 0;
  /// Completed epochs of the main iterator.
  virtual std::int64_t epoch() const = 0;
  /// Epochs as a fraction: `epoch()` plus the share of the current epoch already served.
  virtual double epoch_detail() const = 0;
  /// True right after the `update()` whose batch crossed an epoch end.
  virtual bool is_new_epoch() const = 0;

  /// True in the process where extensions run.
  virtual bool is_main() const { return true; }
  /// This process's rank among the updater's processes (0 for the main one).
  virtual int rank() const { return 0; }
  /// Number of processes the updater trains with.
  virtual int world_size() const { return 1; }
  /// The communicator shared by all ranks, or nullptr when there is none (one process, or the
  /// master of a MultiprocessParallelUpdater whose collectives run inside the updater).
  virtual Communicator* communicator() { return nullptr; }
  /// The device this process computes on.
  virtual torch::Device device() const = 0;
  /// The precision policy the updater trains under; `Evaluator` runs its loss function under
  /// the same autocast.
  virtual Precision precision() const { return Precision::kFp32; }
  /// The model being trained (on this process).
  virtual torch::nn::Module& model() = 0;

  /// Writes model, optimizer, iterator position and iteration count into `archive`. Not const:
  /// saving may run collectives and message the workers (the sharded optimizer state is gathered
  /// from every rank, a MultiprocessParallelUpdater asks its workers for their iterators), so
  /// every rank's updater takes part and its communicator advances.
  virtual void save(torch::serialize::OutputArchive& archive) = 0;
  /// Restores what `save()` wrote; the next `update()` continues exactly where it was saved.
  virtual void load(torch::serialize::InputArchive& archive) = 0;

  /// Releases processes and communicators. Idempotent; the destructor calls it too.
  virtual void finalize() {}

  /// True when `save()` is collective: every rank must call it (Strategy::kSharded under a
  /// DistributedUpdater, whose optimizer state is spread over the ranks). Snapshot calls it on
  /// every rank then, and writes the file on the main one only.
  virtual bool collective_save() const { return false; }

  /// Sums `tensor` in place over every rank that runs the Trainer, for extensions that aggregate
  /// across ranks (the Evaluator). Collective: every such rank calls it in the same order with a
  /// tensor of the same shape and dtype, on `device()`. Returns false, leaving `tensor` as it is,
  /// when there is nothing to aggregate: one process, or the master of a
  /// MultiprocessParallelUpdater (whose workers run no Trainer). An updater whose ranks each run
  /// a Trainer (`communicator() != nullptr` and `world_size() > 1`) must override it.
  virtual bool allreduce_sum(torch::Tensor& tensor) {
    MPU_CHECK(communicator() == nullptr || world_size() == 1,
              "Updater::allreduce_sum: this updater has ", world_size(),
              " ranks and a communicator but does not override allreduce_sum, so extensions "
              "cannot aggregate across its ranks");
    return false;
  }
};

/// Computes the loss of one batch (already on the updater's device). Call `mpu::report` inside
/// it to record observations; they are kept in the main process only.
using LossFunction = std::function<torch::Tensor(const Batch&)>;

/// Moves a batch to a device. The default moves data and target with `non_blocking = true`.
using Converter = std::function<Batch(const Batch&, const torch::Device&)>;

/// The default converter: `{data.to(device, true), target.to(device, true)}`.
Batch to_device(const Batch& batch, const torch::Device& device);

/// How the data-parallel updaters synchronise one step.
enum class Strategy {
  /// The seed's (default): gradients are reduced to rank 0 in buckets while backward runs, rank 0
  /// alone steps the optimizer, and the parameters are broadcast back.
  kMasterStep,
  /// Gradients are allreduced in buckets while backward runs, and every rank steps its own copy
  /// of the optimizer (as PyTorch's DistributedDataParallel does).
  kReplicated,
  /// ZeRO stage 1: gradients are reduce-scattered, each rank steps its shard of the flat
  /// parameters with its shard of the optimizer state, and the parameters are allgathered.
  /// Optimizer state per rank is about 1/n. Needs an optimizer the flat step supports.
  kSharded,
};

/// "master", "replicated" or "sharded".
const char* to_string(Strategy strategy);
/// The inverse of `to_string`; throws `mpu::InvalidArgument` naming the valid names.
Strategy parse_strategy(const std::string& name);

/// Options shared by every updater.
struct UpdaterOptions {
  /// How gradients are combined across processes, and whether the optimizer is rescaled for it.
  ScalingPolicy scaling = ScalingPolicy::sum();
  /// Moves each batch to the device; empty means `to_device`.
  Converter converter;
  /// Called after an `update()` whose batch crossed an epoch end (Chainer's auto_new_epoch), for
  /// example to step a learning-rate scheduler per epoch. Runs in the main process only.
  std::function<void(Updater&)> on_new_epoch;
  /// Dtype in which gradients travel: torch::kFloat (default), torch::kBFloat16 or torch::kHalf.
  /// fp16 gradients are multiplied by 1/n before the cast and by n after the sum, so that a sum
  /// over n ranks cannot overflow where one rank's gradient does not.
  torch::Dtype wire_dtype = torch::kFloat;
  /// How a step is synchronised across processes (see `Strategy`).
  Strategy strategy = Strategy::kMasterStep;
  /// Gradients are communicated in buckets of about this many bytes (of the wire dtype), each
  /// as soon as backward has produced it. 0 means one bucket after backward (no overlap).
  std::size_t bucket_bytes = kDefaultBucketBytes;
  /// Step the optimizer over the flat parameter buffer (a few kernels per parameter group) when
  /// the optimizer is SGD, Adam, AdamW, Adagrad or RMSprop; other optimizers, and `false`,
  /// use the optimizer's own per-parameter `step()`. Kept state_dict compatible either way.
  bool flat_step = true;
  /// Gradient accumulation: every `update()` runs this many micro-batches (forward and
  /// backward, each taking the next batch of the iterator) and then communicates and steps
  /// once. The micro-batch gradients are summed; the rescaling counts n * accumulation_steps
  /// gradients (mean: the sum is divided by it).
  int accumulation_steps = 1;
  /// Skip the optimizer step, on every rank, when any reduced gradient is NaN or Inf; the skip
  /// is reported as "main/skipped_steps" and logged. One pass over the flat gradient buffer.
  bool skip_nonfinite = false;
  /// Every this many iterations, compare a checksum of the flat parameters across ranks and
  /// throw `mpu::CommError` naming the first rank that differs from rank 0. 0 turns it off.
  std::int64_t drift_check_interval = 0;
  /// MultiprocessParallelUpdater: the master throws `mpu::CommError` naming a worker at most
  /// this long after the worker died (plus the rest of the master's own forward and backward,
  /// when it is not waiting in a collective), with every worker reaped; a worker exits at most
  /// this long after the master died. 0: MPU_WORKER_DEATH_TIMEOUT_SEC when set, else
  /// `kDefaultWorkerDeathTimeout`. See docs/reliability.md.
  std::chrono::milliseconds worker_death_timeout{0};
  /// Deadline of every collective, and of process start-up.
  std::chrono::milliseconds timeout = kDefaultCommTimeout;
  /// How the model trains in reduced precision (see `Precision`). The autocast policies run
  /// `loss_fn` under LibTorch's autocast (backward runs outside it, as torch.autocast
  /// recommends); the mixed policies cast the model's parameters and floating buffers to the
  /// compute dtype when the updater is built and keep fp32 master weights in the flat step
  /// (they need an optimizer the flat step supports). Under bf16_mixed and fp16_mixed the
  /// gradients are in the compute dtype and travel in `wire_dtype` (float32 by default; set it
  /// to the compute dtype to halve the traffic).
  Precision precision = Precision::kFp32;
  /// Dynamic loss scaling of the fp16 policies (GradScaler's defaults). A step whose gradients
  /// overflowed on any rank is skipped on every rank and reported as "main/skipped_steps";
  /// the scale is reported as "main/loss_scale" and saved in snapshots.
  LossScaleOptions loss_scale;
  /// Whole-step CUDA graph: after `cuda_graph_warmup` eager steps, one step (the copy of the
  /// batch into static tensors aside: forward under the policy's autocast, backward, the
  /// gradient reduction and the fused flat optimizer step) is captured into a CUDA graph and
  /// every later step replays it, so that the host launches one graph instead of hundreds of
  /// kernels. The learning rates and step counts of the optimizer are staged on the device
  /// before each replay, so a schedule that changes them keeps working; what `loss_fn` reports
  /// with tensors is reported from the replayed values. A batch whose shapes differ from the
  /// captured one (training iterators wrap around epoch ends, so only a converter or dataset
  /// that changes shapes makes one) runs eagerly, logged once.
  ///
  /// What the graph needs, checked when the updater is built (InvalidArgument naming the
  /// option): a CUDA device; one process (a DistributedUpdater with more than one rank, or a
  /// MultiprocessParallelUpdater with more than one device, is refused: capturing the
  /// communicator's collectives is not built yet); the fused flat step (`flat_step`, an
  /// optimizer it supports); no host-side verdict in the step, so not the fp16 policies (their
  /// loss scaler reads the overflow verdict on the host) and not `skip_nonfinite`; one
  /// micro-batch (`accumulation_steps` 1). `loss_fn` must launch the same kernels on every
  /// call: no host synchronisation (`.item()`, printing or copying a tensor to the host), no
  /// branches on tensor values, no new CPU tensors moved to the GPU. A capture that breaks one
  /// of these throws InvalidArgument with the error of the operation that broke it.
  bool cuda_graph = false;
  /// Eager steps before the capture (at least 1): cuDNN's autotuning, the first step's lazily
  /// created optimizer state and the caching allocator's first allocations happen in them.
  int cuda_graph_warmup = 3;
};

namespace detail {
class SyncEngine;
class StepGraph;
struct PrecisionState;
}  // namespace detail

/// One process, one device (CPU or GPU): next batch -> converter -> loss -> zero grads ->
/// backward -> optimizer step. The reference every data-parallel updater is tested against.
class StandardUpdater : public Updater {
 public:
  /// Moves `model` (and the optimizer's state) to `device`. The optimizer must hold the model's
  /// parameters and outlive the updater. The policy's rescaling does not apply (n = 1).
  StandardUpdater(std::shared_ptr<torch::nn::Module> model, torch::optim::Optimizer& optimizer,
                  std::shared_ptr<Iterator> iterator, LossFunction loss_fn,
                  torch::Device device = torch::kCPU, UpdaterOptions options = {});

  ~StandardUpdater() override;

  void update() override;
  std::int64_t iteration() const override { return iteration_; }
  std::int64_t epoch() const override;
  double epoch_detail() const override;
  bool is_new_epoch() const override;
  torch::Device device() const override { return device_; }
  Precision precision() const override { return options_.precision; }
  torch::nn::Module& model() override { return *model_; }
  /// Steps skipped for non-finite gradients (precision policies with loss scaling).
  std::int64_t skipped_steps() const;
  /// The current loss scale (1 without loss scaling).
  double loss_scale() const;
  /// Steps replayed from the captured CUDA graph so far (UpdaterOptions::cuda_graph; the
  /// capture's own step counts as one); 0 without it.
  std::int64_t graph_replays() const;
  /// The optimizer, as passed in.
  torch::optim::Optimizer& optimizer() { return optimizer_; }
  /// The iterator, as passed in.
  Iterator& iterator() { return *iterator_; }

  void save(torch::serialize::OutputArchive& archive) override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  std::shared_ptr<torch::nn::Module> model_;
  torch::optim::Optimizer& optimizer_;
  std::shared_ptr<Iterator> iterator_;
  LossFunction loss_fn_;
  torch::Device device_;
  UpdaterOptions options_;
  std::int64_t iteration_ = 0;
  std::shared_ptr<Communicator> local_;       // precision policies: one rank, nothing sent
  std::unique_ptr<detail::SyncEngine> step_;  // null under fp32 without cuda_graph
  std::unique_ptr<detail::StepGraph> graph_;  // UpdaterOptions::cuda_graph
  void make_engine();
};

namespace detail {
struct WorkerSet;
}  // namespace detail

/// Chainer's MultiprocessParallelUpdater: one process (the master) drives one worker process per
/// extra device. Its API and semantics are the seed's:
///
/// - The master owns the model and the optimizer; `devices[0]` is the master's device and
///   `iterators[i]` feeds `devices[i]`.
/// - Workers are forked lazily, at the first `update()`. Each worker sets one intra-op thread
///   (GNU OpenMP does not survive a fork), moves its copy of the model to its device and joins
///   the communicator (NCCL for GPUs, with the unique id sent through a pipe; Gloo for CPUs,
///   through a TCPStore the master serves).
/// - Each `update()`: the master sends "update" to every worker; every process runs forward
///   and backward on its own batch; gradients are reduced (summed, or averaged with
///   `ScalingPolicy::mean()`) to the master, which alone steps the optimizer; the parameters
///   are broadcast back. Every process ends the step with bit-identical parameters.
/// - The optimizer is rescaled once, at construction, for `devices.size()` processes.
/// - Only the master reports observations and runs extensions.
/// - `finalize()`, and the destructor, stop and reap every worker.
///
/// Because it forks, CUDA must not be initialised in this process before the first `update()`:
/// count GPUs with `mpu::local_gpus()` (NVML), never with torch::cuda. It is checked.
///
/// Threads at the fork. The first `update()` forks while this process may already run threads,
/// and a child keeps only the forking thread: a lock another thread held at the fork stays
/// held in the worker forever. So:
/// - LibTorch's intra-op pool (GNU OpenMP) is reset to one thread in each worker before any op.
/// - The updater itself starts no thread before the forks: its death watch of the workers and
///   (for CPUs) the TCPStore server start after the last fork.
/// - Threads of your own (a data loader, a logger) that hold a lock the loss function or the
///   iterators need in the worker, at the moment of the first `update()`, are yours to avoid:
///   start them after the first `update()`, or keep them off those locks.
///
/// After a failure (a worker died, a collective failed, the loss function threw) the workers
/// are stopped and reaped, and every later `update()`, `save()` or `load()` throws, repeating
/// the first failure ("unusable because worker 2 (cpu, pid 4711) was killed by signal 9").
/// Build a new updater, and resume from the last snapshot, to go on.
class MultiprocessParallelUpdater : public Updater {
 public:
  /// Throws `mpu::InvalidArgument` when the iterators and devices differ in number, the
  /// iterators' datasets differ in length, a GPU is listed twice or is not present, CPU and GPU
  /// devices are mixed, the model has no parameters, or CUDA is already initialised.
  MultiprocessParallelUpdater(std::shared_ptr<torch::nn::Module> model,
                              torch::optim::Optimizer& optimizer,
                              std::vector<std::shared_ptr<Iterator>> iterators,
                              LossFunction loss_fn, std::vector<torch::Device> devices,
                              UpdaterOptions options = {});
  /// Chainer's dict form: `devices["main"]` is the master's device, the others follow in key
  /// order, matched with `iterators[1..]`.
  MultiprocessParallelUpdater(std::shared_ptr<torch::nn::Module> model,
                              torch::optim::Optimizer& optimizer,
                              std::vector<std::shared_ptr<Iterator>> iterators,
                              LossFunction loss_fn,
                              const std::map<std::string, torch::Device>& devices,
                              UpdaterOptions options = {});
  ~MultiprocessParallelUpdater() override;
  MultiprocessParallelUpdater(const MultiprocessParallelUpdater&) = delete;
  MultiprocessParallelUpdater& operator=(const MultiprocessParallelUpdater&) = delete;

  void update() override;
  std::int64_t iteration() const override { return iteration_; }
  std::int64_t epoch() const override;
  double epoch_detail() const override;
  bool is_new_epoch() const override;
  int world_size() const override { return static_cast<int>(devices_.size()); }
  torch::Device device() const override { return devices_.front(); }
  Precision precision() const override { return options_.precision; }
  torch::nn::Module& model() override { return *model_; }
  /// The master's optimizer (rescaled at construction).
  torch::optim::Optimizer& optimizer() { return optimizer_; }
  /// The devices, the master's first.
  const std::vector<torch::Device>& devices() const { return devices_; }
  /// The changes the rescaling made at construction.
  const std::vector<ScalingChange>& scaling_changes() const { return scaling_changes_; }
  /// Bytes of optimizer state the master holds (0 before the first update).
  std::int64_t optimizer_state_bytes() const;
  /// Process ids of the workers; empty before the first update and after `finalize()`.
  std::vector<int> worker_pids() const;

  void save(torch::serialize::OutputArchive& archive) override;
  /// Restores model, optimizer (with its already rescaled options), iterator and iteration.
  /// Before the first update the workers are forked later from the loaded state; after it, the
  /// parameters are broadcast to the workers at once.
  void load(torch::serialize::InputArchive& archive) override;
  void finalize() override;

 private:
  void start();
  [[noreturn]] void run_worker(int k, int fd) noexcept;
  [[noreturn]] void fail(const std::exception& cause);

  std::shared_ptr<torch::nn::Module> model_;
  torch::optim::Optimizer& optimizer_;
  std::vector<std::shared_ptr<Iterator>> iterators_;
  LossFunction loss_fn_;
  std::vector<torch::Device> devices_;
  UpdaterOptions options_;
  std::vector<ScalingChange> scaling_changes_;
  std::int64_t iteration_ = 0;
  std::shared_ptr<Communicator> comm_;
  std::unique_ptr<detail::SyncEngine> step_;
  std::unique_ptr<detail::StepGraph> graph_;  // UpdaterOptions::cuda_graph
  // What load() read of the precision state before the workers started.
  std::unique_ptr<detail::PrecisionState> pending_precision_;
  std::unique_ptr<detail::WorkerSet> workers_;
  bool finalized_ = false;
};

/// The same step as `MultiprocessParallelUpdater`, with one instance per rank, under
/// `mpu::init()` (torchrun, srun, mpirun) or `mpu::spawn()`. Every rank constructs it with the
/// same model architecture and calls `update()` the same number of times.
///
/// At construction it moves the model to the communicator's device, rescales the optimizer for
/// `comm->size()` processes, checks that every rank has the same parameter names, shapes and
/// dtypes (throwing `mpu::InvalidArgument` that names the first difference), and broadcasts
/// parameters and buffers (BatchNorm running statistics, say) from rank 0.
class DistributedUpdater : public Updater {
 public:
  /// Collective: every rank calls it, with its own `model`, `optimizer` (holding the model's
  /// parameters, outliving the updater) and `iterator` (this rank's shard, for example from
  /// `shard_iterator`). `comm` is the rank's communicator (`mpu::init().comm`, or
  /// `SpawnContext::make_communicator()`). Throws `mpu::InvalidArgument` when an argument is null
  /// or the ranks' models differ, and `mpu::CommError`/`mpu::Timeout` when a rank fails.
  DistributedUpdater(std::shared_ptr<torch::nn::Module> model, torch::optim::Optimizer& optimizer,
                     std::shared_ptr<Iterator> iterator, LossFunction loss_fn,
                     std::shared_ptr<Communicator> comm, UpdaterOptions options = {});
  ~DistributedUpdater() override;

  void update() override;
  std::int64_t iteration() const override { return iteration_; }
  std::int64_t epoch() const override;
  double epoch_detail() const override;
  bool is_new_epoch() const override;
  bool is_main() const override;
  int rank() const override;
  int world_size() const override;
  Communicator* communicator() override { return comm_.get(); }
  torch::Device device() const override;
  Precision precision() const override { return options_.precision; }
  torch::nn::Module& model() override { return *model_; }
  /// This rank's optimizer (rescaled at construction).
  torch::optim::Optimizer& optimizer() { return optimizer_; }
  /// The changes the rescaling made at construction.
  const std::vector<ScalingChange>& scaling_changes() const { return scaling_changes_; }
  /// Bytes of optimizer state this rank holds: about 1/n of the whole under Strategy::kSharded.
  std::int64_t optimizer_state_bytes() const;
  /// Steps skipped so far because a gradient was NaN or Inf (`skip_nonfinite`).
  std::int64_t skipped_steps() const;
  bool collective_save() const override;

  /// Under Strategy::kSharded every rank must call it (it gathers the optimizer state).
  void save(torch::serialize::OutputArchive& archive) override;
  /// Every rank must call it (it broadcasts rank 0's loaded parameters).
  void load(torch::serialize::InputArchive& archive) override;

 private:
  std::shared_ptr<torch::nn::Module> model_;
  torch::optim::Optimizer& optimizer_;
  std::shared_ptr<Iterator> iterator_;
  LossFunction loss_fn_;
  std::shared_ptr<Communicator> comm_;
  UpdaterOptions options_;
  std::vector<ScalingChange> scaling_changes_;
  std::int64_t iteration_ = 0;
  std::unique_ptr<detail::SyncEngine> step_;
  std::unique_ptr<detail::StepGraph> graph_;  // UpdaterOptions::cuda_graph
};

}  // namespace mpu
