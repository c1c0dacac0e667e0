#include "sync/strategy.h"

#include "mpu/error.h"

namespace mpu::detail {

std::unique_ptr<GradSync> make_grad_sync(Strategy strategy, SyncContext& ctx,
                                         const torch::optim::Optimizer& optimizer) {
  // The one place that maps the enum to a class.
  switch (strategy) {
    case Strategy::kMasterStep:
      return make_master_step(ctx);
    case Strategy::kReplicated:
      return make_replicated(ctx);
    case Strategy::kSharded:
      return make_sharded(ctx, optimizer);
  }
  MPU_THROW(InvalidArgument, "SyncEngine: unknown strategy ", static_cast<int>(strategy));
}

torch::Tensor nonfinite_flag(const torch::Tensor& g) {
  return torch::isfinite(g).logical_not().any().to(torch::kFloat).reshape({1});
}

torch::Tensor zero_flag(const SyncContext& ctx) {
  return torch::zeros({1}, torch::TensorOptions().device(ctx.comm.device()));
}

void broadcast_flat_parameters(SyncContext& ctx) {
  torch::NoGradGuard no_grad;
  if (ctx.flat.zero_copy()) {
    torch::Tensor d = ctx.flat.flat_data();
    ctx.comm.broadcast(d, 0);
    return;
  }
  if (!ctx.param_wire.defined()) {
    ctx.param_wire = torch::empty(
        {ctx.flat.numel()}, torch::TensorOptions().device(ctx.flat.device()).dtype(torch::kFloat));
  }
  if (ctx.comm.rank() == 0) ctx.flat.gather_into(FlatTarget::kData, ctx.param_wire);
  ctx.comm.broadcast(ctx.param_wire, 0);
  if (ctx.comm.rank() != 0) ctx.flat.scatter(ctx.param_wire, FlatTarget::kData);
}

}  // namespace mpu::detail
