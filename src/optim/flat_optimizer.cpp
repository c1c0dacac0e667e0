#include "mpu/flat_optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "mpu/error.h"
#include "misc/torch_compat.h"

namespace mpu {
namespace {

namespace optim = torch::optim;

enum class Kind { kSGD, kAdam, kAdamW, kAdagrad, kRMSprop };

/// The per-element state buffers, across all kinds. A kind uses a subset, in this order.
enum class Field { kMomentumBuffer, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kSum, kSquareAvg, kGradAvg };
constexpr int kNumFields = 7;

const char* field_name(Field f) {
  switch (f) {
    case Field::kMomentumBuffer:
      return "momentum_buffer";
    case Field::kExpAvg:
      return "exp_avg";
    case Field::kExpAvgSq:
      return "exp_avg_sq";
    case Field::kMaxExpAvgSq:
      return "max_exp_avg_sq";
    case Field::kSum:
      return "sum";
    case Field::kSquareAvg:
      return "square_avg";
    case Field::kGradAvg:
      return "grad_avg";
  }
  return "?";
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kSGD:
      return "SGD";
    case Kind::kAdam:
      return "Adam";
    case Kind::kAdamW:
      return "AdamW";
    case Kind::kAdagrad:
      return "Adagrad";
    case Kind::kRMSprop:
      return "RMSprop";
  }
  return "?";
}

/// The exact type of `optimizer`, or false. A subclass is not accepted: its step may differ.
bool kind_of(const optim::Optimizer& optimizer, Kind* kind) {
  const std::type_info& t = typeid(optimizer);
  if (t == typeid(optim::SGD)) {
    *kind = Kind::kSGD;
  } else if (t == typeid(optim::Adam)) {
    *kind = Kind::kAdam;
  } else if (t == typeid(optim::AdamW)) {
    *kind = Kind::kAdamW;
  } else if (t == typeid(optim::Adagrad)) {
    *kind = Kind::kAdagrad;
  } else if (t == typeid(optim::RMSprop)) {
    *kind = Kind::kRMSprop;
  } else {
    return false;
  }
  return true;
}

template <typename Options>
bool options_are(const optim::OptimizerParamGroup& g) {
  return g.has_options() && dynamic_cast<const Options*>(&g.options()) != nullptr;
}

bool group_options_match(Kind kind, const optim::OptimizerParamGroup& g) {
  switch (kind) {
    case Kind::kSGD:
      return options_are<optim::SGDOptions>(g);
    case Kind::kAdam:
      return options_are<optim::AdamOptions>(g);
    case Kind::kAdamW:
      return options_are<optim::AdamWOptions>(g);
    case Kind::kAdagrad:
      return options_are<optim::AdagradOptions>(g);
    case Kind::kRMSprop:
      return options_are<optim::RMSpropOptions>(g);
  }
  return false;
}

/// Whether a group with these (current) options needs buffer `f` for its parameters.
bool group_needs(Kind kind, const optim::OptimizerOptions& o, Field f) {
  switch (kind) {
    case Kind::kSGD:
      return f == Field::kMomentumBuffer &&
             static_cast<const optim::SGDOptions&>(o).momentum() != 0;
    case Kind::kAdam:
      return f == Field::kExpAvg || f == Field::kExpAvgSq ||
             (f == Field::kMaxExpAvgSq && static_cast<const optim::AdamOptions&>(o).amsgrad());
    case Kind::kAdamW:
      return f == Field::kExpAvg || f == Field::kExpAvgSq ||
             (f == Field::kMaxExpAvgSq && static_cast<const optim::AdamWOptions&>(o).amsgrad());
    case Kind::kAdagrad:
      return f == Field::kSum;
    case Kind::kRMSprop: {
      const auto& r = static_cast<const optim::RMSpropOptions&>(o);
      return f == Field::kSquareAvg || (f == Field::kMomentumBuffer && r.momentum() > 0) ||
             (f == Field::kGradAvg && r.centered());
    }
  }
  return false;
}

/// The fields a kind can use, in state_names() order.
std::vector<Field> fields_of(Kind kind) {
  switch (kind) {
    case Kind::kSGD:
      return {Field::kMomentumBuffer};
    case Kind::kAdam:
    case Kind::kAdamW:
      return {Field::kExpAvg, Field::kExpAvgSq, Field::kMaxExpAvgSq};
    case Kind::kAdagrad:
      return {Field::kSum};
    case Kind::kRMSprop:
      return {Field::kSquareAvg, Field::kMomentumBuffer, Field::kGradAvg};
  }
  return {};
}

/// A parameter state's tensor `f`, by reference (TORCH_ARG's non-const getter).
torch::Tensor& field_of(Kind kind, optim::OptimizerParamState& s, Field f) {
  switch (kind) {
    case Kind::kSGD:
      return static_cast<optim::SGDParamState&>(s).momentum_buffer();
    case Kind::kAdam: {
      auto& a = static_cast<optim::AdamParamState&>(s);
      return f == Field::kExpAvg     ? a.exp_avg()
             : f == Field::kExpAvgSq ? a.exp_avg_sq()
                                     : a.max_exp_avg_sq();
    }
    case Kind::kAdamW: {
      auto& a = static_cast<optim::AdamWParamState&>(s);
      return f == Field::kExpAvg     ? a.exp_avg()
             : f == Field::kExpAvgSq ? a.exp_avg_sq()
                                     : a.max_exp_avg_sq();
    }
    case Kind::kAdagrad:
      return static_cast<optim::AdagradParamState&>(s).sum();
    case Kind::kRMSprop: {
      auto& r = static_cast<optim::RMSpropParamState&>(s);
      return f == Field::kSquareAvg ? r.square_avg()
             : f == Field::kGradAvg ? r.grad_avg()
                                    : r.momentum_buffer();
    }
  }
  MPU_THROW(Error, "FlatOptimizer: unknown optimizer kind");
}

std::int64_t step_of(Kind kind, optim::OptimizerParamState& s) {
  switch (kind) {
    case Kind::kSGD:
      return 0;
    case Kind::kAdam:
      return static_cast<optim::AdamParamState&>(s).step();
    case Kind::kAdamW:
      return static_cast<optim::AdamWParamState&>(s).step();
    case Kind::kAdagrad:
      return static_cast<optim::AdagradParamState&>(s).step();
    case Kind::kRMSprop:
      return static_cast<optim::RMSpropParamState&>(s).step();
  }
  return 0;
}

void set_step(Kind kind, optim::OptimizerParamState& s, std::int64_t step) {
  const auto v = static_cast<detail::OptimizerStepCount>(step);
  switch (kind) {
    case Kind::kSGD:
      return;
    case Kind::kAdam:
      static_cast<optim::AdamParamState&>(s).step(v);
      return;
    case Kind::kAdamW:
      static_cast<optim::AdamWParamState&>(s).step(v);
      return;
    case Kind::kAdagrad:
      static_cast<optim::AdagradParamState&>(s).step(v);
      return;
    case Kind::kRMSprop:
      static_cast<optim::RMSpropParamState&>(s).step(v);
      return;
  }
}

std::unique_ptr<optim::OptimizerParamState> make_state(Kind kind) {
  switch (kind) {
    case Kind::kSGD:
      return std::make_unique<optim::SGDParamState>();
    case Kind::kAdam:
      return std::make_unique<optim::AdamParamState>();
    case Kind::kAdamW:
      return std::make_unique<optim::AdamWParamState>();
    case Kind::kAdagrad:
      return std::make_unique<optim::AdagradParamState>();
    case Kind::kRMSprop:
      return std::make_unique<optim::RMSpropParamState>();
  }
  return nullptr;
}

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool floating(torch::ScalarType t) {
  return t == torch::kFloat || t == torch::kHalf || t == torch::kBFloat16 || t == torch::kDouble;
}

}  // namespace

