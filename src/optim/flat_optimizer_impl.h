// The private state of FlatOptimizer, shared by its files: flat_optimizer.cpp (construction
// and checks), flat_state.cpp (state import and export), flat_step.cpp (the step with torch
// operations), flat_step_cuda.cpp (the fused CUDA step).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "misc/torch_compat.h"
#include "mpu/config.h"
#include "mpu/error.h"
#include "mpu/flat_optimizer.h"
#include "optim/optimizer_traits.h"

namespace mpu {
namespace kernels {
struct FusedStepArgs;
}

namespace optim = torch::optim;

struct FlatOptimizer::Impl {
  /// One parameter of the optimizer, in the flat buffers.
  struct Param {
    std::size_t group = 0;
    std::size_t index = 0;  // in its group
    torch::Tensor tensor;   // the optimizer's parameter (shared)
    std::int64_t offset = 0;
    std::int64_t numel = 0;
    detail::OptimizerStateKey key{};
    std::int64_t step = 0;      // Adam, AdamW, Adagrad, RMSprop
    bool has_buffer = false;    // SGD: the momentum buffer exists (after the first step)
    std::uint32_t present = 0;  // bit i: the plain optimizer's state has buffer names_[i]
  };
  /// Adjacent parameters of one group with equal step counts, clipped to [begin_, end_).
  struct Run {
    std::size_t group = 0;
    std::size_t first_param = 0;  // index into params_ (sorted by offset)
    std::int64_t begin = 0;       // elements of the flat buffers
    std::int64_t end = 0;
  };

  optim::Optimizer* opt = nullptr;
  const detail::OptimizerTraits* traits = nullptr;
  torch::Tensor flat_param;  // the parameters, or their master copy
  torch::Tensor flat_grad;
  torch::Tensor model_param;  // master-weights mode: what the parameters are views of
  bool use_fused = false;     // step() runs the fused CUDA kernel
  double grad_scale = 1.0;    // of the step in progress
  std::int64_t begin = 0;
  std::int64_t end = 0;
  bool full = false;
  std::vector<std::size_t> fields;                 // into traits->fields, state_names() order
  std::vector<torch::Tensor> state;                // one per field, end - begin elements
  std::vector<Param> params;                       // sorted by offset
  std::vector<std::vector<std::size_t>> by_group;  // [group][index] -> index into params
  std::vector<Run> runs;
  std::vector<torch::Tensor> scratch_buffers;  // CPU only, see scratch()

  /// The index into `fields` (and `state`) of traits->fields[f], or -1 when not allocated.
  /// The buffer the optimizer's parameters are views of.
  const torch::Tensor& param_base() const {
    return model_param.defined() ? model_param : flat_param;
  }

  int slot_of(std::size_t f) const {
    for (std::size_t i = 0; i < fields.size(); ++i) {
      if (fields[i] == f) return static_cast<int>(i);
    }
    return -1;
  }
  /// The slot of the state buffer named `name`, or -1.
  int field_index(const char* name) const {
    const int f = traits->field_index(name);
    return f < 0 ? -1 : slot_of(static_cast<std::size_t>(f));
  }
  /// Buffer `fields[k]` of a parameter's state.
  torch::Tensor& field(optim::OptimizerParamState& s, std::size_t k) const {
    return traits->fields[fields[k]].get(s);
  }
  const char* field_name(std::size_t k) const { return traits->fields[fields[k]].name; }

  torch::Tensor slice(const torch::Tensor& flat, std::int64_t lo, std::int64_t hi) const {
    return flat.narrow(0, lo, hi - lo);
  }
  torch::Tensor state_slice(std::size_t k, std::int64_t lo, std::int64_t hi) const {
    return state[k].narrow(0, lo - begin, hi - lo);
  }
  /// A parameter's elements inside [begin, end), as [lo, hi); lo == hi when none.
  std::pair<std::int64_t, std::int64_t> clip(const Param& p) const {
    const std::int64_t lo = std::max(p.offset, begin);
    const std::int64_t hi = std::min(p.offset + p.numel, end);
    return lo < hi ? std::make_pair(lo, hi) : std::make_pair(lo, lo);
  }
  /// The full-range view of buffer k that the optimizer's state holds for `p`.
  torch::Tensor state_view(std::size_t k, const Param& p) const {
    return state_slice(k, p.offset, p.offset + p.numel).view(p.tensor.sizes());
  }
  void* expected_state_ptr(std::size_t k, const Param& p) const {
    return static_cast<char*>(state[k].data_ptr()) +
           (p.offset - begin) * static_cast<std::int64_t>(state[k].element_size());
  }

  void build_runs() {
    runs.clear();
    for (std::size_t i = 0; i < params.size(); ++i) {
      const Param& p = params[i];
      const auto [lo, hi] = clip(p);
      if (lo == hi) continue;
      if (!runs.empty()) {
        Run& r = runs.back();
        const Param& q = params[r.first_param];
        if (r.group == p.group && r.end == lo && q.step == p.step && q.has_buffer == p.has_buffer) {
          r.end = hi;
          continue;
        }
      }
      runs.push_back(Run{p.group, i, lo, hi});
    }
  }

  // --- validation ------------------------------------------------------------------------------

