/// \file
/// Observations, as in Chainer's reporter: `mpu::report("loss", loss)` from inside a loss
/// function records a value under the current scope's prefix ("main/loss") in the observation
/// that the Trainer made current for this iteration.
///
/// Reporting never synchronises with the GPU: values are kept as detached device tensors and are
/// converted to host doubles only when a summary is read (for instance when LogReport writes a
/// row).
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

namespace mpu {

/// The values reported during one iteration (or one evaluation batch), by full key such as
/// "main/loss". Each value is a detached 0-dim tensor on the device where it was computed.
using Observation = std::map<std::string, torch::Tensor>;

/// Records `value` under the current prefix + `key` in this thread's current observation.
/// `value` must have exactly one element; it is stored detached and reshaped to 0-dim, without a
/// copy to the host. Do not modify it in place afterwards. A key reported twice in one
/// observation keeps the last value. Does nothing when no observation is current: in a worker
/// process of a MultiprocessParallelUpdater, or when a loss function is called outside a Trainer.
void report(const std::string& key, const torch::Tensor& value);
/// As above, for a host value (stored as a 0-dim float64 CPU tensor).
void report(const std::string& key, double value);

/// Makes `observation` this thread's current observation until destruction, then restores the
/// previous one. (Chainer's `reporter.scope(observation)`.)
class ObservationScope {
 public:
  /// Makes `observation`, which must outlive the scope, the current observation.
  explicit ObservationScope(Observation& observation) noexcept;
  ~ObservationScope() noexcept;
  ObservationScope(const ObservationScope&) = delete;
  ObservationScope& operator=(const ObservationScope&) = delete;

 private:
  Observation* previous_;
};

/// Prefixes keys reported in this thread with `prefix + "/"` until destruction. Scopes nest:
/// ReportScope("validation") inside which ReportScope("main") is open gives
/// "validation/main/loss". Updaters open "main" around the loss function; the Evaluator opens
/// "validation/main" (its name + "/main").
class ReportScope {
 public:
  /// Opens `prefix` (not empty) inside the current prefix.
  explicit ReportScope(const std::string& prefix);
  ~ReportScope() noexcept;
  ReportScope(const ReportScope&) = delete;
  ReportScope& operator=(const ReportScope&) = delete;

 private:
  std::string previous_;
};

/// This thread's current observation, or nullptr outside every ObservationScope.
Observation* current_observation() noexcept;

/// This thread's key prefix: "" outside every ReportScope, else e.g. "main/".
const std::string& current_report_prefix() noexcept;

/// The fraction of rows of `logits` ([N, C]) whose argmax equals `target` ([N] class indices),
/// as a 0-dim float tensor on logits' device. Does not synchronise with the device.
torch::Tensor accuracy(const torch::Tensor& logits, const torch::Tensor& target);

/// A running weighted mean of scalar values. The weighted sum accumulates in float64 on the
/// values' device; only `sum()` and `mean()` copy it to the host.
class Summary {
 public:
  /// Adds `value` (one element) with `weight` (> 0).
  void add(const torch::Tensor& value, double weight = 1.0);
  /// Adds a host `value` with `weight` (> 0).
  void add(double value, double weight = 1.0);
  /// A summary whose weighted sum is `sum` and total weight is `weight` (used by resume).
  static Summary restore(double sum, double weight);

  /// True when nothing was added.
  bool empty() const { return weight_ == 0.0; }
  /// The total weight added.
  double weight() const { return weight_; }
  /// The weighted sum, as a 0-dim float64 tensor on the device of the values (undefined when
  /// empty). No host synchronisation.
  const torch::Tensor& sum_tensor() const { return sum_; }
  /// The weighted sum on the host; synchronises with the device.
  double sum() const;
  /// The weighted mean on the host; synchronises with the device. Throws when empty.
  double mean() const;

 private:
  torch::Tensor sum_;
  double weight_ = 0.0;
};

/// A Summary per observation key, as Chainer's DictSummary.
class DictSummary {
 public:
  /// Adds every value of `observation` with `weight`.
  void add(const Observation& observation, double weight = 1.0);
  /// Adds one `value` under `key` with `weight`.
  void add(const std::string& key, const torch::Tensor& value, double weight = 1.0);

  /// The mean of every key; synchronises with the device.
  std::map<std::string, double> mean() const;

  /// True when nothing was added since construction or `clear()`.
  bool empty() const { return summaries_.empty(); }
  /// Forgets every key.
  void clear() { summaries_.clear(); }
  /// The Summary of each key.
  const std::map<std::string, Summary>& summaries() const { return summaries_; }
  /// The Summary of each key, mutable (for restoring a snapshot).
  std::map<std::string, Summary>& summaries() { return summaries_; }

 private:
  std::map<std::string, Summary> summaries_;
};

}  // namespace mpu
