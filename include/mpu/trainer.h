/// \file
/// The training loop, as in Chainer: a `Trainer` drives an `Updater` until a stop trigger is
/// reached and runs `Extension`s (logging, snapshots, evaluation, ...) when their triggers fire.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mpu/defaults.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"

namespace mpu {

class Trainer;

/// What an `IntervalTrigger` counts: iterations (`update()` calls) or epochs of the main iterator.
enum class TriggerUnit { kIteration, kEpoch };

/// A period of `period` iterations or epochs. Stateless: whether it fires depends only on the
/// updater's counters, so it behaves the same after a resume.
class IntervalTrigger {
 public:
  /// `period` must be positive.
  IntervalTrigger(std::int64_t period, TriggerUnit unit);

  /// The number of iterations or epochs between two firings.
  std::int64_t period() const { return period_; }
  /// Whether `period()` counts iterations or epochs.
  TriggerUnit unit() const { return unit_; }

  /// True right after the update that completes a multiple of `period` iterations
  /// (`iteration() % period == 0`) or epochs (`is_new_epoch() && epoch() % period == 0`).
  bool fires(const Updater& updater) const;
  /// True once `period` iterations or epochs are complete: the Trainer's stop condition.
  bool reached(const Updater& updater) const;
  /// The fraction of the way to `reached()`, in [0, 1]: iteration / period, or
  /// epoch_detail / period.
  double progress(const Updater& updater) const;

 private:
  std::int64_t period_;
  TriggerUnit unit_;
};

/// Fires every `n` iterations / epochs.
IntervalTrigger every_iterations(std::int64_t n);
/// Fires at the end of every `n`-th epoch.
IntervalTrigger every_epochs(std::int64_t n);
/// Stop after `n` iterations / epochs (the same triggers, read as "stop once reached").
IntervalTrigger stop_after_iterations(std::int64_t n);
/// Stops once `n` epochs are complete.
IntervalTrigger stop_after_epochs(std::int64_t n);

/// When an extension runs: an IntervalTrigger, or any `bool(const Trainer&)` predicate.
class Trigger {
 public:
  /// Implicit, so that `every_epochs(1)` and a lambda both convert to a Trigger.
  Trigger(IntervalTrigger interval);
  /// A trigger that fires when `predicate(trainer)` is true. Implicit, like the other constructor.
  template <typename F, std::enable_if_t<std::is_invocable_r_v<bool, F&, const Trainer&>, int> = 0>
  Trigger(F predicate) : predicate_(std::move(predicate)) {}

  /// True when the extension should run after the current update.
  bool operator()(const Trainer& trainer) const;
  /// The interval, when this trigger is one.
  const std::optional<IntervalTrigger>& interval() const { return interval_; }

 private:
  std::optional<IntervalTrigger> interval_;
  std::function<bool(const Trainer&)> predicate_;
};

/// Extension priorities, as in Chainer: higher runs first within an iteration. Writers add to
/// the observation (Evaluator), editors summarise it (LogReport), readers only read it.
inline constexpr int kPriorityWriter = 300;
/// Priority of extensions that summarise the observation (LogReport).
inline constexpr int kPriorityEditor = 200;
/// Priority of extensions that only read (PrintReport, ProgressBar, PlotReport); the default.
inline constexpr int kPriorityReader = 100;
/// Snapshot runs after everything else, so that its state includes this iteration's log row.
inline constexpr int kPrioritySnapshot = -100;

/// Something the Trainer runs when its trigger fires, after the iteration's update.
///
/// Contract:
/// - The Trainer copies an extension passed by value; pass a `shared_ptr` to keep access.
/// - Extensions run only in the process where `updater.is_main()`, unless `all_ranks()`; an
///   all-ranks extension must take the same decisions on every rank (its collectives match).
/// - `initialize()` runs once at the start of `Trainer::run()` (after any resume); `finalize()`
///   runs once at its end, also when it ends with an exception.
/// - `save()`/`load()` carry the state a resume needs; they run on every rank.
class Extension {
 public:
  virtual ~Extension() = default;

  /// The default name; duplicates get "_1", "_2", ... The snapshot stores state by name.
  virtual std::string name() const = 0;
  /// When the extension runs unless `Trainer::extend` is given a trigger; every iteration by
  /// default.
  virtual Trigger default_trigger() const { return every_iterations(1); }
  /// Higher runs first within an iteration; `kPriorityReader` by default.
  virtual int priority() const { return kPriorityReader; }
  /// True when the extension runs on every rank, not only where `updater.is_main()`.
  virtual bool all_ranks() const { return false; }

  /// Runs once at the start of `Trainer::run()`, after any resume.
  virtual void initialize(Trainer& trainer) {}
  /// Runs after an update when the trigger fires.
  virtual void operator()(Trainer& trainer) = 0;
  /// Runs once at the end of `Trainer::run()`. When `run()` ends with an exception, what
  /// `finalize()` throws is logged, and the first exception propagates.
  virtual void finalize() {}
  /// Runs when `Trainer::run()` stops on SIGINT or SIGTERM: after the last complete iteration
  /// (and its extensions), before `finalize()`, where the extension runs. Snapshot writes a
  /// final snapshot here when asked to (`Snapshot::write_on_interrupt`).
  virtual void interrupted(Trainer& trainer) {}