  /// Checks that the optimizer's parameters are still the views they were at construction.
  void check_views() const {
    const auto& groups = opt->param_groups();
    MPU_CHECK(groups.size() == by_group.size(), "FlatOptimizer::step: the optimizer has ",
              groups.size(), " param groups, ", by_group.size(),
              " at construction; build a new FlatOptimizer after add_param_group");
    const auto pitem = static_cast<std::int64_t>(param_base().element_size());
    const auto gitem = static_cast<std::int64_t>(flat_grad.element_size());
    char* const pbase = static_cast<char*>(param_base().data_ptr());
    char* const gbase = static_cast<char*>(flat_grad.data_ptr());
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const auto& ps = groups[g].params();
      const auto& idx = by_group[g];
      std::size_t k = 0;
      for (std::size_t i = 0; i < ps.size(); ++i) {
        if (ps[i].numel() == 0) continue;
        MPU_CHECK(k < idx.size() &&
                      ps[i].unsafeGetTensorImpl() == params[idx[k]].tensor.unsafeGetTensorImpl(),
                  "FlatOptimizer::step: group ", g, " parameter ", i,
                  " is not the tensor it was at construction; build a new FlatOptimizer");
        const Param& p = params[idx[k++]];
        MPU_CHECK(ps[i].data_ptr() == pbase + p.offset * pitem, "FlatOptimizer::step: group ", g,
                  " parameter ", i, " is no longer a view of ",
                  model_param.defined() ? "model_param" : "flat_param", " at element ", p.offset,
                  " (its storage was replaced, e.g. by set_data or Module::to)");
        const torch::Tensor& grad = ps[i].grad();
        MPU_CHECK(grad.defined() && grad.data_ptr() == gbase + p.offset * gitem,
                  "FlatOptimizer::step: group ", g, " parameter ", i, "'s gradient is ",
                  grad.defined() ? "no longer the view of flat_grad at element "
                                 : "undefined, not the view of flat_grad at element ",
                  p.offset,
                  " (zero gradients with FlatBuffer::zero_grad() or zero_grad(false); "
                  "LibTorch 2.x's zero_grad() sets them to none)");
      }
      MPU_CHECK(k == idx.size(), "FlatOptimizer::step: group ", g, " has fewer parameters than ",
                "at construction; build a new FlatOptimizer");
    }
  }

  /// Full range: true when optimizer.state() is exactly what the last import or step left
  /// (views into the flat state, the same step counts).
  bool state_in_sync() const {
    auto& st = opt->state();
    for (const Param& p : params) {
      const auto it = st.find(p.key);
      const bool expect = traits->lazy_state ? p.has_buffer : true;
      if ((it != st.end() && it->second != nullptr) != expect) return false;
      if (!expect) continue;
      if (traits->has_step && traits->step_of(*it->second) != p.step) return false;
      for (std::size_t k = 0; k < fields.size(); ++k) {
        if (!(p.present & (1u << k))) continue;
        const torch::Tensor& t = field(*it->second, k);
        if (!t.defined() || t.data_ptr() != expected_state_ptr(k, p)) return false;
        break;  // one buffer tells whether the state was replaced
      }
    }
    return true;
  }

  /// Full range: writes the step counts, and the views of newly created buffers, into
  /// optimizer.state().
  void write_back() {
    auto& st = opt->state();
    for (const Param& p : params) {
      if (traits->lazy_state && !p.has_buffer) continue;
      auto& slot = st[p.key];
      if (!slot) slot = traits->make_state();
      traits->set_step(*slot, p.step);
      for (std::size_t k = 0; k < fields.size(); ++k) {
        if (!(p.present & (1u << k))) continue;
        torch::Tensor& t = field(*slot, k);
        if (!t.defined() || t.data_ptr() != expected_state_ptr(k, p)) t = state_view(k, p);
      }
    }
  }

  // --- the step, per run (flat_step.cpp) ----------------------------------------------------

  /// Scratch tensor i for run r (an lvalue, for the out= variants).
  torch::Tensor scratch(std::size_t i, const Run& r);
  /// The run's gradient in flat_param's dtype, times grad_scale: the slice of flat_grad itself
  /// when nothing changes, else scratch 0 (which the step may then update in place).
  torch::Tensor grad_of(const Run& r, bool* is_scratch);
  void step_run(const Run& r);
  void step_sgd(const Run& r, const optim::SGDOptions& o, bool has_buffer);
  template <typename Options>
  void step_adam(const Run& r, const Options& o, std::int64_t step, bool decoupled);
  void step_adagrad(const Run& r, const optim::AdagradOptions& o, std::int64_t step);
  void step_rmsprop(const Run& r, const optim::RMSpropOptions& o);
  /// What a step does on the host after its kernels: step counts, lazily created buffers.
  void advance();
  torch::Tensor live_runs;       // the staged scalars of a captured step (kernels::FusedRun)
  bool step_reads_live = false;  // step_fused's kernel reads live_runs (while capturing)
#if MPU_HAS_CUDA
  /// All runs with the fused kernel (flat_step_cuda.cpp): one launch per kFusedMaxRuns runs.
  void step_fused();
  /// The kernel arguments of the fused launch over runs [first, first + kFusedMaxRuns), as the
  /// options and step counts are now.
  void fill_launch(std::size_t first, kernels::FusedStepArgs& args) const;
  /// Writes the scalars of the next step into live_runs (see FlatOptimizer::stage_step).
  void stage_fused();
#endif
};

namespace detail {

inline std::string shape_of(const torch::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace detail
}  // namespace mpu
