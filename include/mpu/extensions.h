/// \file
/// The Trainer's standard extensions, after Chainer's: LogReport, PrintReport, ProgressBar,
/// Snapshot, Evaluator and PlotReport.
///
/// All of them run only in the main process (the master of a MultiprocessParallelUpdater, rank 0
/// of a DistributedUpdater), except the Evaluator, which runs on every rank and averages over
/// them.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mpu/batch.h"
#include "mpu/defaults.h"
#include "mpu/iterator.h"
#include "mpu/reporter.h"
#include "mpu/trainer.h"

namespace mpu {

/// Averages the observations between two firings of its trigger and appends them as one row to
/// a log, written to `out_dir/filename` as a JSON list in Chainer's format:
///   [{"main/loss": 0.52, "validation/main/loss": 0.61, "epoch": 1, "iteration": 469,
///     "elapsed_time": 12.3}, ...]
/// The file is rewritten atomically at every row. Values are converted to host doubles only when
/// a row is made. A non-finite mean is written as null. The log and the partial averages are
/// part of a snapshot.
class LogReport : public Extension {
 public:
  /// One row of the log.
  struct Entry {
    /// Completed epochs when the row was made.
    std::int64_t epoch = 0;
    /// Completed iterations when the row was made.
    std::int64_t iteration = 0;
    /// Seconds of training (the Trainer's clock, continued across resumes).
    double elapsed_time = 0.0;
    /// Mean of each observed key over the interval.
    std::map<std::string, double> values;
  };

  /// `keys`: the observation keys to log (empty: all). `filename`: "" writes no file.
  explicit LogReport(std::vector<std::string> keys = {}, Trigger trigger = every_epochs(1),
                     std::string filename = kDefaultLogFilename);
  /// Logs every key, a row each time `trigger` fires.
  explicit LogReport(Trigger trigger, std::string filename = kDefaultLogFilename);

  std::string name() const override { return "LogReport"; }
  /// Runs every iteration (to accumulate); its own trigger decides when a row is made. An editor,
  /// so that PrintReport sees a row in the iteration it is made, whatever the order of extend().
  Trigger default_trigger() const override { return every_iterations(1); }
  int priority() const override { return kPriorityEditor; }
  void operator()(Trainer& trainer) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// The rows made so far.
  const std::vector<Entry>& log() const { return log_; }
  /// The log as the JSON text written to the file.
  std::string to_json() const;

 private:
  std::vector<std::string> keys_;
  Trigger trigger_;
  std::string filename_;
  DictSummary summary_;
  std::vector<Entry> log_;
};

/// Prints chosen columns of a LogReport's rows as they are made, in Chainer's layout: a header,
/// then one line per row, each column left-aligned in max(10, width of its name) characters.
/// "epoch", "iteration" and "elapsed_time" are columns like any key.
class PrintReport : public Extension {
 public:
  /// `log_report`: the name of the LogReport extension to read. `out`: defaults to std::cout
  /// and must outlive the trainer.
  explicit PrintReport(std::vector<std::string> entries, std::string log_report = "LogReport",
                       std::ostream* out = nullptr);

  std::string name() const override { return "PrintReport"; }
  void initialize(Trainer& trainer) override;
  void operator()(Trainer& trainer) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  void print_header();

  std::vector<std::string> entries_;
  std::string log_report_;
  std::ostream* out_;
  bool terminal_;
  bool header_printed_ = false;
  std::size_t printed_rows_ = 0;
};

/// Shows progress towards the stop trigger every `update_interval` iterations and when training
/// ends: on a terminal, a bar redrawn in place with iterations/s and the estimated time to
/// finish; otherwise (a log file, a pipe) one line per update with the same numbers. Rates are
/// over the last interval.
class ProgressBar : public Extension {
 public:
  /// Writes to std::cout every `update_interval` iterations, with a bar of `bar_length` characters.
  explicit ProgressBar(std::int64_t update_interval = kDefaultProgressUpdateInterval,
                       int bar_length = kDefaultProgressBarLength);

  /// Writes to `out` (which must outlive the trainer) instead of std::cout; `terminal` chooses
  /// the in-place bar. By default: std::cout, and the bar when stdout is a terminal.
  ProgressBar& output(std::ostream& out, bool terminal);

