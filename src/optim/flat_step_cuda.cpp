// FlatOptimizer's fused CUDA step: the scalars of every run computed on the host as
// torch::optim computes them, packed into the kernel's parameters; device guard, current
// stream, launch, check. No host synchronisation and no device allocation.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/fused_step.h"
#include "flat/kernel_dtype.h"
#include "optim/flat_optimizer_impl.h"

namespace mpu {
namespace {

kernels::FlatDtype kernel_dtype(torch::ScalarType t) {
  return detail::kernel_dtype(t, "FlatOptimizer::step (fused)");
}

// The state slots of the kernel (see kernels::FusedStepArgs), by name.
struct Slots {
  kernels::FusedOptimizer optimizer;
  const char* names[kernels::kFusedMaxState];
};

Slots slots_of(detail::OptimizerKind kind) {
  switch (kind) {
    case detail::OptimizerKind::kSGD:
      return {kernels::FusedOptimizer::kSGD, {"momentum_buffer", nullptr, nullptr}};
    case detail::OptimizerKind::kAdam:
      return {kernels::FusedOptimizer::kAdam, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}};
    case detail::OptimizerKind::kAdamW:
      return {kernels::FusedOptimizer::kAdamW, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}};
    case detail::OptimizerKind::kAdagrad:
      return {kernels::FusedOptimizer::kAdagrad, {"sum", nullptr, nullptr}};
    case detail::OptimizerKind::kRMSprop:
      return {kernels::FusedOptimizer::kRMSprop, {"square_avg", "momentum_buffer", "grad_avg"}};
    case detail::OptimizerKind::kLBFGS:
      break;  // refused at construction
  }
  MPU_THROW(Error, "FlatOptimizer::step (fused): no fused step for this optimizer");
}

float f32(double x) {
  return static_cast<float>(x);
}

// The run's scalars, each the double torch::optim passes to its kernels, rounded once.
kernels::FusedRun sgd_run(const optim::SGDOptions& o, bool has_buffer) {
  kernels::FusedRun k{};
  if (o.weight_decay() != 0) k.flags |= kernels::kFusedWeightDecay;
  if (o.momentum() != 0) k.flags |= kernels::kFusedMomentum;
  if (o.nesterov()) k.flags |= kernels::kFusedNesterov;
  if (!has_buffer) k.flags |= kernels::kFusedFirstStep;
  k.neg_step = f32(-1 * o.lr());
  k.weight_decay = f32(o.weight_decay());
  k.momentum = f32(o.momentum());
  k.one_minus_dampening = f32(1 - o.dampening());
  return k;
}

template <typename Options>
kernels::FusedRun adam_run(const Options& o, std::int64_t step, bool decoupled) {
  kernels::FusedRun k{};
  const double beta1 = std::get<0>(o.betas());
  const double beta2 = std::get<1>(o.betas());
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  if (o.weight_decay() != 0) k.flags |= kernels::kFusedWeightDecay;
  if (o.amsgrad()) k.flags |= kernels::kFusedAmsgrad;
  k.weight_decay = f32(o.weight_decay());
  k.decay = decoupled ? f32(1 - o.lr() * o.weight_decay()) : 1.0f;
  k.beta1 = f32(beta1);
  k.one_minus_beta1 = f32(1 - beta1);
  k.beta2 = f32(beta2);
  k.one_minus_beta2 = f32(1 - beta2);
  // denom.div_(sqrt(bias_correction2)): torch's CUDA division by a scalar multiplies by the
  // reciprocal, taken in double and rounded to fp32 (seen on LibTorch 2.11: bit for bit).
  k.inv_sqrt_bias_correction2 = f32(1.0 / std::sqrt(bias_correction2));
  k.eps = f32(o.eps());
  k.neg_step = f32(-(o.lr() / bias_correction1));
  return k;
}

kernels::FusedRun adagrad_run(const optim::AdagradOptions& o, std::int64_t step) {
  kernels::FusedRun k{};
  if (o.weight_decay() != 0) k.flags |= kernels::kFusedWeightDecay;
  const double clr = o.lr() / (1 + static_cast<double>(step - 1) * o.lr_decay());
  k.weight_decay = f32(o.weight_decay());
  k.eps = f32(o.eps());
  k.neg_step = f32(-clr);
  return k;
}

kernels::FusedRun rmsprop_run(const optim::RMSpropOptions& o) {
  kernels::FusedRun k{};
  if (o.weight_decay() != 0) k.flags |= kernels::kFusedWeightDecay;
  if (o.momentum() > 0) k.flags |= kernels::kFusedMomentum;
  if (o.centered()) k.flags |= kernels::kFusedCentered;
  k.weight_decay = f32(o.weight_decay());
  k.beta2 = f32(o.alpha());
  k.one_minus_beta2 = f32(1 - o.alpha());
  k.momentum = f32(o.momentum());
  k.eps = f32(o.eps());
  k.neg_step = f32(-o.lr());
  return k;
}

