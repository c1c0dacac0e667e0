// Precision policies and the loss scaler.
#include "mpu/precision.h"

#include <cmath>

#include "mpu/error.h"

namespace mpu {
namespace {

struct PolicyName {
  Precision policy;
  const char* name;
};

constexpr PolicyName kPolicies[] = {
    {Precision::kFp32, "fp32"},
    {Precision::kBf16Autocast, "bf16_autocast"},
    {Precision::kFp16Autocast, "fp16_autocast"},
    {Precision::kBf16Mixed, "bf16_mixed"},
    {Precision::kFp16Mixed, "fp16_mixed"},
};

}  // namespace

std::string to_string(Precision p) {
  for (const auto& e : kPolicies) {
    if (e.policy == p) return e.name;
  }
  return "Precision(" + std::to_string(static_cast<int>(p)) + ")";
}

Precision parse_precision(const std::string& name) {
  for (const auto& e : kPolicies) {
    if (name == e.name) return e.policy;
  }
  MPU_THROW(InvalidArgument, "precision '", name,
            "' is not a policy; valid: fp32, bf16_autocast, fp16_autocast, bf16_mixed, "
            "fp16_mixed");
}

torch::Dtype compute_dtype(Precision p) {
  switch (p) {
    case Precision::kBf16Autocast:
    case Precision::kBf16Mixed:
      return torch::kBFloat16;
    case Precision::kFp16Autocast:
    case Precision::kFp16Mixed:
      return torch::kHalf;
    case Precision::kFp32:
      break;
  }
  return torch::kFloat;
}

bool has_master_weights(Precision p) {
  return p == Precision::kBf16Mixed || p == Precision::kFp16Mixed;
}

bool uses_autocast(Precision p) {
  return p != Precision::kFp32;
}

bool uses_loss_scaling(Precision p) {
  return p == Precision::kFp16Autocast || p == Precision::kFp16Mixed;
}

void check_loss_scale_options(const LossScaleOptions& o, const char* who) {
  MPU_CHECK(std::isfinite(o.init_scale) && o.init_scale > 0, who,
            ": LossScaleOptions::init_scale must be finite and > 0, got ", o.init_scale);
  MPU_CHECK(std::isfinite(o.growth_factor) && o.growth_factor > 1, who,
            ": LossScaleOptions::growth_factor must be finite and > 1, got ", o.growth_factor);
  MPU_CHECK(o.backoff_factor > 0 && o.backoff_factor < 1, who,
            ": LossScaleOptions::backoff_factor must be in (0, 1), got ", o.backoff_factor);
  MPU_CHECK(o.growth_interval >= 1, who, ": LossScaleOptions::growth_interval must be >= 1, got ",
            o.growth_interval);
}

LossScaler::LossScaler(LossScaleOptions options) : options_(options), scale_(options.init_scale) {
  check_loss_scale_options(options_, "LossScaler");
}

// GradScaler's rule: an overflow multiplies the scale by the backoff factor and restarts the
// count; growth_interval clean steps in a row multiply it by the growth factor. The scale
// stays a finite float (fp32 is what the gradients are unscaled with).
void LossScaler::update(bool overflowed) {
  if (overflowed) {
    scale_ *= options_.backoff_factor;
    growth_tracker_ = 0;
    ++skipped_;
    return;
  }
  if (++growth_tracker_ >= options_.growth_interval) {
    const double grown = scale_ * options_.growth_factor;
    if (std::isfinite(static_cast<float>(grown))) scale_ = grown;
    growth_tracker_ = 0;
  }
}

void LossScaler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("loss_scale", torch::tensor(scale_, torch::kDouble));
  archive.write("loss_scale_growth_tracker", torch::tensor(growth_tracker_, torch::kInt64));
  archive.write("loss_scale_skipped_steps", torch::tensor(skipped_, torch::kInt64));
}

void LossScaler::load(torch::serialize::InputArchive& archive) {
  torch::Tensor scale;
  torch::Tensor tracker;
  torch::Tensor skipped;
  MPU_CHECK(archive.try_read("loss_scale", scale) &&
                archive.try_read("loss_scale_growth_tracker", tracker) &&
                archive.try_read("loss_scale_skipped_steps", skipped),
            "LossScaler::load: the snapshot has no loss scale (it was written with another "
            "precision policy)");
  restore(scale.item<double>(), tracker.item<std::int64_t>(), skipped.item<std::int64_t>());
}

void LossScaler::restore(double scale, std::int64_t growth_tracker, std::int64_t skipped_steps) {
  MPU_CHECK(std::isfinite(scale) && scale > 0, "LossScaler: loss scale ", scale,
            " is not finite and > 0");
  MPU_CHECK(growth_tracker >= 0 && skipped_steps >= 0, "LossScaler: growth tracker ",
            growth_tracker, " and skipped steps ", skipped_steps, " must not be negative");
  scale_ = scale;
  growth_tracker_ = growth_tracker;
  skipped_ = skipped_steps;
}

}  // namespace mpu
