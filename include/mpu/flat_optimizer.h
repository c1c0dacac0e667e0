/// \file
/// FlatOptimizer: the step of a torch::optim optimizer, taken over one flat parameter buffer and
/// one flat gradient buffer (or a shard of them) with a few kernels per parameter group instead
/// of a dozen per parameter.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mpu {

/// True when `optimizer` is exactly torch::optim::SGD, Adam, AdamW, Adagrad or RMSprop (not a
/// subclass, whose step may differ) with options the flat step implements; otherwise false,
/// and `*why` (when given) says what is not supported. Every option of these five is
/// implemented.
bool flat_step_supported(const torch::optim::Optimizer& optimizer, std::string* why = nullptr);

/// The fused CUDA step against torch::optim's own step on CUDA in fp32, after 5 steps of every
/// optimizer and option (and in master-weights mode against fp32 parameters fed the bf16/fp16
/// gradients): the largest difference of any parameter or state element, in units in the last
/// place (the distance of the two fp32 bit patterns). The kernel performs torch's operations
/// with torch's roundings (cuda/fused_step.h); measured on an H100 with LibTorch 2.11 (CUDA
/// 13): 0, bit for bit, which the [cuda] tests hold it to. A LibTorch whose kernels round
/// differently (another contraction of `a + alpha * b`) would show up there first.
inline constexpr std::int64_t kFusedStepUlpBound = 0;

/// Options of a FlatOptimizer beyond its buffers and range.
struct FlatOptimizerOptions {
  /// Master-weights mode when defined: a 1-D contiguous BFloat16 or Half tensor with
  /// flat_param's numel and device. The optimizer's parameters are then views of model_param
  /// (not of flat_param), flat_param is their Float master copy (the same layout: equal element
  /// offsets), the optimizer state is Float, and flat_grad may be Float, BFloat16 or Half (the
  /// parameters' gradients are its views). step() updates the master and the state, then
  /// writes model_param[e] = round_to_nearest_even(flat_param[e]) for every element e it
  /// stepped. The caller initialises flat_param from model_param (or the other way round).
  /// Undefined (the default): flat_param holds the parameters and flat_grad has its dtype.
  torch::Tensor model_param;
  /// On CUDA with a Float flat_param: step with the fused kernel (one launch per step for up to
  /// 32 runs; see cuda/fused_step.h for its rounding), which reads every gradient, master and
  /// state element once and writes each once. false: always the torch operations, bit-identical
  /// to torch::optim. Ignored on CPU and for Half, BFloat16 or Double flat_param (torch
  /// operations).
  bool fused = true;
};