  std::string name() const override { return "ProgressBar"; }
  void initialize(Trainer& trainer) override;
  void operator()(Trainer& trainer) override;
  void finalize() override;

 private:
  void draw(Trainer& trainer);

  std::int64_t update_interval_;
  int bar_length_;
  std::ostream* out_;
  bool terminal_;
  bool drawn_ = false;
  std::int64_t last_iteration_ = 0;
  double last_progress_ = 0.0;
  std::chrono::steady_clock::time_point last_time_;
  Trainer* trainer_ = nullptr;  // between initialize() and finalize()
};

/// Writes a snapshot of the whole training state (model, optimizer, updater and iterator
/// position through `Updater::save`, the trainer's counters and every extension's state) to
/// `out_dir/format_snapshot_name(filename_pattern, iteration, epoch)`, atomically, and then
/// removes the oldest snapshots of the same pattern beyond `keep_last` (0 keeps all). Resume
/// with `trainer.resume(path)` or `find_latest_snapshot(out_dir)`. Runs after every other
/// extension of the iteration, so the snapshot holds this iteration's log row.
class Snapshot : public Extension {
 public:
  /// Names files by `filename_pattern` ("{iteration}" and "{epoch}" replaced) and keeps the last
  /// `keep_last`.
  explicit Snapshot(std::string filename_pattern = kDefaultSnapshotPattern,
                    int keep_last = kDefaultSnapshotKeepLast);

  std::string name() const override { return "snapshot"; }
  Trigger default_trigger() const override { return every_epochs(1); }
  int priority() const override { return kPrioritySnapshot; }
  /// Runs on every rank: ranks other than the main one take part in a collective save
  /// (`Updater::collective_save()`), and otherwise do nothing.
  bool all_ranks() const override { return true; }
  void operator()(Trainer& trainer) override;
  /// Writes a final snapshot when `write_on_interrupt()` was asked for and this iteration has
  /// none yet.
  void interrupted(Trainer& trainer) override;

  /// Also write a snapshot when the run is stopped by SIGINT or SIGTERM.
  Snapshot& write_on_interrupt(bool write = true) {
    on_interrupt_ = write;
    return *this;
  }

  /// The path of the last snapshot written ("" before the first).
  const std::string& last_path() const { return last_path_; }

 private:
  std::string pattern_;
  int keep_last_;
  std::string last_path_;
  bool on_interrupt_ = false;
};

/// A pass over evaluation data: what the Evaluator reads. An mpu::Iterator satisfies it through
/// an adapter.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  /// Starts a new pass from the first batch.
  virtual void reset() = 0;
  /// The next batch of the pass, or nullopt at its end.
  virtual std::optional<Batch> next() = 0;
};

/// A BatchSource over batches held in memory.
class VectorBatchSource : public BatchSource {
 public:
  /// Serves `batches` in order, every epoch.
  explicit VectorBatchSource(std::vector<Batch> batches) : batches_(std::move(batches)) {}
  void reset() override { position_ = 0; }
  std::optional<Batch> next() override {
    if (position_ >= batches_.size()) return std::nullopt;
    return batches_[position_++];
  }

 private:
  std::vector<Batch> batches_;
  std::size_t position_ = 0;
};

/// Runs `loss_fn` over every batch of a validation source and reports the mean of each value it
/// reports, weighted by batch size, as `name + "/main/" + key` ("validation/main/loss") in the
/// trainer's observation.
///
/// Each pass: `source->reset()`, then for every batch: moved to `updater.device()`, called under
/// torch::NoGradGuard with the model in eval() mode (its training mode is restored afterwards),
/// inside ReportScope(name + "/main"). Under an updater whose ranks each run a Trainer (a
/// DistributedUpdater), every rank evaluates its own source and the weighted sums and weights are
/// summed over ranks with `Updater::allreduce_sum`, so every rank gets the global mean: this
/// extension runs on all ranks, and every rank must report the same keys (checked).
/// Serves one epoch of an `mpu::Iterator`: `reset()` rewinds it, `next()` returns its batches
/// until the epoch ends. The iterator must have `repeat(false)`; the constructor throws
/// `mpu::InvalidArgument` otherwise.
class IteratorBatchSource : public BatchSource {
 public:
  /// Serves `iterator`, which must not repeat.
  explicit IteratorBatchSource(std::shared_ptr<Iterator> iterator);
  void reset() override;
  std::optional<Batch> next() override;

