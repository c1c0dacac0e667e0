#include "mpu/scaling.h"

#include <cxxabi.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "misc/log.h"
#include "mpu/error.h"
#include "misc/torch_compat.h"

namespace mpu {
namespace {

struct Registered {
  std::string name;
  ScalingRule rule;
};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

std::map<std::type_index, Registered>& registry() {
  static std::map<std::type_index, Registered> r;
  return r;
}

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                           std::free);
  return status == 0 && d ? std::string(d.get()) : std::string(mangled);
}

// Applies `fn(options, group)` to every parameter group, with `Options` the group's options type.
template <typename Options, typename Fn>
std::vector<ScalingChange> for_each_group(torch::optim::Optimizer& opt, Fn fn) {
  std::vector<ScalingChange> changes;
  auto& groups = opt.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    auto& options = static_cast<Options&>(groups[g].options());
    fn(options, g, changes);
  }
  return changes;
}

// Rescales an option through its TORCH_ARG getter/setter pair.
#define MPU_SCALE_ARG(opts, arg, factor, name, group, out)                \
  do {                                                                    \
    double v_ = (opts).arg();                                             \
    if (v_ != 0) {                                                        \
      (out).push_back(scale_option(v_, (factor), (name), (group), #arg)); \
      (opts).arg(v_);                                                     \
    }                                                                     \
  } while (0)

std::vector<ScalingChange> rescale_sgd(torch::optim::Optimizer& opt, int n) {
  const double f = n;
  return for_each_group<torch::optim::SGDOptions>(
      opt, [&](torch::optim::SGDOptions& o, std::size_t g, std::vector<ScalingChange>& out) {
        // lr is always recorded, even when zero, so the log shows the rule ran.
        double lr = o.lr();
        out.push_back(scale_option(lr, 1.0 / f, "SGD", g, "lr"));
        o.lr(lr);
        MPU_SCALE_ARG(o, weight_decay, f, "SGD", g, out);
      });
}

template <typename Options>
std::vector<ScalingChange> rescale_eps(torch::optim::Optimizer& opt, int n, const char* name,
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

std::vector<ScalingChange> rescale_adagrad(torch::optim::Optimizer& opt, int n) {
  auto changes = rescale_eps<torch::optim::AdagradOptions>(opt, n, "Adagrad", true);
  const double f2 = static_cast<double>(n) * n;
  auto& groups = opt.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    auto& o = static_cast<torch::optim::AdagradOptions&>(groups[g].options());
    if (o.initial_accumulator_value() == 0) continue;
    double v = o.initial_accumulator_value();
    changes.push_back(scale_option(v, f2, "Adagrad", g, "initial_accumulator_value"));
    o.initial_accumulator_value(v);
    // Adagrad creates its accumulators in its constructor, from the unscaled value.
    torch::NoGradGuard no_grad;
    for (const auto& p : groups[g].params()) {
      auto it = opt.state().find(detail::optimizer_state_key(p));
      if (it == opt.state().end()) continue;
      auto& st = static_cast<torch::optim::AdagradParamState&>(*it->second);
      if (st.step() == 0) st.sum().mul_(f2);
    }
  }
  return changes;
}

}  // namespace

void register_scaling_rule(std::type_index type, std::string name, ScalingRule rule) {
  MPU_CHECK(static_cast<bool>(rule), "register_scaling_rule: the rule for ", name, " is empty");
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[type] = Registered{std::move(name), std::move(rule)};
}

ScalingChange scale_option(double& value, double factor, const std::string& optimizer,
                           std::size_t group, const std::string& option) {
  ScalingChange c{optimizer, group, option, value, value * factor};
  value = c.after;
  return c;
}

std::string optimizer_name(const torch::optim::Optimizer& optimizer) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find(std::type_index(typeid(optimizer)));
    if (it != registry().end()) return it->second.name;
  }
  using namespace torch::optim;
  if (dynamic_cast<const SGD*>(&optimizer)) return "SGD";
  if (dynamic_cast<const AdamW*>(&optimizer)) return "AdamW";
  if (dynamic_cast<const Adam*>(&optimizer)) return "Adam";
  if (dynamic_cast<const Adagrad*>(&optimizer)) return "Adagrad";
  if (dynamic_cast<const RMSprop*>(&optimizer)) return "RMSprop";
  if (dynamic_cast<const LBFGS*>(&optimizer)) return "LBFGS";
  return demangle(typeid(optimizer).name());
}

std::vector<ScalingChange> apply_scaling(torch::optim::Optimizer& optimizer, int n,
                                         const ScalingPolicy& policy) {
  using namespace torch::optim;
  MPU_CHECK(n >= 1, "apply_scaling: the number of processes must be at least 1, got ", n);
  const std::string name = optimizer_name(optimizer);
  MPU_CHECK(dynamic_cast<LBFGS*>(&optimizer) == nullptr,
            "apply_scaling: LBFGS cannot be used with data-parallel updaters: its step "
            "re-evaluates a closure (forward and backward) many times, and every evaluation "
            "would need all ranks to take part. Use SGD, Adam, AdamW, Adagrad or RMSprop");
  if (policy.reduction == Reduction::kMean || !policy.rescale || n == 1) return {};

  ScalingRule rule;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find(std::type_index(typeid(optimizer)));
    if (it != registry().end()) rule = it->second.rule;
  }
  std::vector<ScalingChange> changes;
  if (rule) {
    changes = rule(optimizer, n);
  } else if (dynamic_cast<SGD*>(&optimizer)) {
    changes = rescale_sgd(optimizer, n);
  } else if (dynamic_cast<AdamW*>(&optimizer)) {
    changes = rescale_eps<AdamWOptions>(optimizer, n, "AdamW", false);
  } else if (dynamic_cast<Adam*>(&optimizer)) {
    changes = rescale_eps<AdamOptions>(optimizer, n, "Adam", true);
  } else if (dynamic_cast<Adagrad*>(&optimizer)) {
    changes = rescale_adagrad(optimizer, n);
  } else if (dynamic_cast<RMSprop*>(&optimizer)) {
    changes = rescale_eps<RMSpropOptions>(optimizer, n, "RMSprop", true);
  } else {
    MPU_THROW(InvalidArgument, "apply_scaling: no rescaling rule for optimizer type ", name,
              " with a sum of ", n,
              " gradients per step. Register one with mpu::register_scaling_rule<", name,
              ">(...), or opt out with ScalingPolicy::sum_unscaled() or use "
              "ScalingPolicy::mean()");
  }
  for (const auto& c : changes) {
    MPU_LOG_INFO("rescaled ", c.optimizer, " param group ", c.group, ": ", c.option, " ", c.before,
                 " -> ", c.after, " (a sum of ", n, " gradients per step)");
  }
  return changes;
}

}  // namespace mpu
