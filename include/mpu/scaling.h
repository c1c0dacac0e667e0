/// \file
/// How gradients from n processes are combined, and what that asks of the optimizer.
///
/// The seed (Chainer's MultiprocessParallelUpdater) *sums* the gradients of n processes, each
/// computed from the mean loss of its own batch b. The sum is n times the gradient of the mean
/// loss over the whole n·b batch, so the optimizer is rescaled once, at construction, to make
/// the update identical to one process training on n·b:
///
/// | optimizer | rescaled options (Sum policy) | why it is exact |
/// |---|---|---|
/// | SGD (momentum, dampening, nesterov) | `lr /= n`, `weight_decay *= n` | the step is linear in
/// the gradient | | Adam, RMSprop (any momentum, centered) | `eps *= n`, `weight_decay *= n` | the
/// step is invariant to scaling the gradient, eps aside | | AdamW | `eps *= n` | its weight decay
/// is decoupled from the gradient | | Adagrad | `eps *= n`, `weight_decay *= n`,
/// `initial_accumulator_value *= n²` (and its state) | as Adam |
///
/// Chainer rescales `lr` and `eps` only; the weight-decay factor keeps coupled (L2) weight
/// decay equivalent too. LBFGS is refused: it re-evaluates a closure many times per step, which
/// would need every rank to take part in every evaluation.
///
/// The `Mean` policy averages the gradients instead (PyTorch DDP's semantics) and changes
/// nothing. `SumUnscaled` sums and changes nothing: an explicit opt-out for optimizers without a
/// rule, or for users who tuned their hyper-parameters for summed gradients.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <typeindex>
#include <vector>

namespace mpu {

/// How the gradients of the processes are combined.
enum class Reduction {
  kSum,   ///< summed: the seed's semantics; the optimizer is rescaled (unless opted out)
  kMean,  ///< averaged: DDP's semantics; nothing is rescaled
};

/// The gradient reduction and whether the optimizer is rescaled for it.
struct ScalingPolicy {
  /// How the gradients are combined over the processes.
  Reduction reduction = Reduction::kSum;
  /// Apply the optimizer's rescaling rule. Only meaningful with `Reduction::kSum`.
  bool rescale = true;

  /// Chainer's default: sum, and rescale the optimizer.
  static ScalingPolicy sum() { return {Reduction::kSum, true}; }
  /// DDP's semantics: average, change nothing.
  static ScalingPolicy mean() { return {Reduction::kMean, false}; }
  /// Sum, and leave the optimizer as it is (explicit opt-out).
  static ScalingPolicy sum_unscaled() { return {Reduction::kSum, false}; }
};

/// One option of one parameter group that a rule changed.
struct ScalingChange {
  std::string optimizer;  ///< "SGD", "Adam", ... or the registered name
  std::size_t group = 0;  ///< index into `param_groups()`
  std::string option;     ///< "lr", "eps", ...
  /// the option's value before the rule
  double before = 0;
  /// the option's value after the rule
  double after = 0;
};

/// A rescaling rule: changes the optimizer for a sum of `n` gradients per step (processes times
/// accumulation steps) and returns what it changed.
using ScalingRule = std::function<std::vector<ScalingChange>(torch::optim::Optimizer&, int n)>;

/// Registers `rule` for optimizers whose dynamic type is exactly `type`. A registered rule takes
/// precedence over the built-in ones. Thread-safe. Register before constructing an updater.
void register_scaling_rule(std::type_index type, std::string name, ScalingRule rule);

/// Typed convenience: `register_scaling_rule<MyOpt>("MyOpt", [](MyOpt& o, int n) {...})`.
template <typename Opt, typename Fn>
void register_scaling_rule(std::string name, Fn fn) {
  register_scaling_rule(
      std::type_index(typeid(Opt)), std::move(name),
      [fn](torch::optim::Optimizer& opt, int n) { return fn(static_cast<Opt&>(opt), n); });
}

/// Multiplies `value` by `factor` and returns the record of it; a helper for rules.
ScalingChange scale_option(double& value, double factor, const std::string& optimizer,
                           std::size_t group, const std::string& option);

/// Applies `policy` to `optimizer` for a sum of `n` gradients per step (the updaters pass
/// processes times accumulation steps) and returns what changed (empty for
/// `mean()`, `sum_unscaled()` and n == 1). Each change is logged once, with its old and new
/// values. Call it exactly once per optimizer; the updaters do, at construction, and their
/// `load()` restores the saved (already rescaled) options without rescaling again.
///
/// Throws `mpu::InvalidArgument` when n < 1, for LBFGS (with the reason), and for an optimizer
/// type without a rule when rescaling is asked for (naming the type, and the two ways out:
/// `register_scaling_rule` or `ScalingPolicy::sum_unscaled()`).
std::vector<ScalingChange> apply_scaling(torch::optim::Optimizer& optimizer, int n,
                                         const ScalingPolicy& policy);

/// A readable name for the optimizer's dynamic type: "SGD", "Adam", ..., or the registered name,
/// or the demangled C++ type name.
std::string optimizer_name(const torch::optim::Optimizer& optimizer);

}  // namespace mpu
