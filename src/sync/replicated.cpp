// Replicated: gradients are allreduced and every rank takes the same step on the same values,
// so nothing is shared after the step.
#include "sync/strategy.h"

namespace mpu::detail {
namespace {

class Replicated final : public GradSync {
 public:
  explicit Replicated(SyncContext& ctx) : GradSync(ctx) {}

  bool steps_here() const override { return true; }
  bool receives_gradients() const override { return true; }
  bool bucketed() const override { return true; }

  void reduce_bucket_async(torch::Tensor x) override { ctx_.comm.allreduce_async(x, ctx_.op); }

  void reduce_whole() override {
    reduce_through_wire(ctx_, true, [this](torch::Tensor& x) { ctx_.comm.allreduce(x, ctx_.op); });
  }

  torch::Tensor local_nonfinite() const override {
    return nonfinite_flag(ctx_.reduced_gradients());
  }
  // Every rank holds the same reduced values and decides alike.
  void agree_nonfinite(torch::Tensor& /*bad*/) override {}

  void share_parameters(bool /*stepped*/) override {}
};

}  // namespace

std::unique_ptr<GradSync> make_replicated(SyncContext& ctx) {
  return std::make_unique<Replicated>(ctx);
}

}  // namespace mpu::detail
