/// \file
/// Precision policies of the updaters (`UpdaterOptions::precision`) and dynamic loss scaling.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace mpu {

/// How a model is trained in reduced precision.
enum class Precision {
  /// Parameters, gradients and the step in fp32.
  kFp32,
  /// fp32 parameters; the loss function runs under LibTorch's autocast to bf16.
  kBf16Autocast,
  /// fp32 parameters; autocast to fp16, with dynamic loss scaling.
  kFp16Autocast,
  /// Parameters (and floating buffers) stored in bf16 for compute, gradients in bf16, and an
  /// fp32 master copy in one flat buffer that the optimizer steps; the bf16 parameters are
  /// refreshed from it in the same pass. The loss function runs under autocast to bf16.
  kBf16Mixed,
  /// As kBf16Mixed in fp16, with dynamic loss scaling.
  kFp16Mixed,
};

/// "fp32", "bf16_autocast", "fp16_autocast", "bf16_mixed", "fp16_mixed".
std::string to_string(Precision p);
/// The inverse of `to_string`; throws `mpu::InvalidArgument` naming the text and the valid
/// names.
Precision parse_precision(const std::string& name);
/// The dtype in which the forward runs: kFloat, kBFloat16 or kHalf.
torch::Dtype compute_dtype(Precision p);
/// True for kBf16Mixed and kFp16Mixed (fp32 master weights).
bool has_master_weights(Precision p);
/// True for every policy but kFp32.
bool uses_autocast(Precision p);
/// True for kFp16Autocast and kFp16Mixed.
bool uses_loss_scaling(Precision p);

/// Dynamic loss scaling, with the defaults of PyTorch's torch.amp.GradScaler.
struct LossScaleOptions {
  /// The scale the loss is multiplied by at the first step.
  double init_scale = 65536.0;
  /// Multiplies the scale after `growth_interval` steps in a row without overflow.
  double growth_factor = 2.0;
  /// Multiplies the scale after a step whose gradients overflowed (that step is skipped).
  double backoff_factor = 0.5;
  /// Overflow-free steps in a row after which the scale grows.
  std::int64_t growth_interval = 2000;
};

/// The loss scale of one rank. Every rank updates its own copy from the verdict all ranks
/// agreed on, so the copies stay equal without being sent.
class LossScaler {
 public:
  /// Starts at `options.init_scale`; throws `mpu::InvalidArgument` for options out of range.
  explicit LossScaler(LossScaleOptions options = {});
  /// The current scale.
  double scale() const { return scale_; }
  /// Steps in a row without overflow since the last change of the scale.
  std::int64_t growth_tracker() const { return growth_tracker_; }
  /// Steps skipped for overflow so far.
  std::int64_t skipped_steps() const { return skipped_; }
  /// Sets the whole state, as another rank's copy or a snapshot had it; throws
  /// `mpu::InvalidArgument` for a scale that is not finite and > 0 or negative counts.
  void restore(double scale, std::int64_t growth_tracker, std::int64_t skipped_steps);
  /// After a step: `overflowed` backs the scale off (and counts a skipped step), otherwise
  /// counts towards growth.
  void update(bool overflowed);
  /// Writes the scale, the growth tracker and the skipped steps into `archive`.
  void save(torch::serialize::OutputArchive& archive) const;
  /// Reads what `save` wrote; throws `mpu::InvalidArgument` when a value is missing or out of
  /// range.
  void load(torch::serialize::InputArchive& archive);
  /// The options it was built with.
  const LossScaleOptions& options() const { return options_; }

 private:
  LossScaleOptions options_;
  double scale_;
  std::int64_t growth_tracker_ = 0;
  std::int64_t skipped_ = 0;
};

/// Throws `mpu::InvalidArgument` naming the field and value when `options` are out of range.
void check_loss_scale_options(const LossScaleOptions& options, const char* who);

}  // namespace mpu
