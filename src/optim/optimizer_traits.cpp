#include "optim/optimizer_traits.h"

#include "misc/torch_compat.h"

namespace mpu::detail {
namespace {

namespace optim = torch::optim;

template <typename Opt>
bool is_a(const optim::Optimizer& o) {
  return dynamic_cast<const Opt*>(&o) != nullptr;
}

template <typename Options>
bool options_are(const optim::OptimizerOptions& o) {
  return dynamic_cast<const Options*>(&o) != nullptr;
}

template <typename State>
std::int64_t step_of(optim::OptimizerParamState& s) {
  return static_cast<State&>(s).step();
}

template <typename State>
void set_step(optim::OptimizerParamState& s, std::int64_t step) {
  static_cast<State&>(s).step(static_cast<OptimizerStepCount>(step));
}

std::int64_t no_step(optim::OptimizerParamState& /*s*/) {
  return 0;
}
void set_no_step(optim::OptimizerParamState& /*s*/, std::int64_t /*step*/) {}

template <typename State>
std::unique_ptr<optim::OptimizerParamState> make_state() {
  return std::make_unique<State>();
}

double starts_at_zero(const optim::OptimizerOptions& /*o*/, std::size_t /*field*/) {
  return 0.0;
}

// A state tensor through its TORCH_ARG getter.
#define MPU_STATE_FIELD(State, field)                                          \
  StateField {                                                                 \
#field, [](optim::OptimizerParamState &                                    \
               s) -> torch::Tensor& { return static_cast<State&>(s).field(); } \
  }

// --- rescaling for a sum of n gradients -------------------------------------------------------

// Applies `fn(options, group, changes)` to every parameter group.
template <typename Options, typename Fn>
std::vector<ScalingChange> for_each_group(optim::Optimizer& opt, Fn fn) {
  std::vector<ScalingChange> changes;
  auto& groups = opt.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    fn(static_cast<Options&>(groups[g].options()), g, changes);
  }
  return changes;
}