  /// Writes the state a resume needs into `archive` (its own sub-archive). Runs on every rank.
  virtual void save(torch::serialize::OutputArchive& archive) const {}
  /// Restores what `save()` wrote. Runs on every rank.
  virtual void load(torch::serialize::InputArchive& archive) {}
};

/// An extension from a function (Chainer's `make_extension`).
std::shared_ptr<Extension> make_extension(std::string name, std::function<void(Trainer&)> fn,
                                          Trigger trigger = every_iterations(1),
                                          int priority = kPriorityReader, bool all_ranks = false);

/// The training loop.
///
/// `run()`, in every process that trains (each rank of a DistributedUpdater; the master only
/// of a MultiprocessParallelUpdater, whose workers are driven by the updater):
///   initialize extensions; while the stop trigger is not reached: make a fresh observation
///   current, `updater.update()` (the loss function's `report()` calls land in it), then run
///   the extensions whose triggers fire, highest priority first (ties: order of `extend`);
///   finally finalize the extensions and the updater.
///
/// Signals: while `run()` runs, SIGINT and SIGTERM (unless the program handles or ignores them
/// itself) stop the loop before the next iteration starts: the extensions' `interrupted()` run,
/// then their `finalize()` and the updater's (which stops every worker), and `run()` throws
/// `mpu::Interrupted`. A second signal has its default effect. See docs/reliability.md.
class Trainer {
 public:
  /// `out_dir` is created by `run()` in the main process.
  Trainer(Updater& updater, IntervalTrigger stop, std::string out_dir = kDefaultOutDir);
  ~Trainer() noexcept;
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Registers an extension, copied. `trigger` and `priority` default to the extension's own.
  template <typename E, std::enable_if_t<std::is_base_of_v<Extension, std::decay_t<E>>, int> = 0>
  Trainer& extend(E&& extension, std::optional<Trigger> trigger = std::nullopt,
                  std::optional<int> priority = std::nullopt) {
    return extend(
        std::shared_ptr<Extension>(std::make_shared<std::decay_t<E>>(std::forward<E>(extension))),
        std::move(trigger), priority);
  }
  /// Registers a shared extension.
  Trainer& extend(std::shared_ptr<Extension> extension,
                  std::optional<Trigger> trigger = std::nullopt,
                  std::optional<int> priority = std::nullopt);

  /// Runs the loop until the stop trigger is reached. Runs once per Trainer. Throws
  /// `mpu::Interrupted` when stopped by SIGINT or SIGTERM (see the class comment).
  void run();

  /// The updater the Trainer drives.
  Updater& updater() { return updater_; }
  /// The updater the Trainer drives.
  const Updater& updater() const { return updater_; }
  /// When `run()` stops.
  const IntervalTrigger& stop_trigger() const { return stop_; }
  /// Where the extensions write their files (created by `run()`).
  const std::string& out_dir() const { return out_dir_; }
  /// Seconds of training, including the time before a resume.
  double elapsed_time() const;
  /// The current iteration's observation.
  Observation& observation() { return observation_; }
  /// The current iteration's observation.
  const Observation& observation() const { return observation_; }

  /// The extension registered under `name`, or nullptr.
  std::shared_ptr<Extension> get_extension(const std::string& name) const;
  /// The extension registered under `name` as an `E`, or nullptr when there is none or it is
  /// not an `E`.
  template <typename E>
  std::shared_ptr<E> get_extension(const std::string& name) const {
    return std::dynamic_pointer_cast<E>(get_extension(name));
  }
  /// The names of the registered extensions, in order of registration.
  std::vector<std::string> extension_names() const;

  /// Writes the updater, the trainer's counters and every extension's state. Collective when
  /// the updater's save is (`Updater::collective_save()`), hence not const.
  void save(torch::serialize::OutputArchive& archive);
  /// Reads what `save()` wrote. Throws mpu::InvalidArgument when the archive is not a torch-mpu
  /// snapshot, or when a parameter or buffer of the model changes shape or dtype (another
  /// model's snapshot); torch's own errors (a missing key) pass through as c10::Error. A failed
  /// load leaves the model partially loaded: do not train on.
  void load(torch::serialize::InputArchive& archive);

  /// Writes a snapshot to `path` atomically: a temporary file in the same directory, fsync'ed,
  /// renamed over `path`. On failure `path` is left as it was.
  void save_snapshot(const std::string& path);
  /// Loads a snapshot so that `run()` continues exactly where it was taken. Throws
  /// mpu::InvalidArgument naming `path` and what is wrong when the file is missing, truncated or
  /// corrupt, or holds another model's state. Never writes or removes files. Call it on every
  /// rank, before `run()`.
  void resume(const std::string& path);

 private:
  struct Entry {
    std::string name;
    std::shared_ptr<Extension> extension;
    Trigger trigger;
    int priority;
  };

  bool runs_here(const Extension& extension) const;
  [[noreturn]] void interrupt(const std::vector<Entry*>& active, int signal);
  void finalize_all() noexcept;

  Updater& updater_;
  IntervalTrigger stop_;
  std::string out_dir_;
  std::vector<Entry> extensions_;
  Observation observation_;
  double elapsed_before_ = 0.0;
  std::optional<std::chrono::steady_clock::time_point> start_;
  bool ran_ = false;
};

/// `trainer.resume(path)`.
void resume(Trainer& trainer, const std::string& path);

/// The snapshot in `dir` whose name matches `pattern` (with "{iteration}" and "{epoch}" standing
/// for numbers) with the highest iteration (else epoch; else newest file); nullopt when none.
std::optional<std::string> find_latest_snapshot(
    const std::string& dir, const std::string& pattern = kDefaultSnapshotPattern);

/// `pattern` with "{iteration}" and "{epoch}" replaced by the numbers.
std::string format_snapshot_name(const std::string& pattern, std::int64_t iteration,
                                 std::int64_t epoch);

}  // namespace mpu