kernels::FusedRun* live_runs_ptr(const torch::Tensor& live_runs) {
  return reinterpret_cast<kernels::FusedRun*>(live_runs.data_ptr());
}

}  // namespace

// The kernel arguments of the launch over runs [first, first + kernels::kFusedMaxRuns), from the
// optimizer's options and the parameters' step counts as they are now.
void FlatOptimizer::Impl::fill_launch(std::size_t first, kernels::FusedStepArgs& args) const {
  const Slots slots = slots_of(traits->kind);
  args = kernels::FusedStepArgs{};
  args.optimizer = slots.optimizer;
  args.grad_dtype = kernel_dtype(flat_grad.scalar_type());
  args.model_dtype = model_param.defined() ? kernel_dtype(model_param.scalar_type())
                                           : kernels::FlatDtype::kFloat32;
  args.grad_scale = static_cast<float>(grad_scale);
  args.grad = flat_grad.data_ptr();
  args.master = flat_param.data_ptr<float>();
  args.model = model_param.defined() ? model_param.data_ptr() : nullptr;
  for (int k = 0; k < kernels::kFusedMaxState; ++k) {
    const int slot = slots.names[k] != nullptr ? field_index(slots.names[k]) : -1;
    args.state[k] = slot >= 0 ? state[static_cast<std::size_t>(slot)].data_ptr<float>() : nullptr;
  }
  args.state_begin = begin;
  const auto& groups = opt->param_groups();
  const std::size_t count =
      std::min(runs.size() - first, static_cast<std::size_t>(kernels::kFusedMaxRuns));
  args.num_runs = static_cast<int>(count);
  for (std::size_t i = 0; i < count; ++i) {
    const Run& r = runs[first + i];
    const auto& options = groups[r.group].options();
    const Param& p = params[r.first_param];
    kernels::FusedRun k{};
    switch (traits->kind) {
      case detail::OptimizerKind::kSGD:
        k = sgd_run(static_cast<const optim::SGDOptions&>(options), p.has_buffer);
        break;
      case detail::OptimizerKind::kAdam:
        k = adam_run(static_cast<const optim::AdamOptions&>(options), p.step + 1, false);
        break;
      case detail::OptimizerKind::kAdamW:
        k = adam_run(static_cast<const optim::AdamWOptions&>(options), p.step + 1, true);
        break;
      case detail::OptimizerKind::kAdagrad:
        k = adagrad_run(static_cast<const optim::AdagradOptions&>(options), p.step + 1);
        break;
      case detail::OptimizerKind::kRMSprop:
        k = rmsprop_run(static_cast<const optim::RMSpropOptions&>(options));
        break;
      case detail::OptimizerKind::kLBFGS:
        MPU_THROW(Error, "FlatOptimizer::step: no flat step for ", traits->name);
    }
    k.begin = r.begin;
    k.end = r.end;
    args.runs[i] = k;
  }
}

void FlatOptimizer::Impl::step_fused() {
  if (runs.empty()) return;
  const c10::cuda::CUDAGuard guard(flat_param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(flat_param.device().index()).stream();
  kernels::FusedRun* live = step_reads_live ? live_runs_ptr(live_runs) : nullptr;
  kernels::FusedStepArgs args;
  for (std::size_t first = 0; first < runs.size(); first += kernels::kFusedMaxRuns) {
    fill_launch(first, args);
    MPU_CUDA_CHECK(kernels::fused_step(args, live != nullptr ? live + first : nullptr, stream));
  }
  // The kernel wrote behind autograd's back; let it see that the parameters and state changed.
  torch::autograd::impl::bump_version(flat_param);
  if (model_param.defined()) torch::autograd::impl::bump_version(model_param);
  for (auto& t : state) torch::autograd::impl::bump_version(t);
}

void FlatOptimizer::Impl::stage_fused() {
  if (runs.empty()) return;
  const c10::cuda::CUDAGuard guard(flat_param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(flat_param.device().index()).stream();
  const auto chunks = (runs.size() + kernels::kFusedMaxRuns - 1) / kernels::kFusedMaxRuns;
  const auto bytes =
      static_cast<std::int64_t>(chunks * kernels::kFusedMaxRuns * sizeof(kernels::FusedRun));
  if (!live_runs.defined()) {
    live_runs = torch::empty({bytes}, flat_param.options().dtype(torch::kUInt8));
  }
  MPU_CHECK(live_runs.numel() == bytes, "FlatOptimizer::stage_step: the step now has ", runs.size(),
            " runs, not as many as when its scalars were first staged (a lazily "
            "created state buffer split them); a captured step cannot follow that change");
  kernels::FusedStepArgs args;
  for (std::size_t first = 0; first < runs.size(); first += kernels::kFusedMaxRuns) {
    fill_launch(first, args);
    MPU_CUDA_CHECK(kernels::fused_stage_runs(args, live_runs_ptr(live_runs) + first, stream));
  }
}

}  // namespace mpu
