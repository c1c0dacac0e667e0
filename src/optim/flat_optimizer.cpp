// FlatOptimizer: construction, the layout checks, and the accessors. The state import and
// export are in flat_state.cpp, the step in flat_step.cpp.
#include <typeinfo>

#include "misc/demangle.h"
#include "optim/flat_optimizer_impl.h"

namespace mpu {
namespace {

bool floating(torch::ScalarType t) {
  return t == torch::kFloat || t == torch::kHalf || t == torch::kBFloat16 || t == torch::kDouble;
}

}  // namespace

bool flat_step_supported(const torch::optim::Optimizer& optimizer, std::string* why) {
  const detail::OptimizerTraits* traits = detail::exact_traits(optimizer);
  if (traits == nullptr || traits->refused != nullptr) {
    if (why) {
      *why = detail::cat("the flat step implements torch::optim::SGD, Adam, AdamW, Adagrad and ",
                         "RMSprop (exactly those classes, not subclasses); got ",
                         detail::demangle(typeid(optimizer)));
    }
    return false;
  }
  const auto& groups = optimizer.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    if (!groups[g].has_options() || !traits->options_match(groups[g].options())) {
      if (why) {
        *why = detail::cat("param group ", g, " of a ", traits->name, " optimizer has ",
                           groups[g].has_options() ? detail::demangle(typeid(groups[g].options()))
                                                   : std::string("no options"),
                           ", not ", traits->name, "Options");
      }
      return false;
    }
  }
  if (why) why->clear();
  return true;
}

FlatOptimizer::FlatOptimizer(torch::optim::Optimizer& optimizer, torch::Tensor flat_param,
                             torch::Tensor flat_grad, std::int64_t begin, std::int64_t end)
    : FlatOptimizer(optimizer, std::move(flat_param), std::move(flat_grad), begin, end,
                    FlatOptimizerOptions{}) {}