/// Steps the parameters of a torch::optim optimizer through the flat buffers they are views of.
///
/// Layout. Every parameter of every param group must be a contiguous view into `flat_param` and
/// its gradient the view of `flat_grad` at the same element offset, as `FlatBuffer` in zero-copy
/// mode arranges. Each group's parameters are merged into runs of adjacent elements, and
/// `step()` launches a few kernels per run (one run per group in the usual layout).
///
/// Numerics. `step()` performs the same torch operations with the same scalars, in the same
/// order, as the optimizer's own `step()` (LibTorch 1.13 and 2.x agree), only on longer
/// tensors; every element is therefore computed as the plain step computes it. The one caveat:
/// on CPU, LibTorch computes the tail of a tensor (its last few elements, fewer than a vector
/// register's worth) on a scalar path that, for Half and BFloat16, rounds intermediate results
/// the vectorised path keeps in float, so CPU results in those dtypes may differ from the plain
/// step in the last bit. On CUDA every element takes the same path. Each group's CURRENT options
/// are read at every step (an lr changed by a scheduler is seen); options that need a state
/// buffer absent at construction (momentum turned on later, amsgrad, centered) throw.
///
/// Step counts. Every parameter has a gradient (a view), so every parameter steps at every
/// step(); the step count of each parameter is kept on the host, and runs are split where
/// counts differ (after loading a checkpoint in which they do).
///
/// State. Per-element state (`state_names()`) lives in flat tensors of (end - begin) elements
/// in flat_param's dtype (the parameter dtype; Float in master-weights mode) on the parameters'
/// device.
/// - Full range (begin = 0, end = numel): the optimizer's own per-parameter state tensors are
///   views into the flat state, and its step counts are kept current after every step(), so
///   optimizer.save() writes a checkpoint a plain optimizer loads. When step() finds that the
///   optimizer's state was replaced or advanced behind its back (optimizer.load(), or a plain
///   optimizer.step()), it calls import_state() first, so the two interoperate.
/// - Shard: the state lives only in the shard buffers; the optimizer's per-parameter state is
///   dropped. export_state() writes complete per-parameter state for a checkpoint; step() never
///   looks at optimizer.state(), so call import_state() after optimizer.load() (and after
///   saving, to drop the exported copies again).
///
/// Memory: the state buffers (`state_bytes()`), plus the step's temporaries (at most two
/// tensors of end - begin elements): on CUDA they come from the caching allocator and are
/// released after each step; on CPU they are kept between steps, because page-faulting a fresh
/// allocation of that size in at every step costs more than the step.
///
/// Master weights and loss scaling: see FlatOptimizerOptions and step(double). On CUDA with a
/// Float flat_param (master or not) step() is one fused kernel launch by default, which repeats
/// torch's roundings: at most kFusedStepUlpBound ulps from torch::optim (0 measured).
///
/// Devices and streams: the torch operations and the fused kernel run on the current stream of the
/// parameters' device, without host synchronisation. Not thread-safe; not copyable; movable.
class FlatOptimizer {
 public:
  /// flat_param, flat_grad: 1-D contiguous tensors, same numel/dtype/device. Every parameter of
  /// every param group of `optimizer` must be a contiguous view into flat_param (element offset
  /// = (p.data_ptr - flat_param.data_ptr) / itemsize), and p.grad() the view of flat_grad at
  /// the same offset; otherwise mpu::InvalidArgument naming group and parameter index and what
  /// was seen. Parameters must not overlap; empty parameters are ignored. [begin, end) is the
  /// element range this object steps (a shard, for ZeRO-1); end = -1 means numel. Parameters
  /// that straddle begin or end are stepped only inside the range. Elements not covered by any
  /// parameter of the optimizer are never touched. Throws InvalidArgument when
  /// !flat_step_supported (the message says why). Calls import_state() at the end.
  /// The optimizer must outlive this object.
  FlatOptimizer(torch::optim::Optimizer& optimizer, torch::Tensor flat_param,
                torch::Tensor flat_grad, std::int64_t begin = 0, std::int64_t end = -1);
  /// As above, with `options`: in master-weights mode (options.model_param defined) the
  /// parameters are views of model_param and their gradients views of flat_grad at the same
  /// element offsets; flat_param must be Float, flat_grad Float, BFloat16 or Half, all three
  /// 1-D with the same numel and device; otherwise InvalidArgument naming the tensor, its dtype,
  /// numel and device.
  FlatOptimizer(torch::optim::Optimizer& optimizer, torch::Tensor flat_param,
                torch::Tensor flat_grad, std::int64_t begin, std::int64_t end,
                FlatOptimizerOptions options);
  ~FlatOptimizer();
  /// Moves the flat state and the optimizer reference; the moved-from object must not step.
  FlatOptimizer(FlatOptimizer&&) noexcept;
  /// As the move constructor.
  FlatOptimizer& operator=(FlatOptimizer&&) noexcept;
  FlatOptimizer(const FlatOptimizer&) = delete;
  FlatOptimizer& operator=(const FlatOptimizer&) = delete;