bool flat_step_supported(const torch::optim::Optimizer& optimizer, std::string* why) {
  Kind kind{};
  if (!kind_of(optimizer, &kind)) {
    if (why) {
      *why = detail::cat("the flat step implements torch::optim::SGD, Adam, AdamW, Adagrad and ",
                         "RMSprop (exactly those classes, not subclasses); got ",
                         c10::demangle(typeid(optimizer).name()));
    }
    return false;
  }
  const auto& groups = optimizer.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    if (!group_options_match(kind, groups[g])) {
      if (why) {
        *why =
            detail::cat("param group ", g, " of a ", kind_name(kind), " optimizer has ",
                        groups[g].has_options() ? c10::demangle(typeid(groups[g].options()).name())
                                                : std::string("no options"),
                        ", not ", kind_name(kind), "Options");
      }
      return false;
    }
  }
  if (why) why->clear();
  return true;
}

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
  Kind kind{};
  torch::Tensor flat_param;
  torch::Tensor flat_grad;
  std::int64_t begin = 0;
  std::int64_t end = 0;
  bool full = false;
  std::vector<Field> fields;                       // state_names() order
  std::vector<torch::Tensor> state;                // one per field, end - begin elements
  std::vector<Param> params;                       // sorted by offset
  std::vector<std::vector<std::size_t>> by_group;  // [group][index] -> index into params
  std::vector<Run> runs;
  std::vector<torch::Tensor> scratch_buffers;  // CPU only, see scratch()

  int field_index(Field f) const {
    for (std::size_t i = 0; i < fields.size(); ++i) {
      if (fields[i] == f) return static_cast<int>(i);
    }
    return -1;
  }

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
    const std::int64_t item = static_cast<std::int64_t>(flat_param.element_size());
    char* const pbase = static_cast<char*>(flat_param.data_ptr());
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
        MPU_CHECK(ps[i].data_ptr() == pbase + p.offset * item, "FlatOptimizer::step: group ", g,
                  " parameter ", i, " is no longer a view of flat_param at element ", p.offset,
                  " (its storage was replaced, e.g. by set_data or Module::to)");
        const torch::Tensor& grad = ps[i].grad();
        MPU_CHECK(grad.defined() && grad.data_ptr() == gbase + p.offset * item,
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
      const bool expect = kind == Kind::kSGD ? p.has_buffer : true;
      if ((it != st.end() && it->second != nullptr) != expect) return false;
      if (!expect) continue;
      if (kind != Kind::kSGD && step_of(kind, *it->second) != p.step) return false;
      for (std::size_t k = 0; k < fields.size(); ++k) {
        if (!(p.present & (1u << k))) continue;
        const torch::Tensor& t = field_of(kind, *it->second, fields[k]);
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
      if (kind == Kind::kSGD && !p.has_buffer) continue;
      auto& slot = st[p.key];
      if (!slot) slot = make_state(kind);
      set_step(kind, *slot, p.step);
      for (std::size_t k = 0; k < fields.size(); ++k) {
        if (!(p.present & (1u << k))) continue;
        torch::Tensor& t = field_of(kind, *slot, fields[k]);
        if (!t.defined() || t.data_ptr() != expected_state_ptr(k, p)) t = state_view(k, p);
      }
    }
  }

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

  /// Scratch tensor i for run r (an lvalue, for the out= variants).
  torch::Tensor scratch(std::size_t i, const Run& r) {
    const std::int64_t len = r.end - r.begin;
    if (flat_param.is_cuda()) return torch::empty({len}, flat_param.options());
    if (scratch_buffers.size() <= i) scratch_buffers.resize(i + 1);
    if (!scratch_buffers[i].defined()) {
      scratch_buffers[i] = torch::empty({end - begin}, flat_param.options());
    }
    return scratch_buffers[i].narrow(0, r.begin - begin, len);
  }

  void step_sgd(const Run& r, const optim::SGDOptions& o, bool has_buffer) {
    torch::Tensor tmp0;  // scratch(0, r) once needed
    torch::Tensor p = slice(flat_param, r.begin, r.end);
    torch::Tensor d_p = slice(flat_grad, r.begin, r.end);
    bool d_p_is_scratch = false;
    const auto weight_decay = o.weight_decay();
    const auto momentum = o.momentum();
    const auto dampening = o.dampening();
    const auto nesterov = o.nesterov();
    if (weight_decay != 0) {
      // d_p = d_p.add(p, weight_decay)
      d_p = torch::add_out(tmp0 = scratch(0, r), d_p, p, weight_decay);
      d_p_is_scratch = true;
    }
    if (momentum != 0) {
      torch::Tensor buf = state_slice(static_cast<std::size_t>(field_index(Field::kMomentumBuffer)),
                                      r.begin, r.end);
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
  void step_adam(const Run& r, const Options& o, std::int64_t step, bool decoupled) {
    torch::Tensor tmp0;  // scratch(0, r) and scratch(1, r) once needed
    torch::Tensor tmp1;
    // Adam (decoupled = false) and AdamW (true).
    torch::Tensor p = slice(flat_param, r.begin, r.end);
    torch::Tensor grad = slice(flat_grad, r.begin, r.end);
    if (decoupled && o.weight_decay() != 0) p.mul_(1 - o.lr() * o.weight_decay());
    torch::Tensor exp_avg = state_slice(0, r.begin, r.end);
    torch::Tensor exp_avg_sq = state_slice(1, r.begin, r.end);
    const auto beta1 = std::get<0>(o.betas());
    const auto beta2 = std::get<1>(o.betas());
    const auto bias_correction1 = 1 - std::pow(beta1, step);
    const auto bias_correction2 = 1 - std::pow(beta2, step);
    if (!decoupled && o.weight_decay() != 0) {
      grad = torch::add_out(tmp0 = scratch(0, r), grad, p, o.weight_decay());
    }
    exp_avg.mul_(beta1).add_(grad, 1 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    // denom = (v.sqrt() / sqrt(bias_correction2)).add_(eps), v = max_exp_avg_sq with amsgrad
    torch::Tensor v = exp_avg_sq;
    if (o.amsgrad()) {
      torch::Tensor max_exp_avg_sq =
          state_slice(static_cast<std::size_t>(field_index(Field::kMaxExpAvgSq)), r.begin, r.end);
      torch::max_out(max_exp_avg_sq, exp_avg_sq, max_exp_avg_sq);
      v = max_exp_avg_sq;
    }
    torch::Tensor denom = torch::sqrt_out(tmp1 = scratch(1, r), v);
    denom.div_(std::sqrt(bias_correction2)).add_(o.eps());
    const auto step_size = o.lr() / bias_correction1;
    p.addcdiv_(exp_avg, denom, -step_size);
  }

  void step_adagrad(const Run& r, const optim::AdagradOptions& o, std::int64_t step) {
    torch::Tensor tmp0;  // scratch(0, r) and scratch(1, r) once needed
    torch::Tensor tmp1;
    torch::Tensor p = slice(flat_param, r.begin, r.end);
    torch::Tensor grad = slice(flat_grad, r.begin, r.end);
    torch::Tensor sum = state_slice(0, r.begin, r.end);
    if (o.weight_decay() != 0)
      grad = torch::add_out(tmp0 = scratch(0, r), grad, p, o.weight_decay());
    const auto clr = o.lr() / (1 + static_cast<double>(step - 1) * o.lr_decay());
    sum.addcmul_(grad, grad, 1.0);
    // std = sum.sqrt().add_(eps)
    torch::Tensor std_dev = torch::sqrt_out(tmp1 = scratch(1, r), sum);
    std_dev.add_(o.eps());
    p.addcdiv_(grad, std_dev, -clr);
  }

  void step_rmsprop(const Run& r, const optim::RMSpropOptions& o) {
    torch::Tensor tmp0;  // scratch(0, r) and scratch(1, r) once needed
    torch::Tensor tmp1;
    torch::Tensor p = slice(flat_param, r.begin, r.end);
    torch::Tensor grad = slice(flat_grad, r.begin, r.end);
    torch::Tensor square_avg = state_slice(0, r.begin, r.end);
    const auto alpha = o.alpha();
    if (o.weight_decay() != 0)
      grad = torch::add_out(tmp0 = scratch(0, r), grad, p, o.weight_decay());
    square_avg.mul_(alpha).addcmul_(grad, grad, 1 - alpha);
    torch::Tensor avg;
    if (o.centered()) {
      torch::Tensor grad_avg =
          state_slice(static_cast<std::size_t>(field_index(Field::kGradAvg)), r.begin, r.end);
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
      torch::Tensor buf = state_slice(static_cast<std::size_t>(field_index(Field::kMomentumBuffer)),
                                      r.begin, r.end);
      buf.mul_(o.momentum()).addcdiv_(grad, avg);
      p.add_(buf, -o.lr());
    } else {
      p.addcdiv_(grad, avg, -o.lr());
    }
  }
};

FlatOptimizer::FlatOptimizer(torch::optim::Optimizer& optimizer, torch::Tensor flat_param,
                             torch::Tensor flat_grad, std::int64_t begin, std::int64_t end)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  std::string why;
  MPU_CHECK(flat_step_supported(optimizer, &why), "FlatOptimizer: unsupported optimizer: ", why);
  kind_of(optimizer, &m.kind);
  m.opt = &optimizer;

  MPU_CHECK(flat_param.defined() && flat_grad.defined(),
            "FlatOptimizer: flat_param and flat_grad must be defined tensors");
  MPU_CHECK(flat_param.dim() == 1 && flat_param.is_contiguous() && flat_grad.dim() == 1 &&
                flat_grad.is_contiguous(),
            "FlatOptimizer: flat_param and flat_grad must be 1-D and contiguous, got shapes ",
            shape_of(flat_param), " and ", shape_of(flat_grad));
  MPU_CHECK(flat_param.numel() == flat_grad.numel() &&
                flat_param.scalar_type() == flat_grad.scalar_type() &&
                flat_param.device() == flat_grad.device(),
            "FlatOptimizer: flat_param and flat_grad must have the same numel, dtype and device, "
            "got ",
            flat_param.numel(), " ", flat_param.scalar_type(), " on ", flat_param.device(), " and ",
            flat_grad.numel(), " ", flat_grad.scalar_type(), " on ", flat_grad.device());
  MPU_CHECK(floating(flat_param.scalar_type()),
            "FlatOptimizer: flat_param must be Float, Half, BFloat16 or Double, got ",
            flat_param.scalar_type());
  const std::int64_t numel = flat_param.numel();
  if (end < 0) end = numel;
  MPU_CHECK(0 <= begin && begin <= end && end <= numel, "FlatOptimizer: the range [", begin, ", ",
            end, ") is not inside the flat buffers' [0, ", numel, ")");
  m.flat_param = flat_param.detach();
  m.flat_grad = flat_grad.detach();
  m.begin = begin;
  m.end = end;
  m.full = begin == 0 && end == numel;

  // Where every parameter lives.
  const auto item = static_cast<std::int64_t>(flat_param.element_size());
  const auto pbase = reinterpret_cast<std::uintptr_t>(flat_param.data_ptr());
  const auto gbase = reinterpret_cast<std::uintptr_t>(flat_grad.data_ptr());
  const auto& groups = optimizer.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const auto& ps = groups[g].params();
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const torch::Tensor& p = ps[i];
      if (p.numel() == 0) continue;
      const auto where = [&] {
        return detail::cat("FlatOptimizer: group ", g, " parameter ", i, " (shape ", shape_of(p),
                           ")");
      };
      MPU_CHECK(p.device() == flat_param.device() && p.scalar_type() == flat_param.scalar_type(),
                where(), " is ", p.scalar_type(), " on ", p.device(), ", flat_param is ",
                flat_param.scalar_type(), " on ", flat_param.device());
      MPU_CHECK(p.is_contiguous(), where(), " is not contiguous (strides ", p.strides(), ")");
      const auto addr = reinterpret_cast<std::uintptr_t>(p.data_ptr());
      const auto bytes = static_cast<std::uintptr_t>(numel * item);
      MPU_CHECK(addr >= pbase && addr < pbase + bytes &&
                    (addr - pbase) % static_cast<std::uintptr_t>(item) == 0,
                where(), " is not a view into flat_param: its data is at ",
                reinterpret_cast<void*>(addr), ", flat_param spans [",
                reinterpret_cast<void*>(pbase), ", ", reinterpret_cast<void*>(pbase + bytes), ")");
      const auto offset = static_cast<std::int64_t>((addr - pbase) / item);
      MPU_CHECK(offset + p.numel() <= numel, where(), " at element ", offset, " with ", p.numel(),
                " elements runs past the end of flat_param (", numel, " elements)");
      const torch::Tensor& grad = p.grad();
      MPU_CHECK(grad.defined(), where(), " has no gradient; it must be the view of flat_grad at ",
                "element ", offset);
      MPU_CHECK(reinterpret_cast<std::uintptr_t>(grad.data_ptr()) ==
                        gbase + static_cast<std::uintptr_t>(offset * item) &&
                    grad.is_contiguous() && grad.numel() == p.numel(),
                where(), "'s gradient is not the view of flat_grad at element ", offset,
                ": its data is at ", grad.data_ptr(), " (expected ",
                reinterpret_cast<void*>(gbase + static_cast<std::uintptr_t>(offset * item)),
                "), contiguous ", grad.is_contiguous(), ", ", grad.numel(), " elements");
      Impl::Param q;
      q.group = g;
      q.index = i;
      q.tensor = p;
      q.offset = offset;
      q.numel = p.numel();
      q.key = detail::optimizer_state_key(p);
      m.params.push_back(std::move(q));
    }
  }
  std::stable_sort(m.params.begin(), m.params.end(),
                   [](const Impl::Param& a, const Impl::Param& b) { return a.offset < b.offset; });
  for (std::size_t i = 1; i < m.params.size(); ++i) {
    const auto& a = m.params[i - 1];
    const auto& b = m.params[i];
    MPU_CHECK(a.offset + a.numel <= b.offset, "FlatOptimizer: group ", b.group, " parameter ",
              b.index, " (elements [", b.offset, ", ", b.offset + b.numel, ")) overlaps group ",
              a.group, " parameter ", a.index, " (elements [", a.offset, ", ", a.offset + a.numel,
              ")); each element may belong to one parameter only");
  }
  m.by_group.assign(groups.size(), {});
  // Indices in group order: params are sorted by offset, so collect, then order by index.
  for (std::size_t k = 0; k < m.params.size(); ++k) m.by_group[m.params[k].group].push_back(k);
  for (auto& v : m.by_group) {
    std::sort(v.begin(), v.end(),
              [&](std::size_t a, std::size_t b) { return m.params[a].index < m.params[b].index; });
  }

  // The state buffers: those some group needs now (or the plain optimizer's state already has).
  for (const Field f : fields_of(m.kind)) {
    bool used = false;
    for (const auto& g : groups) used = used || group_needs(m.kind, g.options(), f);
    if (!used) {
      // A loaded state may hold a buffer no group needs now (e.g. amsgrad turned off).
      for (const auto& p : m.params) {
        const auto it = optimizer.state().find(p.key);
        if (it != optimizer.state().end() && it->second &&
            field_of(m.kind, *it->second, f).defined()) {
          used = true;
          break;
        }
      }
    }
    if (used) m.fields.push_back(f);
  }
  MPU_CHECK(m.fields.size() <= 32, "FlatOptimizer: too many state buffers");
  const auto sopts =
      torch::TensorOptions().dtype(flat_param.scalar_type()).device(flat_param.device());
  for (std::size_t k = 0; k < m.fields.size(); ++k) {
    m.state.push_back(torch::zeros({end - begin}, sopts));
  }
  import_state();
}

