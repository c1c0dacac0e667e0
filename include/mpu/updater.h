/// \file
/// Updaters: what one training iteration does. The Trainer drives any `Updater`.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

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

  virtual void update() = 0;
  virtual std::int64_t iteration() const = 0;
  virtual std::int64_t epoch() const = 0;
  virtual double epoch_detail() const = 0;
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
  /// The model being trained (on this process).
  virtual torch::nn::Module& model() = 0;

  virtual void save(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load(torch::serialize::InputArchive& archive) = 0;

  virtual void finalize() {}

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

}  // namespace mpu
