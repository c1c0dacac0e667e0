// Gradient synchronisation strategies: how gradients are reduced, who steps, how parameters are
// shared after the step, how the ranks agree on a non-finite verdict, and whether saving is
// collective. MasterStep, Replicated and Sharded are the classes behind `GradSync`; SyncEngine
// keeps what every strategy shares (the flat buffer, buckets, zero_grad, the drift check,
// buffers and the layout check) and calls these in the same order on every rank.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>

#include "mpu/communicator.h"
#include "mpu/flat_buffer.h"
#include "mpu/updater.h"

namespace mpu {
class FlatOptimizer;
}

namespace mpu::detail {

/// What the engine and its strategy share: the communicator, the flat buffer and how gradients
/// travel. Owned by the engine; a strategy holds a reference.
struct SyncContext {
  SyncContext(Communicator& c, FlatBuffer& f) : comm(c), flat(f), solo(c.size() == 1) {}

  Communicator& comm;
  FlatBuffer& flat;
  torch::Tensor wire;        // gradients on the wire, when they are not the flat buffer itself
  torch::Tensor param_wire;  // parameters on the wire, when they are not the flat buffer itself
  ReduceOp op = ReduceOp::kSum;
  double prescale = 1.0;   // applied to local gradients before the collective
  double postscale = 1.0;  // applied to the reduced gradients after it
  // One rank: nothing to communicate. The gradients are only scaled (the mean over
  // accumulation steps), and no collective is issued (DDP still issues its allreduces).
  bool solo;

  /// The reduced gradients this rank checks: the flat buffer, or the gather buffer when the
  /// parameters are not views of one.
  torch::Tensor reduced_gradients() const { return flat.zero_copy() ? flat.flat_grad() : wire; }
};

/// One strategy's part of a data-parallel step. Every method is called on every rank, in the
/// same order; those that communicate say so.
class GradSync {
 public:
  explicit GradSync(SyncContext& ctx) : ctx_(ctx) {}
  virtual ~GradSync() = default;
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  /// Whether this rank steps the optimizer.
  virtual bool steps_here() const = 0;
  /// Whether this rank holds the reduced gradients after the reduction.
  virtual bool receives_gradients() const = 0;
  /// The element range [begin, end) of the flat buffer this rank's optimizer steps; end = -1:
  /// all of it.
  virtual std::int64_t step_begin() const { return 0; }
  virtual std::int64_t step_end() const { return -1; }
  /// Whether this strategy can only step through the flat step (the optimizer state is split).
  virtual bool needs_flat_step() const { return false; }

  /// Whether gradients may go out in buckets while backward runs (zero-copy buffers only).
  virtual bool bucketed() const = 0;
  /// Collective, asynchronous: one bucket `x` (prescaled, in the wire dtype) goes out; the
  /// engine joins it in finish().
  virtual void reduce_bucket_async(torch::Tensor x) = 0;
  /// Collective: the whole gradient reduction after backward, when it is not bucketed (or the
  /// flat buffer is not zero-copy). Applies prescale and postscale.
  virtual void reduce_whole() = 0;

  /// 1 when a gradient this rank checks is not finite, else 0 (float, one element).
  virtual torch::Tensor local_nonfinite() const = 0;
  /// Collective (several ranks only): makes `bad` the verdict every rank shares.
  virtual void agree_nonfinite(torch::Tensor& bad) = 0;
  /// Collective (several ranks only): after the step (`stepped` false when it was skipped),
  /// leaves every rank with the same parameters.
  virtual void share_parameters(bool stepped) = 0;

  /// True when saving needs every rank (the optimizer state is spread over ranks).
  virtual bool collective_save() const { return false; }
  /// Collective when `collective_save()`: the whole optimizer state into the optimizer.
  virtual void gather_state_for_save(FlatOptimizer* /*flat_opt*/) {}
  /// Drops what `gather_state_for_save` gathered.
  virtual void release_saved_state(FlatOptimizer* /*flat_opt*/) {}

 protected:
  SyncContext& ctx_;
};

/// The strategy `strategy` over `ctx`. `optimizer` is checked for what the strategy needs
/// (Sharded: an optimizer the flat step supports, and a zero-copy flat buffer).
std::unique_ptr<GradSync> make_grad_sync(Strategy strategy, SyncContext& ctx,
                                         const torch::optim::Optimizer& optimizer);

std::unique_ptr<GradSync> make_master_step(SyncContext& ctx);
std::unique_ptr<GradSync> make_replicated(SyncContext& ctx);
std::unique_ptr<GradSync> make_sharded(SyncContext& ctx, const torch::optim::Optimizer& optimizer);

// Shared by the strategies.

/// Not zero-copy: gathers the gradients into ctx.wire (prescaled), runs `collective` on it
/// (skipped on one rank), and scatters the result back where `receives` (postscaled). One rank
/// takes the same gather and scatter, so that it has the same semantics (tied parameters
/// counted once, a zero gradient for a parameter that got none).
template <typename Collective>
void reduce_through_wire(SyncContext& ctx, bool receives, Collective collective) {
  torch::NoGradGuard no_grad;
  ctx.flat.gather_into(FlatTarget::kGrad, ctx.wire, ctx.prescale);
  if (!ctx.solo) collective(ctx.wire);
  if (!receives) return;
  if (ctx.postscale != 1.0) ctx.wire.mul_(ctx.postscale);
  ctx.flat.scatter(ctx.wire, FlatTarget::kGrad);
}

/// 1 (float, one element, on the communicator's device) when `g` holds a NaN or Inf.
torch::Tensor nonfinite_flag(const torch::Tensor& g);
/// A zero flag, for a rank that checks nothing.
torch::Tensor zero_flag(const SyncContext& ctx);

/// Collective: every rank receives rank 0's parameters.
void broadcast_flat_parameters(SyncContext& ctx);

}  // namespace mpu::detail