FlatOptimizer::~FlatOptimizer() = default;
FlatOptimizer::FlatOptimizer(FlatOptimizer&&) noexcept = default;
FlatOptimizer& FlatOptimizer::operator=(FlatOptimizer&&) noexcept = default;

void FlatOptimizer::import_state() {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;
  auto& st = m.opt->state();
  const auto& groups = m.opt->param_groups();
  for (auto& p : m.params) {
    const auto it = st.find(p.key);
    optim::OptimizerParamState* s = it != st.end() ? it->second.get() : nullptr;
    const auto& options = groups[p.group].options();
    p.step = s != nullptr ? step_of(m.kind, *s) : 0;
    p.has_buffer = false;
    p.present = 0;
    const auto [lo, hi] = m.clip(p);
    for (std::size_t k = 0; k < m.fields.size(); ++k) {
      const Field f = m.fields[k];
      torch::Tensor src;
      if (s != nullptr) src = field_of(m.kind, *s, f);
      if (src.defined()) {
        MPU_CHECK(src.numel() == p.numel, "FlatOptimizer::import_state: the ", kind_name(m.kind),
                  " state '", field_name(f), "' of group ", p.group, " parameter ", p.index,
                  " has ", src.numel(), " elements, the parameter ", p.numel);
      }
      const bool present =
          src.defined() || (m.kind != Kind::kSGD && group_needs(m.kind, options, f));
      if (present) p.present |= 1u << k;
      if (m.kind == Kind::kSGD && src.defined()) p.has_buffer = true;
      if (lo == hi) continue;
      torch::Tensor dst = m.state_slice(k, lo, hi);
      if (src.defined()) {
        torch::Tensor from = src.reshape({-1}).narrow(0, lo - p.offset, hi - lo);
        if (from.data_ptr() != dst.data_ptr() || from.device() != dst.device()) dst.copy_(from);
      } else if (f == Field::kSum) {
        dst.fill_(static_cast<const optim::AdagradOptions&>(options).initial_accumulator_value());
      } else {
        dst.zero_();
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

void FlatOptimizer::step() {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;
  m.check_views();
  const auto& groups = m.opt->param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (const Field f : fields_of(m.kind)) {
      MPU_CHECK(!group_needs(m.kind, groups[g].options(), f) || m.field_index(f) >= 0,
                "FlatOptimizer::step: ", kind_name(m.kind), " group ", g, " now needs the '",
                field_name(f), "' buffer (momentum, amsgrad or centered turned on), which no ",
                "group needed at construction, so none was allocated; build a new FlatOptimizer");
    }
  }
  if (m.full && !m.state_in_sync()) import_state();
  for (const auto& r : m.runs) {
    const auto& options = groups[r.group].options();
    const Impl::Param& first = m.params[r.first_param];
    switch (m.kind) {
      case Kind::kSGD:
        m.step_sgd(r, static_cast<const optim::SGDOptions&>(options), first.has_buffer);
        break;
      case Kind::kAdam:
        m.step_adam(r, static_cast<const optim::AdamOptions&>(options), first.step + 1, false);
        break;
      case Kind::kAdamW:
        m.step_adam(r, static_cast<const optim::AdamWOptions&>(options), first.step + 1, true);
        break;
      case Kind::kAdagrad:
        m.step_adagrad(r, static_cast<const optim::AdagradOptions&>(options), first.step + 1);
        break;
      case Kind::kRMSprop:
        m.step_rmsprop(r, static_cast<const optim::RMSpropOptions&>(options));
        break;
    }
  }
  // Every parameter has a gradient, so every parameter of the optimizer stepped (those outside
  // [begin, end) on other ranks): advance all counts, as the plain step would.
  bool new_buffers = false;
  const int mb = m.field_index(Field::kMomentumBuffer);
  for (auto& p : m.params) {
    ++p.step;
    if (m.kind == Kind::kSGD && !p.has_buffer &&
        static_cast<const optim::SGDOptions&>(groups[p.group].options()).momentum() != 0) {
      p.has_buffer = true;
      p.present |= 1u << mb;
      new_buffers = true;
    }
    if (m.kind == Kind::kAdam || m.kind == Kind::kAdamW || m.kind == Kind::kRMSprop) {
      // A buffer an option turned on since the import (amsgrad, centered, momentum) is now in
      // use for this parameter.
      for (std::size_t k = 0; k < m.fields.size(); ++k) {
        if (group_needs(m.kind, groups[p.group].options(), m.fields[k])) p.present |= 1u << k;
      }
    }
  }
  if (new_buffers) m.build_runs();
  if (m.full) m.write_back();
}

std::vector<std::string> FlatOptimizer::state_names() const {
  std::vector<std::string> names;
  for (const Field f : impl_->fields) names.emplace_back(field_name(f));
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
              "FlatOptimizer::export_state: state '", field_name(m.fields[k]),
              "' must be a 1-D tensor of ", numel, " elements, got ",
              full[k].defined() ? shape_of(full[k]) : std::string("an undefined tensor"));
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
    if (m.kind == Kind::kSGD && !p.has_buffer) {
      st.erase(p.key);
      continue;
    }
    auto s = make_state(m.kind);
    set_step(m.kind, *s, p.step);
    for (std::size_t k = 0; k < m.fields.size(); ++k) {
      if (!(p.present & (1u << k))) continue;
      field_of(m.kind, *s, m.fields[k]) = full[k]
                                              .narrow(0, p.offset, p.numel)
                                              .view(p.tensor.sizes())
                                              .to(p.tensor.options(), /*non_blocking=*/false,
                                                  /*copy=*/true);
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

std::int64_t FlatOptimizer::begin() const {
  return impl_->begin;
}
std::int64_t FlatOptimizer::end() const {
  return impl_->end;
}
std::size_t FlatOptimizer::num_runs() const {
  return impl_->runs.size();
}

}  // namespace mpu
