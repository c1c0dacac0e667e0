// The fused optimizer step: one kernel that reads each gradient once, unscales it, applies the
// update of SGD, Adam, AdamW, Adagrad or RMSprop to the fp32 master weights and fp32 state, and
// writes the master (and, in master-weights mode, the bf16/fp16 model parameter) in the same
// pass. Framework-free: device pointers, a small table of runs and a stream in, cudaError_t
// out; nothing throws.
//
// Numerics. Every element is computed with the formulas of torch::optim's step, operation by
// operation, in fp32 with the roundings of LibTorch 2.x's CUDA kernels: a scalar multiply
// rounds; add(b, alpha) is fma(alpha, b, a); addcmul(b, c, alpha) is fma(b, c, a) for
// alpha == 1 and fma(alpha, b * c, a) otherwise; addcdiv(b, c, alpha) is a + b / c for
// alpha == 1 and fma(alpha, b / c, a) otherwise; a division by a scalar is a multiply by its
// reciprocal (taken in double, rounded to fp32); sqrt and division are correctly rounded. The
// scalars are computed on the host in double as torch::optim computes them and rounded to fp32
// once, as torch does. Where
// a build of LibTorch contracts differently (its add kernel is `a + alpha * b`, which nvcc
// contracts into one fma by default), results differ in the last bit, and such a difference
// can grow through a cancellation (a momentum buffer passing through zero). Measured against
// torch::optim on CUDA after 5 steps of every optimizer and option, fp32 and bf16/fp16 master
// weights (tests/test_flat_optimizer.cpp, "[cuda]"; H100, LibTorch 2.11, CUDA 13): 0 ulps on
// every parameter and state element, i.e. bit for bit (mpu::kFusedStepUlpBound).
//
// Bandwidth: one read of the gradient, master and state and one write of the master, state
// and model parameter per element, in 16-byte vectors of the fp32 buffers. On ResNet-50's
// 25.6M parameters (bench_flat_optimizer, H100) every optimizer, fp32 and bf16 master, ran at
// 0.96x to 1.02x the time of a device-to-device copy of the same bytes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/flat_table.h"

namespace mpu::kernels {

/// Which update the fused step applies.
enum class FusedOptimizer : std::int32_t {
  kSGD = 0,
  kAdam = 1,
  kAdamW = 2,
  kAdagrad = 3,
  kRMSprop = 4,
};

/// Runs per launch: the table travels in the kernel's parameters.
inline constexpr int kFusedMaxRuns = 32;
/// State buffers per element.
inline constexpr int kFusedMaxState = 3;

/// FusedRun::flags.
enum FusedFlag : std::int32_t {
  kFusedWeightDecay = 1 << 0,  ///< weight_decay != 0 (coupled: g += wd * p; AdamW: p *= decay)
  kFusedMomentum = 1 << 1,     ///< SGD momentum != 0; RMSprop momentum > 0
  kFusedNesterov = 1 << 2,     ///< SGD
  kFusedFirstStep = 1 << 3,    ///< SGD: the momentum buffer does not exist yet (buf = d_p)
  kFusedAmsgrad = 1 << 4,      ///< Adam, AdamW
  kFusedCentered = 1 << 5,     ///< RMSprop
};

/// One run of adjacent elements [begin, end) of the flat buffers with one set of scalars. All
/// scalars are the fp32 roundings of the double values torch::optim passes to its kernels.
struct FusedRun {
  std::int64_t begin;
  std::int64_t end;
  std::int32_t flags;
  /// The factor of the final update, p += neg_step * u: -lr (SGD, RMSprop), -lr / bias
  /// correction 1 (Adam, AdamW), -lr / (1 + (step - 1) * lr_decay) (Adagrad).
  float neg_step;
  float weight_decay;
  /// AdamW: 1 - lr * weight_decay.
  float decay;
  /// SGD and RMSprop momentum.
  float momentum;
  /// SGD: 1 - dampening.
  float one_minus_dampening;
  /// Adam, AdamW: beta1, 1 - beta1, beta2, 1 - beta2. RMSprop: alpha in beta2 and 1 - alpha in
  /// one_minus_beta2 (the same role: the decay of the squared average).
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  /// Adam, AdamW: fp32(1 / sqrt(bias correction 2)) (in double), the reciprocal torch
  /// multiplies by.
  float inv_sqrt_bias_correction2;
  float eps;
};

/// One launch of the fused step.
///
/// Element e of run r (begin <= e < end) reads grad[e] (grad_dtype: kFloat32, kFloat16 or
/// kBFloat16), multiplies it by grad_scale (fp32, skipped when 1), updates master[e] and
/// state[k][e - state_begin], and writes model[e] = round_to_nearest_even(master[e]) in
/// model_dtype (kFloat16 or kBFloat16) when model is not null. State slots: SGD {momentum
/// buffer}; Adam, AdamW {exp_avg, exp_avg_sq, max_exp_avg_sq}; Adagrad {sum}; RMSprop
/// {square_avg, momentum_buffer, grad_avg}; a slot no run uses may be null.
struct FusedStepArgs {
  FusedOptimizer optimizer;
  FlatDtype grad_dtype;
  FlatDtype model_dtype;
  float grad_scale;
  const void* grad;
  float* master;
  void* model;
  float* state[kFusedMaxState];
  std::int64_t state_begin;
  int num_runs;
  FusedRun runs[kFusedMaxRuns];
};

/// Launches the step of `args` on `stream`: one kernel, grid-stride over all runs' elements in
/// groups of 4 (16-byte loads and stores of the fp32 buffers when every pointer and
/// state_begin allow it; element by element otherwise, with the same results). Returns
/// cudaErrorInvalidValue for a bad dtype or optimizer, num_runs outside [0, kFusedMaxRuns], a
/// run with begin > end or a null pointer a run needs; cudaSuccess without launching when no
/// run has elements.
cudaError_t fused_step(const FusedStepArgs& args, cudaStream_t stream) noexcept;

/// The same step, with each run's scalars read when the kernel runs from `device_runs`
/// (args.num_runs FusedRun in device memory, as `fused_stage_runs` writes them) instead of from
/// the launch's parameters; args.runs still sizes the grid (their begin and end must equal the
/// staged ones). A launch captured into a CUDA graph then follows the learning rate, step count
/// and bias corrections staged before each replay. `device_runs` null: as `fused_step` above.
cudaError_t fused_step(const FusedStepArgs& args, const FusedRun* device_runs,
                       cudaStream_t stream) noexcept;

/// Writes args.runs[0, args.num_runs) into `device_runs` on `stream` (one small kernel, the
/// table in its parameters: stream-ordered, no host synchronisation, no host buffer to keep
/// alive). Returns cudaErrorInvalidValue for num_runs outside [0, kFusedMaxRuns] or a null
/// `device_runs`.
cudaError_t fused_stage_runs(const FusedStepArgs& args, FusedRun* device_runs,
                             cudaStream_t stream) noexcept;

}  // namespace mpu::kernels
