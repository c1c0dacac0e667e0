// FlatOptimizer's state: reading optimizer.state() into the flat state and writing it back.
#include "optim/flat_optimizer_impl.h"

namespace mpu {

void FlatOptimizer::import_state() {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;
  auto& st = m.opt->state();
  const auto& groups = m.opt->param_groups();
  for (auto& p : m.params) {
    const auto it = st.find(p.key);
    optim::OptimizerParamState* s = it != st.end() ? it->second.get() : nullptr;
    const auto& options = groups[p.group].options();
    p.step = s != nullptr ? m.traits->step_of(*s) : 0;
    p.has_buffer = false;
    p.present = 0;
    const auto [lo, hi] = m.clip(p);
    for (std::size_t k = 0; k < m.fields.size(); ++k) {
      const std::size_t f = m.fields[k];
      torch::Tensor src;
      if (s != nullptr) src = m.field(*s, k);
      // Master weights: state the optimizer created in the parameters' dtype before any step
      // (Adagrad's initial accumulator, made in its constructor) holds only the rounded initial
      // value; start it in the master dtype instead, as a plain fp32 optimizer would have it.
      if (src.defined() && m.model_param.defined() && m.traits->has_step && p.step == 0 &&
          src.scalar_type() != m.flat_param.scalar_type()) {
        src = torch::Tensor();
      }
      if (src.defined()) {
        MPU_CHECK(src.numel() == p.numel, "FlatOptimizer::import_state: the ", m.traits->name,
                  " state '", m.field_name(k), "' of group ", p.group, " parameter ", p.index,
                  " has ", src.numel(), " elements, the parameter ", p.numel);
      }
      const bool present = src.defined() || (!m.traits->lazy_state && m.traits->needs(options, f));
      if (present) p.present |= 1u << k;
      if (m.traits->lazy_state && src.defined()) p.has_buffer = true;
      if (lo == hi) continue;
      torch::Tensor dst = m.state_slice(k, lo, hi);
      if (src.defined()) {
        torch::Tensor from = src.reshape({-1}).narrow(0, lo - p.offset, hi - lo);
        if (from.data_ptr() != dst.data_ptr() || from.device() != dst.device()) dst.copy_(from);
      } else {
        // Absent state starts where the optimizer starts it (Adagrad's initial accumulator).
        dst.fill_(m.traits->initial_value(options, f));
      }
    }
  }
  if (m.full) {
    m.write_back();
  } else {
    for (const auto& p : m.params) st.erase(p.key);
  }
  m.build_runs();
}

std::vector<std::string> FlatOptimizer::state_names() const {
  std::vector<std::string> names;
  for (std::size_t k = 0; k < impl_->fields.size(); ++k) names.emplace_back(impl_->field_name(k));
  return names;
}

std::vector<torch::Tensor> FlatOptimizer::state_shards() const {
  return impl_->state;
}

void FlatOptimizer::export_state(const std::vector<torch::Tensor>& full) {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;
  const std::int64_t numel = m.flat_param.numel();
  MPU_CHECK(full.size() == m.fields.size(), "FlatOptimizer::export_state: got ", full.size(),
            " tensors for ", m.fields.size(), " state buffers (state_names())");
  for (std::size_t k = 0; k < full.size(); ++k) {
    MPU_CHECK(full[k].defined() && full[k].dim() == 1 && full[k].numel() == numel,
              "FlatOptimizer::export_state: state '", m.field_name(k), "' must be a 1-D tensor of ",
              numel, " elements, got ",
              full[k].defined() ? detail::shape_of(full[k]) : std::string("an undefined tensor"));
  }
  if (m.full) {
    for (std::size_t k = 0; k < full.size(); ++k) {
      if (full[k].data_ptr() != m.state[k].data_ptr()) m.state[k].copy_(full[k]);
    }
    m.write_back();
    return;
  }
  auto& st = m.opt->state();
  for (const auto& p : m.params) {
    if (m.traits->lazy_state && !p.has_buffer) {
      st.erase(p.key);
      continue;
    }
    auto s = m.traits->make_state();
    m.traits->set_step(*s, p.step);
    for (std::size_t k = 0; k < m.fields.size(); ++k) {
      if (!(p.present & (1u << k))) continue;
      // In the state dtype (the master's in master-weights mode), on the parameter's device.
      m.field(*s, k) = full[k]
                           .narrow(0, p.offset, p.numel)
                           .view(p.tensor.sizes())
                           .to(p.tensor.options().dtype(m.state[k].scalar_type()),
                               /*non_blocking=*/false, /*copy=*/true);
    }
    st[p.key] = std::move(s);
  }
}

std::int64_t FlatOptimizer::state_bytes() const {
  std::int64_t bytes = 0;
  for (const auto& t : impl_->state)
    bytes += t.numel() * static_cast<std::int64_t>(t.element_size());
  return bytes;
}

}  // namespace mpu
