#include "mpu/scaling.h"

#include <map>
#include <mutex>

#include "misc/demangle.h"
#include "misc/log.h"
#include "mpu/error.h"
#include "optim/optimizer_traits.h"

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
  if (const auto* traits = detail::traits_of(optimizer)) return traits->name;
  return detail::demangle(typeid(optimizer));
}

std::vector<ScalingChange> apply_scaling(torch::optim::Optimizer& optimizer, int n,
                                         const ScalingPolicy& policy) {
  MPU_CHECK(n >= 1, "apply_scaling: the number of processes must be at least 1, got ", n);
  const std::string name = optimizer_name(optimizer);
  const detail::OptimizerTraits* traits = detail::traits_of(optimizer);
  MPU_CHECK(traits == nullptr || traits->refused == nullptr, "apply_scaling: ", name,
            " cannot be used with data-parallel updaters: ", traits ? traits->refused : "");
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
  } else if (traits != nullptr && traits->rescale != nullptr) {
    changes = traits->rescale(optimizer, n);
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
