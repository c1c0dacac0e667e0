// The per-iteration synchronisation of the data-parallel updaters, for every strategy
// (MasterStep, Replicated, Sharded), shared by MultiprocessParallelUpdater (master and workers)
// and DistributedUpdater.
//
// Every rank calls the same methods in the same order. Streams: the communicator orders its
// collectives after torch's current stream and makes torch's current stream wait for them, so
// callers need no host synchronisation; the gradient buckets are the exception: they go out with
// the _async collectives, and torch's stream waits for them only in finish() (zero_grad() and
// the destructor join what an update that threw left unjoined). Bucketed collectives are issued
// from the autograd engine's thread (a post hook on each parameter's gradient accumulator) while
// backward runs; the caller's thread is blocked in backward() meanwhile, so one thread at a time
// uses the communicator.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "mpu/communicator.h"
#include "mpu/flat_buffer.h"
#include "mpu/precision.h"
#include "mpu/updater.h"
#include "optim/optimizer_traits.h"
#include "sync/bucket_scheduler.h"
#include "sync/strategy.h"

namespace mpu {
class FlatOptimizer;
}

namespace mpu::detail {

/// Throws `InvalidArgument` naming the option and its value when `options` are out of range.
void check_options(const UpdaterOptions& options, const char* who);

/// The number of gradients the optimizer's rescaling counts: ranks x accumulation steps.
int gradients_per_step(int world_size, const UpdaterOptions& options);

/// The precision state of a snapshot (see SyncEngine::save_precision).
struct PrecisionState {
  torch::Tensor master;  // fp32 master weights; undefined: none
  bool has_scaler = false;
  double scale = 1.0;
  std::int64_t growth_tracker = 0;
  std::int64_t skipped = 0;
};

/// One rank's share of a data-parallel step. What differs between strategies lives in a
/// `GradSync` (sync/strategy.h); the bucket bookkeeping in a `BucketScheduler`.
class SyncEngine {
 public:
  /// `model` must already be on `comm.device()`, and `optimizer` hold its parameters (on the
  /// ranks that step: rank 0 for MasterStep, every rank otherwise). When every parameter has
  /// one dtype (fp32, bf16 or fp16), parameters and gradients become views into flat buffers
  /// (zero-copy), and gradients are communicated in buckets as backward produces them.
  SyncEngine(torch::nn::Module& model, torch::optim::Optimizer& optimizer, Communicator& comm,
             const UpdaterOptions& options);
  ~SyncEngine();
  SyncEngine(const SyncEngine&) = delete;
  SyncEngine& operator=(const SyncEngine&) = delete;

  /// Zeros every gradient (one fill in zero-copy mode).
  void zero_grad();
  /// Before each micro-batch's backward: buckets are communicated during the backward of the
  /// last micro-batch only.
  void arm(bool last_micro_batch);
  /// After the last backward, on every rank: completes the gradient reduction, steps (rank 0
  /// for MasterStep, every rank otherwise; each rank its shard for Sharded) and leaves every
  /// rank with identical parameters. Returns false when the step was skipped because a
  /// gradient was not finite (`skip_nonfinite`). `iteration` (1-based) drives the drift check.
  bool finish(std::int64_t iteration);

  /// On every rank: the other ranks receive rank 0's parameters.
  void broadcast_parameters();
  /// On every rank: buffers (BatchNorm statistics, counters) are copied from rank 0, exactly:
  /// each dtype's buffers travel as one tensor of that dtype (bool as uint8, int8 and int16 as
  /// int32).
  void broadcast_buffers();
  /// On every rank: throws `mpu::InvalidArgument` on every rank when parameter names, shapes
  /// or dtypes differ between ranks; the differing rank's message names the first difference.
  void check_same_layout();

  /// True when saving needs every rank (Sharded: the optimizer state is spread over ranks).
  bool collective_save() const;
  /// Collective when `collective_save()`: writes the whole optimizer state into the optimizer
  /// so that `optimizer.save()` is complete on every rank. A no-op otherwise.
  void gather_state_for_save();
  /// After the save: drops the gathered state again (Sharded). A no-op otherwise.
  void release_saved_state();

  /// Bytes of optimizer state this rank holds.
  std::int64_t optimizer_state_bytes() const;
  /// Steps skipped because of non-finite gradients so far.
  std::int64_t skipped_steps() const { return skipped_; }
  /// Whether the optimizer steps through the flat step on this rank.
  bool flat_step() const { return flat_opt_ != nullptr; }
  /// The flat step of this rank, or nullptr (see flat_step()).
  FlatOptimizer* flat_optimizer() { return flat_opt_.get(); }
  /// Number of gradient buckets communicated during backward (0: one collective after it, or
  /// none on a single rank).
  std::size_t bucket_count() const { return buckets_ ? buckets_->size() : 0; }
  const FlatBuffer& flat() const { return flat_; }

  /// The factor the loss is multiplied by before backward: the loss scale under the fp16
  /// policies, else 1.
  double loss_scale() const { return scaling_ ? scaler_.scale() : 1.0; }
  /// The precision state a snapshot needs beyond the model and the optimizer: the fp32 master
  /// weights (mixed policies; complete after `gather_state_for_save` under Sharded) and the
  /// loss scaler (fp16 policies). Written by the rank that saves.
  void save_precision(torch::serialize::OutputArchive& archive) const;
  /// What `save_precision` wrote, read for `apply_precision`; throws `InvalidArgument` when
  /// the policy needs state the archive lacks.
  static PrecisionState read_precision(torch::serialize::InputArchive& archive,
                                       const UpdaterOptions& options);
  /// Takes a loaded state on this rank; `broadcast_parameters()` then hands rank 0's to the
  /// others.
  void apply_precision(const PrecisionState& state);

 private:
  struct HookTarget;

  void install_hooks(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                     std::int64_t cap_bytes);
  void on_gradient_ready(std::size_t entry);
  void launch(std::size_t bucket);
  void reduce_gradients();
  void unscale_gradients(double factor);
  bool gradients_finite();
  void check_drift(std::int64_t iteration);
  void join_buckets();

  torch::nn::Module& model_;
  torch::optim::Optimizer& optimizer_;
  Communicator& comm_;
  bool skip_nonfinite_;
  Precision precision_;
  bool scaling_;          // dynamic loss scaling (fp16 policies)
  LossScaler scaler_;     // every rank's copy follows the verdict all ranks agreed on
  torch::Tensor master_;  // mixed policies, on the ranks that step: the fp32 master weights
  std::int64_t drift_interval_;
  Strategy strategy_;
  FlatBuffer flat_;
  SyncContext ctx_;
  std::unique_ptr<GradSync> sync_;
  std::unique_ptr<FlatOptimizer> flat_opt_;

  std::unique_ptr<BucketScheduler> buckets_;  // null: one reduction after backward
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  std::shared_ptr<HookTarget> hook_target_;
  bool armed_ = false;
  bool unjoined_ = false;  // a bucket went out with an _async collective and is not joined yet
  std::int64_t skipped_ = 0;
};

}  // namespace mpu::detail