  /// One step over [begin, end): the same math, in the same order of floating-point
  /// operations, as optimizer.step(), reading each group's current options. A few kernels per
  /// run of parameters, never a loop of kernels over parameters. Throws InvalidArgument when a
  /// parameter or gradient is no longer the view it was (replaced storage, gradient set to
  /// none), or an option now needs a state buffer that was not allocated at construction.
  void step();
  /// As step(), with every gradient multiplied by `grad_scale` as it is read (the unscale of
  /// loss scaling: 1 / S); flat_grad is not modified. The torch-operation path converts each
  /// run's gradient to the master dtype in a scratch tensor and multiplies it there by
  /// fp32(grad_scale) (double for a Double flat_param); the fused kernel multiplies in fp32.
  /// step(1.0) is step().
  void step(double grad_scale);

  /// Captured steps (a CUDA graph replays the kernels of one step; see
  /// UpdaterOptions::cuda_graph). Writes the scalars of the next step (learning rates, step
  /// counts, bias corrections, as the options and counts are now) into device memory on the
  /// current stream: one small kernel, no host synchronisation. Fused step only; throws
  /// InvalidArgument otherwise.
  void stage_step();
  /// While true, step()'s fused kernel reads its scalars from what stage_step() last wrote
  /// instead of from its launch parameters, so that a launch captured into a graph follows the
  /// scalars staged before each replay. Throws InvalidArgument when turned on before any
  /// stage_step().
  void set_step_reads_staged(bool on);
  /// For a step that ran as a graph replay, what step() does on the host after its kernels:
  /// the step counts advance (and, on the first step, lazily created buffers are taken up).
  void advance();

  /// True when step() runs the fused CUDA kernel (CUDA, Float flat_param, options.fused).
  bool fused() const;
  /// True in master-weights mode.
  bool has_master() const;

  /// Names of the per-element state buffers, in order: SGD {"momentum_buffer"} (none without
  /// momentum); Adam and AdamW {"exp_avg", "exp_avg_sq"} and "max_exp_avg_sq" when a group
  /// has amsgrad; Adagrad {"sum"}; RMSprop {"square_avg"}, "momentum_buffer" when a group has
  /// momentum, "grad_avg" when a group is centered. The same on every rank for the same
  /// optimizer options.
  std::vector<std::string> state_names() const;
  /// The flat state, one tensor of (end - begin) elements per name, in `state_names()` order;
  /// views of the live state (writing them writes the state). Elements not covered by a
  /// parameter are zero.
  std::vector<torch::Tensor> state_shards() const;
  /// Writes complete per-parameter state into optimizer.state() so that optimizer.save()
  /// writes a checkpoint a plain optimizer loads: for every parameter of every group, tensors
  /// cloned from `full` (one flat tensor per state name, in `state_names()` order, covering all
  /// numel elements, any dtype and device: it is converted), plus the step counts. A
  /// parameter's buffer is written only where the plain optimizer would have it (e.g. SGD's
  /// momentum buffer after the first step, max_exp_avg_sq for amsgrad groups). Full range:
  /// `full` is copied into the flat state, which the optimizer's tensors are views of.
  void export_state(const std::vector<torch::Tensor>& full);
  /// Reads optimizer.state() (after optimizer.load(), or export_state) into the flat state,
  /// creating absent state as the optimizer would (zeros; Adagrad's initial accumulator; SGD's
  /// momentum buffer appears at the first step). Full range: the optimizer's state tensors then
  /// become views into the flat state. Shard: the optimizer's per-parameter state is then
  /// erased, so that optimizer-state memory per rank is about 1/n. Throws InvalidArgument for a
  /// state tensor whose number of elements differs from its parameter's.
  void import_state();
  /// Bytes of flat optimizer state this object holds (for the memory benchmark).
  std::int64_t state_bytes() const;

  /// First element of the range this object steps.
  std::int64_t begin() const;
  /// One past the last element of the range this object steps.
  std::int64_t end() const;
  /// The number of runs of adjacent parameters step() launches its kernels over.
  std::size_t num_runs() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mpu
