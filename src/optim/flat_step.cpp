// FlatOptimizer's step: torch::optim's per-optimizer step kernels, over runs of the flat
// buffers.
#include <cmath>

#include "optim/flat_optimizer_impl.h"

namespace mpu {

// --- the step, per run -----------------------------------------------------------------------
//
// Each function performs torch::optim's step on the run's slices: the same operations with
// the same scalars in the same order. Where the plain step creates a temporary tensor (a + b,
// x.sqrt()), this writes the same operation's result into a scratch tensor with its out=
// variant, or applies it in place to a scratch tensor that holds the previous result: the
// same kernels and arithmetic, element by element. On CUDA the scratch tensors are fresh
// allocations (the caching allocator recycles them, and they do not hold memory between
// steps); on CPU they persist, because a fresh allocation of this size is page-faulted in at
// every step, which costs far more than the step itself.

torch::Tensor FlatOptimizer::Impl::scratch(std::size_t i, const Run& r) {
  const std::int64_t len = r.end - r.begin;
  if (flat_param.is_cuda()) return torch::empty({len}, flat_param.options());
  if (scratch_buffers.size() <= i) scratch_buffers.resize(i + 1);
  if (!scratch_buffers[i].defined()) {
    scratch_buffers[i] = torch::empty({end - begin}, flat_param.options());
  }
  return scratch_buffers[i].narrow(0, r.begin - begin, len);
}

torch::Tensor FlatOptimizer::Impl::grad_of(const Run& r, bool* is_scratch) {
  torch::Tensor g = slice(flat_grad, r.begin, r.end);
  *is_scratch = false;
  if (g.scalar_type() == flat_param.scalar_type() && grad_scale == 1.0) return g;
  // Converted (exactly, for a wider master dtype) and then scaled in the master dtype, as the
  // plain step would see a gradient that was unscaled in place before it.
  torch::Tensor out = scratch(0, r);
  out.copy_(g);
  if (grad_scale != 1.0) out.mul_(grad_scale);
  *is_scratch = true;
  return out;
}

void FlatOptimizer::Impl::step_sgd(const Run& r, const optim::SGDOptions& o, bool has_buffer) {
  torch::Tensor tmp0;  // scratch(0, r) once needed
  torch::Tensor p = slice(flat_param, r.begin, r.end);
  bool d_p_is_scratch = false;
  torch::Tensor d_p = grad_of(r, &d_p_is_scratch);
  const auto weight_decay = o.weight_decay();
  const auto momentum = o.momentum();
  const auto dampening = o.dampening();
  const auto nesterov = o.nesterov();
  if (weight_decay != 0) {
    // d_p = d_p.add(p, weight_decay)
    d_p = d_p_is_scratch ? d_p.add_(p, weight_decay)
                         : torch::add_out(tmp0 = scratch(0, r), d_p, p, weight_decay);
    d_p_is_scratch = true;
  }
  if (momentum != 0) {
    torch::Tensor buf =
        state_slice(static_cast<std::size_t>(field_index("momentum_buffer")), r.begin, r.end);
    if (!has_buffer) {
      buf.copy_(d_p);  // the plain step's clone(d_p)
    } else {
      buf.mul_(momentum).add_(d_p, 1 - dampening);
    }
    if (nesterov) {
      // d_p = d_p.add(buf, momentum)
      d_p = d_p_is_scratch ? d_p.add_(buf, momentum)
                           : torch::add_out(tmp0 = scratch(0, r), d_p, buf, momentum);
    } else {
      d_p = buf;
    }
  }
  p.add_(d_p, -1 * o.lr());
}

template <typename Options>
void FlatOptimizer::Impl::step_adam(const Run& r, const Options& o, std::int64_t step,
                                    bool decoupled) {
  torch::Tensor tmp0;  // scratch(0, r) and scratch(1, r) once needed
  torch::Tensor tmp1;
  // Adam (decoupled = false) and AdamW (true).
  torch::Tensor p = slice(flat_param, r.begin, r.end);
  bool converted = false;
  torch::Tensor grad = grad_of(r, &converted);
  if (decoupled && o.weight_decay() != 0) p.mul_(1 - o.lr() * o.weight_decay());
  torch::Tensor exp_avg = state_slice(0, r.begin, r.end);
  torch::Tensor exp_avg_sq = state_slice(1, r.begin, r.end);
  const auto beta1 = std::get<0>(o.betas());
  const auto beta2 = std::get<1>(o.betas());
  const auto bias_correction1 = 1 - std::pow(beta1, step);
  const auto bias_correction2 = 1 - std::pow(beta2, step);
  if (!decoupled && o.weight_decay() != 0) {
    grad = converted ? grad.add_(p, o.weight_decay())
                     : torch::add_out(tmp0 = scratch(0, r), grad, p, o.weight_decay());
  }
  exp_avg.mul_(beta1).add_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  // denom = (v.sqrt() / sqrt(bias_correction2)).add_(eps), v = max_exp_avg_sq with amsgrad
  torch::Tensor v = exp_avg_sq;
  if (o.amsgrad()) {
    torch::Tensor max_exp_avg_sq =
        state_slice(static_cast<std::size_t>(field_index("max_exp_avg_sq")), r.begin, r.end);
    torch::max_out(max_exp_avg_sq, exp_avg_sq, max_exp_avg_sq);
    v = max_exp_avg_sq;
  }
  torch::Tensor denom = torch::sqrt_out(tmp1 = scratch(1, r), v);
  denom.div_(std::sqrt(bias_correction2)).add_(o.eps());
  const auto step_size = o.lr() / bias_correction1;
  p.addcdiv_(exp_avg, denom, -step_size);
}

void FlatOptimizer::Impl::step_adagrad(const Run& r, const optim::AdagradOptions& o,
                                       std::int64_t step) {
  torch::Tensor tmp0;  // scratch(0, r) and scratch(1, r) once needed
  torch::Tensor tmp1;
  torch::Tensor p = slice(flat_param, r.begin, r.end);
  bool converted = false;
  torch::Tensor grad = grad_of(r, &converted);
  torch::Tensor sum = state_slice(0, r.begin, r.end);
  if (o.weight_decay() != 0) {
    grad = converted ? grad.add_(p, o.weight_decay())
                     : torch::add_out(tmp0 = scratch(0, r), grad, p, o.weight_decay());
  }
  const auto clr = o.lr() / (1 + static_cast<double>(step - 1) * o.lr_decay());
  sum.addcmul_(grad, grad, 1.0);
  // std = sum.sqrt().add_(eps)
  torch::Tensor std_dev = torch::sqrt_out(tmp1 = scratch(1, r), sum);
  std_dev.add_(o.eps());
  p.addcdiv_(grad, std_dev, -clr);
}

void FlatOptimizer::Impl::step_rmsprop(const Run& r, const optim::RMSpropOptions& o) {
  torch::Tensor tmp0;  // scratch(0, r) and scratch(1, r) once needed
  torch::Tensor tmp1;
  torch::Tensor p = slice(flat_param, r.begin, r.end);
  bool converted = false;
  torch::Tensor grad = grad_of(r, &converted);
  torch::Tensor square_avg = state_slice(0, r.begin, r.end);
  const auto alpha = o.alpha();
  if (o.weight_decay() != 0) {
    grad = converted ? grad.add_(p, o.weight_decay())
                     : torch::add_out(tmp0 = scratch(0, r), grad, p, o.weight_decay());
  }
  square_avg.mul_(alpha).addcmul_(grad, grad, 1 - alpha);
  torch::Tensor avg;
  if (o.centered()) {
    torch::Tensor grad_avg =
        state_slice(static_cast<std::size_t>(field_index("grad_avg")), r.begin, r.end);
    grad_avg.mul_(alpha).add_(grad, 1 - alpha);
    // avg = square_avg.addcmul(grad_avg, grad_avg, -1).sqrt_().add_(eps)
    avg = torch::addcmul_out(tmp1 = scratch(1, r), square_avg, grad_avg, grad_avg, -1);
    avg.sqrt_().add_(o.eps());
  } else {
    // avg = square_avg.sqrt().add_(eps)
    avg = torch::sqrt_out(tmp1 = scratch(1, r), square_avg);
    avg.add_(o.eps());
  }
  if (o.momentum() > 0) {
    torch::Tensor buf =
        state_slice(static_cast<std::size_t>(field_index("momentum_buffer")), r.begin, r.end);
    buf.mul_(o.momentum()).addcdiv_(grad, avg);
    p.add_(buf, -o.lr());
  } else {
    p.addcdiv_(grad, avg, -o.lr());
  }
}

// The optimizer's own step, on one run's slices.
void FlatOptimizer::Impl::step_run(const Run& r) {
  const auto& options = opt->param_groups()[r.group].options();
  const Param& first = params[r.first_param];
  switch (traits->kind) {
    case detail::OptimizerKind::kSGD:
      step_sgd(r, static_cast<const optim::SGDOptions&>(options), first.has_buffer);
      return;
    case detail::OptimizerKind::kAdam:
      step_adam(r, static_cast<const optim::AdamOptions&>(options), first.step + 1, false);
      return;
    case detail::OptimizerKind::kAdamW:
      step_adam(r, static_cast<const optim::AdamWOptions&>(options), first.step + 1, true);
      return;
    case detail::OptimizerKind::kAdagrad:
      step_adagrad(r, static_cast<const optim::AdagradOptions&>(options), first.step + 1);
      return;
    case detail::OptimizerKind::kRMSprop:
      step_rmsprop(r, static_cast<const optim::RMSpropOptions&>(options));
      return;
    case detail::OptimizerKind::kLBFGS:
      break;  // refused at construction
  }
  MPU_THROW(Error, "FlatOptimizer::step: no flat step for ", traits->name);
}

void FlatOptimizer::step() {
  step(1.0);
}

void FlatOptimizer::step(double grad_scale) {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;
  MPU_CHECK(std::isfinite(grad_scale), "FlatOptimizer::step: grad_scale must be finite, got ",
            grad_scale);
  m.check_views();
  const auto& groups = m.opt->param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (std::size_t f = 0; f < m.traits->fields.size(); ++f) {
      MPU_CHECK(!m.traits->needs(groups[g].options(), f) || m.slot_of(f) >= 0,
                "FlatOptimizer::step: ", m.traits->name, " group ", g, " now needs the '",
                m.traits->fields[f].name,
                "' buffer (momentum, amsgrad or centered turned on), which no ",
                "group needed at construction, so none was allocated; build a new FlatOptimizer");
    }
  }
  if (m.full && !m.state_in_sync()) import_state();
  m.grad_scale = grad_scale;
  if (m.use_fused) {
#if MPU_HAS_CUDA
    m.step_fused();
#endif
  } else {
    for (const auto& r : m.runs) {
      m.step_run(r);
      if (m.model_param.defined()) {
        m.slice(m.model_param, r.begin, r.end).copy_(m.slice(m.flat_param, r.begin, r.end));
      }
    }
  }
  m.advance();
}

