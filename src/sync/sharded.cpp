// Sharded (ZeRO-1): gradients are reduce-scattered, each rank steps its shard of the flat
// parameters with its shard of the optimizer state, and the shards are allgathered.
#include "mpu/error.h"
#include "mpu/flat_optimizer.h"
#include "sync/strategy.h"

namespace mpu::detail {
namespace {

class Sharded final : public GradSync {
 public:
  Sharded(SyncContext& ctx, const torch::optim::Optimizer& optimizer) : GradSync(ctx) {
    MPU_CHECK(ctx.flat.zero_copy(),
              "Strategy::kSharded needs every parameter in one dtype (float32, bfloat16 or "
              "float16), so that the shards are slices of one flat buffer: ",
              ctx.flat.zero_copy_reason());
    std::string why;
    MPU_CHECK(flat_step_supported(optimizer, &why),
              "Strategy::kSharded steps each rank's shard of the flat parameters, which needs an "
              "optimizer the flat step supports (SGD, Adam, AdamW, Adagrad, RMSprop): ",
              why);
    offset_ = ctx.comm.shard_offset(ctx.flat.numel());
    numel_ = ctx.comm.shard_numel(ctx.flat.numel());
  }

  bool steps_here() const override { return true; }
  bool receives_gradients() const override { return true; }  // its shard
  std::int64_t step_begin() const override { return offset_; }
  std::int64_t step_end() const override { return offset_ + numel_; }
  bool needs_flat_step() const override { return true; }

  // The reduce-scatter needs the whole gradient: it follows backward.
  bool bucketed() const override { return false; }
  void reduce_bucket_async(torch::Tensor /*x*/) override {
    MPU_THROW(Error, "Strategy::kSharded sends no gradient buckets");
  }

  void reduce_whole() override {
    torch::NoGradGuard no_grad;
    auto g = ctx_.flat.flat_grad();
    if (ctx_.prescale != 1.0) g.mul_(ctx_.prescale);
    auto mine = g.narrow(0, offset_, numel_);
    if (ctx_.wire.defined()) {
      ctx_.wire.copy_(g);
      auto out = ctx_.wire.narrow(0, offset_, numel_);
      ctx_.comm.reduce_scatter(out, ctx_.wire, ctx_.op);
      mine.copy_(out);
    } else {
      ctx_.comm.reduce_scatter(mine, g, ctx_.op);
    }
    if (ctx_.postscale != 1.0) mine.mul_(ctx_.postscale);
  }

  torch::Tensor local_nonfinite() const override {
    return nonfinite_flag(ctx_.flat.flat_grad().narrow(0, offset_, numel_));
  }
  // Each rank sees its shard: a NaN anywhere skips the step everywhere.
  void agree_nonfinite(torch::Tensor& bad) override { ctx_.comm.allreduce(bad, ReduceOp::kSum); }

  // A skipped step changed no shard: the parameters are still equal.
  void share_parameters(bool stepped) override {
    if (!stepped) return;
    torch::NoGradGuard no_grad;
    auto d = ctx_.flat.flat_data();
    auto mine = d.narrow(0, offset_, numel_);
    ctx_.comm.allgather(d, mine);
  }

  bool collective_save() const override { return true; }
  void gather_state_for_save(FlatOptimizer* flat_opt) override {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> full;
    for (const auto& shard : flat_opt->state_shards()) {
      auto whole = torch::empty({ctx_.flat.numel()}, shard.options());
      ctx_.comm.allgather(whole, shard.contiguous());
      full.push_back(std::move(whole));
    }
    flat_opt->export_state(full);
  }
  void release_saved_state(FlatOptimizer* flat_opt) override { flat_opt->import_state(); }

 private:
  std::int64_t offset_ = 0;
  std::int64_t numel_ = 0;
};

}  // namespace

std::unique_ptr<GradSync> make_sharded(SyncContext& ctx, const torch::optim::Optimizer& optimizer) {
  return std::make_unique<Sharded>(ctx, optimizer);
}

}  // namespace mpu::detail
