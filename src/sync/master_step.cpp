// MasterStep: gradients are reduced to rank 0, which alone steps and then broadcasts the
// parameters. The other ranks hold no optimizer state.
#include "sync/strategy.h"

namespace mpu::detail {
namespace {

class MasterStep final : public GradSync {
 public:
  explicit MasterStep(SyncContext& ctx) : GradSync(ctx) {
    if (!ctx.solo && !ctx.flat.zero_copy()) {
      ctx.param_wire =
          torch::empty({ctx.flat.numel()},
                       torch::TensorOptions().device(ctx.flat.device()).dtype(torch::kFloat));
    }
  }

  bool steps_here() const override { return ctx_.comm.rank() == 0; }
  bool receives_gradients() const override { return ctx_.comm.rank() == 0; }
  bool bucketed() const override { return true; }

  void reduce_bucket_async(torch::Tensor x) override { ctx_.comm.reduce_async(x, 0, ctx_.op); }

  void reduce_whole() override {
    reduce_through_wire(ctx_, receives_gradients(),
                        [this](torch::Tensor& x) { ctx_.comm.reduce(x, 0, ctx_.op); });
  }

  torch::Tensor local_nonfinite() const override {
    return receives_gradients() ? nonfinite_flag(ctx_.reduced_gradients()) : zero_flag(ctx_);
  }
  // Only rank 0 has the reduced gradients: it tells the others, so that every rank counts the
  // skip.
  void agree_nonfinite(torch::Tensor& bad) override { ctx_.comm.broadcast(bad, 0); }

  // Rank 0 stepped (or skipped): the others take its parameters either way.
  void share_parameters(bool /*stepped*/) override { broadcast_flat_parameters(ctx_); }
};

}  // namespace

std::unique_ptr<GradSync> make_master_step(SyncContext& ctx) {
  return std::make_unique<MasterStep>(ctx);
}

}  // namespace mpu::detail