FlatOptimizer::FlatOptimizer(torch::optim::Optimizer& optimizer, torch::Tensor flat_param,
                             torch::Tensor flat_grad, std::int64_t begin, std::int64_t end,
                             FlatOptimizerOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  std::string why;
  MPU_CHECK(flat_step_supported(optimizer, &why), "FlatOptimizer: unsupported optimizer: ", why);
  m.traits = detail::exact_traits(optimizer);
  m.opt = &optimizer;

  MPU_CHECK(flat_param.defined() && flat_grad.defined(),
            "FlatOptimizer: flat_param and flat_grad must be defined tensors");
  MPU_CHECK(flat_param.dim() == 1 && flat_param.is_contiguous() && flat_grad.dim() == 1 &&
                flat_grad.is_contiguous(),
            "FlatOptimizer: flat_param and flat_grad must be 1-D and contiguous, got shapes ",
            detail::shape_of(flat_param), " and ", detail::shape_of(flat_grad));
  const torch::Tensor& model_param = options.model_param;
  const bool master = model_param.defined();
  if (master) {
    MPU_CHECK(model_param.dim() == 1 && model_param.is_contiguous() &&
                  (model_param.scalar_type() == torch::kBFloat16 ||
                   model_param.scalar_type() == torch::kHalf) &&
                  model_param.numel() == flat_param.numel() &&
                  model_param.device() == flat_param.device(),
              "FlatOptimizer: options.model_param must be a 1-D contiguous BFloat16 or Half "
              "tensor with flat_param's numel and device (",
              flat_param.numel(), " on ", flat_param.device(), "), got shape ",
              detail::shape_of(model_param), " ", model_param.scalar_type(), " on ",
              model_param.device(), model_param.is_contiguous() ? "" : ", not contiguous");
    MPU_CHECK(flat_param.scalar_type() == torch::kFloat,
              "FlatOptimizer: with options.model_param, flat_param is the master copy and must "
              "be Float, got ",
              flat_param.scalar_type());
    MPU_CHECK(flat_grad.numel() == flat_param.numel() &&
                  flat_grad.device() == flat_param.device() &&
                  (flat_grad.scalar_type() == torch::kFloat ||
                   flat_grad.scalar_type() == torch::kBFloat16 ||
                   flat_grad.scalar_type() == torch::kHalf),
              "FlatOptimizer: with options.model_param, flat_grad must be Float, BFloat16 or "
              "Half with flat_param's numel and device (",
              flat_param.numel(), " on ", flat_param.device(), "), got ", flat_grad.numel(), " ",
              flat_grad.scalar_type(), " on ", flat_grad.device());
  } else {
    MPU_CHECK(flat_param.numel() == flat_grad.numel() &&
                  flat_param.scalar_type() == flat_grad.scalar_type() &&
                  flat_param.device() == flat_grad.device(),
              "FlatOptimizer: flat_param and flat_grad must have the same numel, dtype and "
              "device, got ",
              flat_param.numel(), " ", flat_param.scalar_type(), " on ", flat_param.device(),
              " and ", flat_grad.numel(), " ", flat_grad.scalar_type(), " on ", flat_grad.device());
    MPU_CHECK(floating(flat_param.scalar_type()),
              "FlatOptimizer: flat_param must be Float, Half, BFloat16 or Double, got ",
              flat_param.scalar_type());
  }
  const std::int64_t numel = flat_param.numel();
  if (end < 0) end = numel;
  MPU_CHECK(0 <= begin && begin <= end && end <= numel, "FlatOptimizer: the range [", begin, ", ",
            end, ") is not inside the flat buffers' [0, ", numel, ")");
  m.flat_param = flat_param.detach();
  m.flat_grad = flat_grad.detach();
  if (master) m.model_param = model_param.detach();
  m.use_fused = MPU_HAS_CUDA && options.fused && flat_param.is_cuda() &&
                flat_param.scalar_type() == torch::kFloat;
  const torch::Tensor& base = m.param_base();
  const char* const base_name = master ? "model_param" : "flat_param";
  m.begin = begin;
  m.end = end;
  m.full = begin == 0 && end == numel;

  // Where every parameter lives.
  const auto item = static_cast<std::int64_t>(base.element_size());
  const auto gitem = static_cast<std::int64_t>(flat_grad.element_size());
  const auto pbase = reinterpret_cast<std::uintptr_t>(base.data_ptr());
  const auto gbase = reinterpret_cast<std::uintptr_t>(flat_grad.data_ptr());
  const auto& groups = optimizer.param_groups();
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const auto& ps = groups[g].params();
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const torch::Tensor& p = ps[i];
      if (p.numel() == 0) continue;
      const auto where = [&] {
        return detail::cat("FlatOptimizer: group ", g, " parameter ", i, " (shape ",
                           detail::shape_of(p), ")");
      };
      MPU_CHECK(p.device() == base.device() && p.scalar_type() == base.scalar_type(), where(),
                " is ", p.scalar_type(), " on ", p.device(), ", ", base_name, " is ",
                base.scalar_type(), " on ", base.device());
      MPU_CHECK(p.is_contiguous(), where(), " is not contiguous (strides ", p.strides(), ")");
      const auto addr = reinterpret_cast<std::uintptr_t>(p.data_ptr());
      const auto bytes = static_cast<std::uintptr_t>(numel * item);
      MPU_CHECK(addr >= pbase && addr < pbase + bytes &&
                    (addr - pbase) % static_cast<std::uintptr_t>(item) == 0,
                where(), " is not a view into ", base_name, ": its data is at ",
                reinterpret_cast<void*>(addr), ", ", base_name, " spans [",
                reinterpret_cast<void*>(pbase), ", ", reinterpret_cast<void*>(pbase + bytes), ")");
      const auto offset = static_cast<std::int64_t>((addr - pbase) / item);
      MPU_CHECK(offset + p.numel() <= numel, where(), " at element ", offset, " with ", p.numel(),
                " elements runs past the end of ", base_name, " (", numel, " elements)");
      const torch::Tensor& grad = p.grad();
      MPU_CHECK(grad.defined(), where(), " has no gradient; it must be the view of flat_grad at ",
                "element ", offset);
      MPU_CHECK(reinterpret_cast<std::uintptr_t>(grad.data_ptr()) ==
                        gbase + static_cast<std::uintptr_t>(offset * gitem) &&
                    grad.is_contiguous() && grad.numel() == p.numel(),
                where(), "'s gradient is not the view of flat_grad at element ", offset,
                ": its data is at ", grad.data_ptr(), " (expected ",
                reinterpret_cast<void*>(gbase + static_cast<std::uintptr_t>(offset * gitem)),
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
  for (std::size_t f = 0; f < m.traits->fields.size(); ++f) {
    bool used = false;
    for (const auto& g : groups) used = used || m.traits->needs(g.options(), f);
    if (!used) {
      // A loaded state may hold a buffer no group needs now (e.g. amsgrad turned off).
      for (const auto& p : m.params) {
        const auto it = optimizer.state().find(p.key);
        if (it != optimizer.state().end() && it->second &&
            m.traits->fields[f].get(*it->second).defined()) {
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

std::int64_t FlatOptimizer::begin() const {
  return impl_->begin;
}
std::int64_t FlatOptimizer::end() const {
  return impl_->end;
}
std::size_t FlatOptimizer::num_runs() const {
  return impl_->runs.size();
}
bool FlatOptimizer::fused() const {
  return impl_->use_fused;
}
bool FlatOptimizer::has_master() const {
  return impl_->model_param.defined();
}

}  // namespace mpu