// Rescales an option through its TORCH_ARG getter/setter pair, when it is not zero.
#define MPU_SCALE_ARG(opts, arg, factor, name, group, out)                \
  do {                                                                    \
    double v_ = (opts).arg();                                             \
    if (v_ != 0) {                                                        \
      (out).push_back(scale_option(v_, (factor), (name), (group), #arg)); \
      (opts).arg(v_);                                                     \
    }                                                                     \
  } while (0)

// A sum of n gradients is n times the mean: SGD's lr is divided by n, and its (coupled) weight
// decay multiplied by n, so that the update equals the mean's.
std::vector<ScalingChange> rescale_sgd(optim::Optimizer& opt, int n) {
  const double f = n;
  return for_each_group<optim::SGDOptions>(
      opt, [&](optim::SGDOptions& o, std::size_t g, std::vector<ScalingChange>& out) {
        // lr is always recorded, even when zero, so the log shows the rule ran.
        double lr = o.lr();
        out.push_back(scale_option(lr, 1.0 / f, "SGD", g, "lr"));
        o.lr(lr);
        MPU_SCALE_ARG(o, weight_decay, f, "SGD", g, out);
      });
}

// Adaptive optimizers divide by a running norm of the gradient, which scales with it: only eps
// (and a weight decay added to the gradient) must grow by n.
template <typename Options>
std::vector<ScalingChange> rescale_eps(optim::Optimizer& opt, int n, const char* name,
                                       bool coupled_weight_decay) {
  const double f = n;
  return for_each_group<Options>(opt,
                                 [&](Options& o, std::size_t g, std::vector<ScalingChange>& out) {
                                   double eps = o.eps();
                                   out.push_back(scale_option(eps, f, name, g, "eps"));
                                   o.eps(eps);
                                   if (coupled_weight_decay)
                                     MPU_SCALE_ARG(o, weight_decay, f, name, g, out);
                                 });
}

std::vector<ScalingChange> rescale_adam(optim::Optimizer& opt, int n) {
  return rescale_eps<optim::AdamOptions>(opt, n, "Adam", true);
}
std::vector<ScalingChange> rescale_adamw(optim::Optimizer& opt, int n) {
  return rescale_eps<optim::AdamWOptions>(opt, n, "AdamW", false);
}
std::vector<ScalingChange> rescale_rmsprop(optim::Optimizer& opt, int n) {
  return rescale_eps<optim::RMSpropOptions>(opt, n, "RMSprop", true);
}

// Adagrad's accumulator sums squared gradients: its initial value grows by n^2.
std::vector<ScalingChange> rescale_adagrad(optim::Optimizer& opt, int n) {
  auto changes = rescale_eps<optim::AdagradOptions>(opt, n, "Adagrad", true);
  const double f2 = static_cast<double>(n) * n;
  auto& groups = opt.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    auto& o = static_cast<optim::AdagradOptions&>(groups[g].options());
    if (o.initial_accumulator_value() == 0) continue;
    double v = o.initial_accumulator_value();
    changes.push_back(scale_option(v, f2, "Adagrad", g, "initial_accumulator_value"));
    o.initial_accumulator_value(v);
    // Adagrad creates its accumulators in its constructor, from the unscaled value.
    torch::NoGradGuard no_grad;
    for (const auto& p : groups[g].params()) {
      auto it = opt.state().find(optimizer_state_key(p));
      if (it == opt.state().end()) continue;
      auto& st = static_cast<optim::AdagradParamState&>(*it->second);
      if (st.step() == 0) st.sum().mul_(f2);
    }
  }
  return changes;
}

#undef MPU_SCALE_ARG

// --- the table ----------------------------------------------------------------------------------

std::vector<OptimizerTraits> build_table() {
  using optim::AdagradOptions;
  using optim::AdamOptions;
  using optim::AdamWOptions;
  using optim::RMSpropOptions;
  using optim::SGDOptions;
  std::vector<OptimizerTraits> t;
  t.push_back(OptimizerTraits{OptimizerKind::kSGD,
                              "SGD",
                              nullptr,
                              is_a<optim::SGD>,
                              typeid(optim::SGD),
                              options_are<SGDOptions>,
                              {MPU_STATE_FIELD(optim::SGDParamState, momentum_buffer)},
                              [](const optim::OptimizerOptions& o, std::size_t /*field*/) {
                                return static_cast<const SGDOptions&>(o).momentum() != 0;
                              },
                              starts_at_zero,
                              /*has_step=*/false,
                              /*lazy_state=*/true,
                              no_step,
                              set_no_step,
                              make_state<optim::SGDParamState>,
                              rescale_sgd});
  t.push_back(OptimizerTraits{OptimizerKind::kAdam,
                              "Adam",
                              nullptr,
                              is_a<optim::Adam>,
                              typeid(optim::Adam),
                              options_are<AdamOptions>,
                              {MPU_STATE_FIELD(optim::AdamParamState, exp_avg),
                               MPU_STATE_FIELD(optim::AdamParamState, exp_avg_sq),
                               MPU_STATE_FIELD(optim::AdamParamState, max_exp_avg_sq)},
                              [](const optim::OptimizerOptions& o, std::size_t field) {
                                return field < 2 || static_cast<const AdamOptions&>(o).amsgrad();
                              },
                              starts_at_zero,
                              true,
                              false,
                              step_of<optim::AdamParamState>,
                              set_step<optim::AdamParamState>,
                              make_state<optim::AdamParamState>,
                              rescale_adam});
  t.push_back(OptimizerTraits{OptimizerKind::kAdamW,
                              "AdamW",
                              nullptr,
                              is_a<optim::AdamW>,
                              typeid(optim::AdamW),
                              options_are<AdamWOptions>,
                              {MPU_STATE_FIELD(optim::AdamWParamState, exp_avg),
                               MPU_STATE_FIELD(optim::AdamWParamState, exp_avg_sq),
                               MPU_STATE_FIELD(optim::AdamWParamState, max_exp_avg_sq)},
                              [](const optim::OptimizerOptions& o, std::size_t field) {
                                return field < 2 || static_cast<const AdamWOptions&>(o).amsgrad();
                              },
                              starts_at_zero,
                              true,
                              false,
                              step_of<optim::AdamWParamState>,
                              set_step<optim::AdamWParamState>,
                              make_state<optim::AdamWParamState>,
                              rescale_adamw});
  t.push_back(OptimizerTraits{
      OptimizerKind::kAdagrad,
      "Adagrad",
      nullptr,
      is_a<optim::Adagrad>,
      typeid(optim::Adagrad),
      options_are<AdagradOptions>,
      {MPU_STATE_FIELD(optim::AdagradParamState, sum)},
      [](const optim::OptimizerOptions& /*o*/, std::size_t /*field*/) { return true; },
      [](const optim::OptimizerOptions& o, std::size_t /*field*/) {
        return static_cast<const AdagradOptions&>(o).initial_accumulator_value();
      },
      true,
      false,
      step_of<optim::AdagradParamState>,
      set_step<optim::AdagradParamState>,
      make_state<optim::AdagradParamState>,
      rescale_adagrad});
  t.push_back(OptimizerTraits{OptimizerKind::kRMSprop,
                              "RMSprop",
                              nullptr,
                              is_a<optim::RMSprop>,
                              typeid(optim::RMSprop),
                              options_are<RMSpropOptions>,
                              {MPU_STATE_FIELD(optim::RMSpropParamState, square_avg),
                               MPU_STATE_FIELD(optim::RMSpropParamState, momentum_buffer),
                               MPU_STATE_FIELD(optim::RMSpropParamState, grad_avg)},
                              [](const optim::OptimizerOptions& o, std::size_t field) {
                                const auto& r = static_cast<const RMSpropOptions&>(o);
                                return field == 0 || (field == 1 && r.momentum() > 0) ||
                                       (field == 2 && r.centered());
                              },
                              starts_at_zero,
                              true,
                              false,
                              step_of<optim::RMSpropParamState>,
                              set_step<optim::RMSpropParamState>,
                              make_state<optim::RMSpropParamState>,
                              rescale_rmsprop});
  t.push_back(OptimizerTraits{
      OptimizerKind::kLBFGS,
      "LBFGS",
      "its step re-evaluates a closure (forward and backward) many times, and every evaluation "
      "would need all ranks to take part. Use SGD, Adam, AdamW, Adagrad or RMSprop",
      is_a<optim::LBFGS>,
      typeid(optim::LBFGS),
      options_are<optim::LBFGSOptions>,
      {},
      [](const optim::OptimizerOptions& /*o*/, std::size_t /*field*/) { return false; },
      starts_at_zero,
      false,
      true,
      no_step,
      set_no_step,
      make_state<optim::LBFGSParamState>,
      nullptr});
  return t;
}

#undef MPU_STATE_FIELD

}  // namespace

