// The one table of facts about the torch::optim optimizers torch-mpu supports: names, the
// per-element state tensors of their per-parameter state, step counts, which options need
// which buffer, and how an optimizer is rescaled for a sum of n gradients. The flat step, the
// optimizer-state helpers of the updaters and apply_scaling all read it.
#pragma once

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <typeindex>
#include <vector>

#include "mpu/scaling.h"

namespace mpu::detail {

/// Which step kernels the flat step runs.
enum class OptimizerKind { kSGD, kAdam, kAdamW, kAdagrad, kRMSprop, kLBFGS };

/// One per-element state tensor of an optimizer's per-parameter state.
struct StateField {
  const char* name;
  /// The tensor in a parameter's state (TORCH_ARG's non-const getter: writable).
  torch::Tensor& (*get)(torch::optim::OptimizerParamState& state);
};

/// Facts about one optimizer type.
struct OptimizerTraits {
  OptimizerKind kind;
  const char* name;
  /// Non-null: the data-parallel updaters refuse this optimizer, and this says why.
  const char* refused;
  /// `optimizer`'s dynamic type is this one or derives from it.
  bool (*is_a)(const torch::optim::Optimizer& optimizer);
  /// `optimizer`'s dynamic type is exactly this one (what the flat step requires: a subclass's
  /// step may differ).
  std::type_index type;
  /// The group options are this optimizer's options type.
  bool (*options_match)(const torch::optim::OptimizerOptions& options);
  /// The per-element state tensors, in the order FlatOptimizer::state_names() lists them.
  std::vector<StateField> fields;
  /// Whether a group with these (current) options needs `fields[field]` for its parameters.
  bool (*needs)(const torch::optim::OptimizerOptions& options, std::size_t field);
  /// The value a fresh `fields[field]` starts at (Adagrad's initial accumulator; else 0).
  double (*initial_value)(const torch::optim::OptimizerOptions& options, std::size_t field);
  /// True when the per-parameter state has a step count (all but SGD).
  bool has_step;
  /// True when the per-parameter state appears only at the first step (SGD's momentum).
  bool lazy_state;
  std::int64_t (*step_of)(torch::optim::OptimizerParamState& state);
  void (*set_step)(torch::optim::OptimizerParamState& state, std::int64_t step);
  std::unique_ptr<torch::optim::OptimizerParamState> (*make_state)();
  /// The rescaling for a sum of n gradients per step (eps, lr, weight decay); null: none.
  std::vector<ScalingChange> (*rescale)(torch::optim::Optimizer& optimizer, int n);

  /// The index of field `name`, or -1.
  int field_index(const std::string& name) const;
};

/// Every optimizer type in the table.
const std::vector<OptimizerTraits>& optimizer_table();
/// The entry for `optimizer`'s exact dynamic type, or null.
const OptimizerTraits* exact_traits(const torch::optim::Optimizer& optimizer);
/// The entry for `optimizer`'s dynamic type or the table type it derives from, or null.
const OptimizerTraits* traits_of(const torch::optim::Optimizer& optimizer);

/// Moves every tensor of the optimizer's per-parameter state to `device`. Needed because
/// Adagrad creates its state in its constructor, before the model reaches its device.
void move_optimizer_state(torch::optim::Optimizer& optimizer, const torch::Device& device);
/// Bytes of the per-parameter state tensors `optimizer` holds.
std::int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

}  // namespace mpu::detail