void FlatOptimizer::Impl::advance() {
  // Every parameter has a gradient, so every parameter of the optimizer stepped (those outside
  // [begin, end) on other ranks): advance all counts, as the plain step would.
  const auto& groups = opt->param_groups();
  bool new_buffers = false;
  const int mb = field_index("momentum_buffer");
  for (auto& p : params) {
    ++p.step;
    if (traits->lazy_state && !p.has_buffer && mb >= 0 &&
        traits->needs(groups[p.group].options(), fields[static_cast<std::size_t>(mb)])) {
      p.has_buffer = true;
      p.present |= 1u << mb;
      new_buffers = true;
    }
    if (!traits->lazy_state) {
      // A buffer an option turned on since the import (amsgrad, centered, momentum) is now in
      // use for this parameter.
      for (std::size_t k = 0; k < fields.size(); ++k) {
        if (traits->needs(groups[p.group].options(), fields[k])) p.present |= 1u << k;
      }
    }
  }
  if (new_buffers) build_runs();
  if (full) write_back();
}

void FlatOptimizer::stage_step() {
  Impl& m = *impl_;
  MPU_CHECK(m.use_fused,
            "FlatOptimizer::stage_step: only the fused CUDA step reads staged "
            "scalars; this optimizer steps with torch operations (not CUDA, not Float, or "
            "FlatOptimizerOptions::fused off)");
  m.check_views();
  if (m.full && !m.state_in_sync()) import_state();
#if MPU_HAS_CUDA
  m.stage_fused();
#endif
}

void FlatOptimizer::set_step_reads_staged(bool on) {
  Impl& m = *impl_;
  MPU_CHECK(!on || m.live_runs.defined(),
            "FlatOptimizer::set_step_reads_staged: nothing was staged; call stage_step() first");
  m.step_reads_live = on;
}

void FlatOptimizer::advance() {
  impl_->advance();
}

}  // namespace mpu