 private:
  std::shared_ptr<Iterator> iterator_;
};

/// Evaluates the model on a validation set: one pass over `source` in eval mode under
/// `torch::NoGradGuard`, calling `loss_fn` on each batch (moved to the updater's device) with the
/// reporter prefix "<name>/main", so that `mpu::report("loss", l)` becomes
/// "validation/main/loss". Each key's mean is weighted by batch size. Under a multi-rank updater
/// it runs on every rank, each on its own source, and the means are taken over all ranks' examples
/// (a collective; the ranks must report the same keys, or it throws `mpu::InvalidArgument`).
class Evaluator : public Extension {
 public:
  /// Computes and reports the loss of one batch; the returned tensor is ignored.
  using LossFn = std::function<torch::Tensor(const Batch&)>;

  /// Evaluates every batch of `source`. Throws `mpu::InvalidArgument` when `source` is null,
  /// `loss_fn` is empty or `name` is empty.
  Evaluator(std::shared_ptr<BatchSource> source, LossFn loss_fn, std::string name = "validation");
  /// Evaluates one epoch of `iterator` (see `IteratorBatchSource`).
  Evaluator(std::shared_ptr<Iterator> iterator, LossFn loss_fn, std::string name = "validation")
      : Evaluator(std::make_shared<IteratorBatchSource>(std::move(iterator)), std::move(loss_fn),
                  std::move(name)) {}
  /// Takes any BatchSource by value.
  template <typename S, std::enable_if_t<std::is_base_of_v<BatchSource, std::decay_t<S>>, int> = 0>
  Evaluator(S&& source, LossFn loss_fn, std::string name = "validation")
      : Evaluator(std::shared_ptr<BatchSource>(
                      std::make_shared<std::decay_t<S>>(std::forward<S>(source))),
                  std::move(loss_fn), std::move(name)) {}

  std::string name() const override { return name_; }
  Trigger default_trigger() const override { return every_epochs(1); }
  int priority() const override { return kPriorityWriter; }
  bool all_ranks() const override { return true; }
  void operator()(Trainer& trainer) override;

  /// One full pass; returns the means by full key. Collective under a multi-rank updater.
  std::map<std::string, double> evaluate(Updater& updater);

 private:
  std::shared_ptr<BatchSource> source_;
  LossFn loss_fn_;
  std::string name_;
};

/// Plots the means of `y_keys` over each trigger interval against "epoch" or "iteration" into
/// `out_dir/filename` (a PNG), drawn with gnuplot in the background (the file is replaced
/// atomically when a drawing finishes). The data and the gnuplot script are written
/// next to it (same stem, ".dat" and ".gp"), so the plot can be redrawn by hand. When gnuplot is
/// not on PATH, it says so once, in one line, and keeps writing the data. The plotted points are
/// part of a snapshot.
class PlotReport : public Extension {
 public:
  /// Plots `y_keys` against `x_key` ("epoch" or "iteration"), a point each time `trigger` fires.
  explicit PlotReport(std::vector<std::string> y_keys, std::string x_key = "epoch",
                      Trigger trigger = every_epochs(1),
                      std::string filename = kDefaultPlotFilename);

  std::string name() const override { return "PlotReport"; }
  void initialize(Trainer& trainer) override;
  void operator()(Trainer& trainer) override;
  /// Waits for the last drawing.
  void finalize() override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// Whether an executable `gnuplot` is on PATH.
  static bool gnuplot_available();
  /// Whether the last finished drawing succeeded (after the trainer's run: the final plot).
  bool drawn() const { return drawn_; }

 private:
  struct Point {
    double x;
    std::map<std::string, double> y;
  };
  void write_files(const std::string& out_dir);
  void finish_drawing();
  std::string tmp_name() const;
  std::string err_name() const;

  std::vector<std::string> y_keys_;
  std::string x_key_;
  Trigger trigger_;
  std::string filename_;
  DictSummary summary_;
  std::vector<Point> points_;
  bool gnuplot_ = false;
  bool drawn_ = false;
  int drawing_pid_ = -1;  // the gnuplot drawing in the background, or -1
  std::string drawing_dir_;
};

}  // namespace mpu