int OptimizerTraits::field_index(const std::string& field) const {
  for (std::size_t i = 0; i < fields.size(); ++i) {
    if (field == fields[i].name) return static_cast<int>(i);
  }
  return -1;
}

const std::vector<OptimizerTraits>& optimizer_table() {
  static const std::vector<OptimizerTraits> table = build_table();
  return table;
}

const OptimizerTraits* exact_traits(const torch::optim::Optimizer& optimizer) {
  const std::type_index type(typeid(optimizer));
  for (const auto& t : optimizer_table()) {
    if (t.type == type) return &t;
  }
  return nullptr;
}

const OptimizerTraits* traits_of(const torch::optim::Optimizer& optimizer) {
  if (const auto* t = exact_traits(optimizer)) return t;
  for (const auto& t : optimizer_table()) {
    if (t.is_a(optimizer)) return &t;
  }
  return nullptr;
}

void move_optimizer_state(torch::optim::Optimizer& optimizer, const torch::Device& device) {
  const OptimizerTraits* traits = traits_of(optimizer);
  if (traits == nullptr) return;
  torch::NoGradGuard no_grad;
  for (auto& entry : optimizer.state()) {
    if (!entry.second) continue;
    for (const auto& f : traits->fields) {
      torch::Tensor& t = f.get(*entry.second);
      if (t.defined()) t = t.to(device);
    }
  }
}

std::int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  const OptimizerTraits* traits = traits_of(optimizer);
  if (traits == nullptr) return 0;
  std::int64_t bytes = 0;
  for (const auto& entry : optimizer.state()) {
    if (!entry.second) continue;
    for (const auto& f : traits->fields) {
      const torch::Tensor& t = f.get(*entry.second);
      if (t.defined()) bytes += t.numel() * static_cast<std::int64_t>(t.element_size());
    }
  }
  return bytes;
}

}  // namespace mpu::detail
