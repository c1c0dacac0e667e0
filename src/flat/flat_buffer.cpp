#include "mpu/flat_buffer.h"

#include <cmath>
#include <unordered_set>

#include "flat/flat_buffer_detail.h"
#include "misc/log.h"
#include "mpu/error.h"

namespace mpu {
namespace {

using detail::FlatSlot;
using detail::FlatSlotMode;

bool is_wire_dtype(torch::Dtype dtype) {
  return dtype == torch::kFloat || dtype == torch::kHalf || dtype == torch::kBFloat16;
}

bool is_packable_dtype(torch::Dtype dtype) {
  return is_wire_dtype(dtype) || dtype == torch::kDouble;
}

const char* target_name(FlatTarget target) {
  return target == FlatTarget::kGrad ? "gradient" : "parameter";
}

// The slice of a flat buffer that holds entry `e`, shaped like it.
torch::Tensor slot_of(const torch::Tensor& flat, const FlatEntry& e) {
  return flat.narrow(0, e.offset, e.numel).view(e.shape);
}

// True when `t` is exactly entry e's slot of `flat`.
bool is_slot(const torch::Tensor& t, const torch::Tensor& flat, const FlatEntry& e) {
  return t.defined() && t.scalar_type() == flat.scalar_type() && t.device() == flat.device() &&
         t.sizes() == c10::IntArrayRef(e.shape) && t.is_contiguous() &&
         t.data_ptr() == static_cast<char*>(flat.data_ptr()) + e.offset * flat.element_size();
}

// dst = src * scale, computed in fp32 and rounded once to dst's dtype; a plain copy (bit-exact
// for equal dtypes) when scale is 1. The CUDA kernels compute exactly this.
void copy_scaled(const torch::Tensor& dst, const torch::Tensor& src, float scale) {
  if (scale == 1.0f) {
    dst.copy_(src);
  } else {
    dst.copy_(src.to(torch::kFloat) * static_cast<double>(scale));
  }
}

float checked_scale(double scale, const char* op) {
  const auto s = static_cast<float>(scale);
  MPU_CHECK(std::isfinite(s), "FlatBuffer::", op, ": scale is ", scale,
            ", which is not a finite fp32 number");
  return s;
}

}  // namespace

struct FlatBuffer::Impl {
  FlatBufferOptions options;
  std::vector<FlatEntry> entries;
  std::vector<torch::Tensor> tensors;
  torch::Device device{torch::kCPU};
  std::int64_t numel = 0;
  bool zero_copy = false;
  std::string zero_copy_reason;
  torch::Tensor flat_data;
  torch::Tensor flat_grad;
  bool warned = false;
  std::int64_t repairs = 0;
  detail::FlatCudaState cuda;

  void build(const std::vector<std::pair<std::string, torch::Tensor>>& named);
  void setup_zero_copy();

  const torch::Tensor& buffer(FlatTarget target) const {
    return target == FlatTarget::kGrad ? flat_grad : flat_data;
  }

  void check_flat(const torch::Tensor& flat, const char* op) const;
  void check_param(std::size_t i, const char* op) const;
  void check_grad(std::size_t i, const torch::Tensor& grad, const char* op) const;

  void gather_copy(FlatTarget target, const torch::Tensor& flat, float scale, const char* op);
  void scatter_copy(const torch::Tensor& flat, FlatTarget target, const char* op);
  void repair(FlatTarget target, bool copy_values, const char* op);
};

void FlatBuffer::Impl::build(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  MPU_CHECK(is_wire_dtype(options.dtype), "FlatBuffer: FlatBufferOptions::dtype is ", options.dtype,
            "; it must be Float, Half or BFloat16");
  std::unordered_set<const c10::TensorImpl*> seen;
  std::string first_name;
  for (const auto& [name, t] : named) {
    MPU_CHECK(t.defined(), "FlatBuffer: parameter '", name, "' is an undefined tensor");
    if (t.numel() == 0) continue;
    if (!seen.insert(t.unsafeGetTensorImpl()).second) continue;  // tied: keep the first name
    MPU_CHECK(t.layout() == torch::kStrided, "FlatBuffer: parameter '", name, "' has layout ",
              t.layout(), "; only strided (dense) tensors can be packed");
    MPU_CHECK(is_packable_dtype(t.scalar_type()), "FlatBuffer: parameter '", name, "' has dtype ",
              t.scalar_type(),
              "; only floating-point parameters (Float, Half, BFloat16, Double) can be packed");
    if (entries.empty()) {
      device = t.device();
      first_name = name;
    } else {
      MPU_CHECK(t.device() == device, "FlatBuffer: parameter '", name, "' is on ", t.device(),
                " but parameter '", first_name, "' is on ", device,
                "; all parameters must be on one device");
    }
    entries.push_back(FlatEntry{name, numel, t.numel(), t.sizes().vec(), t.scalar_type()});
    tensors.push_back(t);
    numel += t.numel();
  }

  if (options.zero_copy == ZeroCopy::kOff) {
    zero_copy_reason = "zero-copy was not requested (FlatBufferOptions::zero_copy is kOff)";
    return;
  }
  for (std::size_t i = 0; i < entries.size() && zero_copy_reason.empty(); ++i) {
    if (entries[i].dtype != options.dtype) {
      zero_copy_reason = detail::cat("parameter '", entries[i].name, "' has dtype ",
                                     entries[i].dtype, ", the buffer ", options.dtype);
    } else if (!tensors[i].is_contiguous()) {
      zero_copy_reason = detail::cat("parameter '", entries[i].name,
                                     "' is not contiguous (strides ", tensors[i].strides(), ")");
    }
  }
  MPU_CHECK(zero_copy_reason.empty() || options.zero_copy != ZeroCopy::kOn,
            "FlatBuffer: zero-copy mode (ZeroCopy::kOn) is impossible: ", zero_copy_reason);
  if (zero_copy_reason.empty()) setup_zero_copy();
}

void FlatBuffer::Impl::setup_zero_copy() {
  torch::NoGradGuard no_grad;
  const auto opts = torch::TensorOptions().dtype(options.dtype).device(device);
  flat_data = torch::empty({numel}, opts);
  flat_grad = torch::zeros({numel}, opts);
  for (std::size_t i = 0; i < entries.size(); ++i) {
    torch::Tensor& p = tensors[i];
    torch::Tensor data = slot_of(flat_data, entries[i]);
    data.copy_(p);
    p.set_data(data);
    torch::Tensor grad = slot_of(flat_grad, entries[i]);
    if (p.grad().defined()) grad.copy_(p.grad());
    p.mutable_grad() = grad;
  }
  zero_copy = true;
}

void FlatBuffer::Impl::check_flat(const torch::Tensor& flat, const char* op) const {
  MPU_CHECK(flat.defined(), "FlatBuffer::", op, ": `flat` is an undefined tensor");
  MPU_CHECK(flat.numel() == numel, "FlatBuffer::", op, ": `flat` has ", flat.numel(),
            " elements, but the layout has ", numel);
  MPU_CHECK(is_wire_dtype(flat.scalar_type()), "FlatBuffer::", op, ": `flat` has dtype ",
            flat.scalar_type(), "; it must be Float, Half or BFloat16");
  MPU_CHECK(flat.device() == device, "FlatBuffer::", op, ": `flat` is on ", flat.device(),
            ", but the parameters are on ", device);
  MPU_CHECK(flat.layout() == torch::kStrided && flat.is_contiguous(), "FlatBuffer::", op,
            ": `flat` must be a contiguous strided tensor (strides ", flat.strides(), ")");
}

void FlatBuffer::Impl::check_param(std::size_t i, const char* op) const {
  const torch::Tensor& p = tensors[i];
  const FlatEntry& e = entries[i];
  MPU_CHECK(
      p.scalar_type() == e.dtype && p.sizes() == c10::IntArrayRef(e.shape) && p.device() == device,
      "FlatBuffer::", op, ": parameter '", e.name, "' changed since the layout was built: it was ",
      e.dtype, " ", c10::IntArrayRef(e.shape), " on ", device, ", it is now ", p.scalar_type(), " ",
      p.sizes(), " on ", p.device(), "; build a new FlatBuffer");
}

void FlatBuffer::Impl::check_grad(std::size_t i, const torch::Tensor& grad, const char* op) const {
  const FlatEntry& e = entries[i];
  MPU_CHECK(grad.sizes() == c10::IntArrayRef(e.shape), "FlatBuffer::", op,
            ": the gradient of parameter '", e.name, "' has shape ", grad.sizes(),
            ", the parameter ", c10::IntArrayRef(e.shape));
  MPU_CHECK(grad.device() == device, "FlatBuffer::", op, ": the gradient of parameter '", e.name,
            "' is on ", grad.device(), ", the parameter on ", device);
  MPU_CHECK(is_packable_dtype(grad.scalar_type()) && grad.layout() == torch::kStrided,
            "FlatBuffer::", op, ": the gradient of parameter '", e.name, "' is a ", grad.layout(),
            " tensor of dtype ", grad.scalar_type(),
            "; it must be a strided Float, Half, BFloat16 or Double tensor");
}

void FlatBuffer::Impl::gather_copy(FlatTarget target, const torch::Tensor& flat, float scale,
                                   const char* op) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> sources(entries.size());
  std::vector<FlatSlot> slots(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    check_param(i, op);
    sources[i] = target == FlatTarget::kGrad ? tensors[i].grad() : tensors[i];
    const torch::Tensor& src = sources[i];
    if (!src.defined()) {
      slots[i] = FlatSlot{nullptr, entries[i].dtype, FlatSlotMode::kZero};
      continue;
    }
    if (target == FlatTarget::kGrad) check_grad(i, src, op);
    slots[i] = FlatSlot{src.data_ptr(), src.scalar_type(),
                        src.is_contiguous() ? FlatSlotMode::kCopy : FlatSlotMode::kSkip};
  }
  if (device.is_cuda()) {
#if MPU_HAS_CUDA
    detail::flat_gather_cuda(cuda, target == FlatTarget::kGrad ? cuda.grad : cuda.data, entries,
                             slots, flat, scale);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      if (slots[i].mode == FlatSlotMode::kSkip) {
        copy_scaled(slot_of(flat, entries[i]), sources[i], scale);
      }
    }
    return;
#else
    MPU_THROW(Error, "FlatBuffer::", op, ": the parameters are on ", device,
              ", but torch-mpu was built without CUDA");
#endif
  }
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const torch::Tensor slot = slot_of(flat, entries[i]);
    if (slots[i].mode == FlatSlotMode::kZero) {
      slot.zero_();
    } else {
      copy_scaled(slot, sources[i], scale);
    }
  }
}

void FlatBuffer::Impl::scatter_copy(const torch::Tensor& flat, FlatTarget target, const char* op) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> dests(entries.size());
  std::vector<FlatSlot> slots(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    check_param(i, op);
    torch::Tensor& p = tensors[i];
    if (target == FlatTarget::kGrad) {
      torch::Tensor& grad = p.mutable_grad();
      if (grad.defined()) {
        check_grad(i, grad, op);
      } else {
        grad = torch::empty(p.sizes(), p.options());
      }
      dests[i] = grad;
    } else {
      dests[i] = p;
    }
    slots[i] = FlatSlot{dests[i].data_ptr(), dests[i].scalar_type(),
                        dests[i].is_contiguous() ? FlatSlotMode::kCopy : FlatSlotMode::kSkip};
  }
  if (device.is_cuda()) {
#if MPU_HAS_CUDA
    detail::flat_scatter_cuda(cuda, target == FlatTarget::kGrad ? cuda.grad : cuda.data, entries,
                              slots, flat);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      if (slots[i].mode == FlatSlotMode::kSkip) {
        dests[i].copy_(slot_of(flat, entries[i]));
      } else if (target == FlatTarget::kData) {
        // The kernel wrote behind autograd's back; let it see that the parameter changed.
        torch::autograd::impl::bump_version(dests[i]);
      }
    }
    return;
#else
    MPU_THROW(Error, "FlatBuffer::", op, ": the parameters are on ", device,
              ", but torch-mpu was built without CUDA");
#endif
  }
  for (std::size_t i = 0; i < entries.size(); ++i) dests[i].copy_(slot_of(flat, entries[i]));
}

void FlatBuffer::Impl::repair(FlatTarget target, bool copy_values, const char* op) {
  torch::NoGradGuard no_grad;
  const torch::Tensor& flat = buffer(target);
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const FlatEntry& e = entries[i];
    torch::Tensor& p = tensors[i];
    check_param(i, op);
    const torch::Tensor& current = target == FlatTarget::kGrad ? p.grad() : p;
    if (is_slot(current, flat, e)) continue;
    const torch::Tensor slot = slot_of(flat, e);
    if (copy_values) {
      if (current.defined()) {
        if (target == FlatTarget::kGrad) check_grad(i, current, op);
        slot.copy_(current);
      } else {
        slot.zero_();
      }
    }
    if (target == FlatTarget::kGrad) {
      p.mutable_grad() = slot;
    } else {
      p.set_data(slot);
    }
    ++repairs;
    if (!warned) {
      warned = true;
      MPU_LOG_WARN("FlatBuffer::", op, ": the ", target_name(target), " of parameter '", e.name,
                   "' is no longer a view into the zero-copy flat buffer (it was replaced",
                   target == FlatTarget::kGrad ? ", or set to none by zero_grad()" : "",
                   "); copying it and making it a view again. Use FlatBuffer::zero_grad() or "
                   "zero_grad(/*set_to_none=*/false) and keep .grad() and .data() in place to "
                   "keep packing free. This warning is shown once per FlatBuffer.");
    }
  }
}

// --- FlatBuffer --------------------------------------------------------------------------------

FlatBuffer::FlatBuffer(torch::nn::Module& module, FlatBufferOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    named.emplace_back(item.key(), item.value());
  }
  impl_->build(named);
}

FlatBuffer::FlatBuffer(const std::vector<torch::Tensor>& tensors, FlatBufferOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  std::vector<std::pair<std::string, torch::Tensor>> named;
  named.reserve(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    named.emplace_back(std::to_string(i), tensors[i]);
  }
  impl_->build(named);
}

FlatBuffer::FlatBuffer(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                       FlatBufferOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  impl_->build(named);
}

FlatBuffer::~FlatBuffer() = default;
FlatBuffer::FlatBuffer(FlatBuffer&&) noexcept = default;
FlatBuffer& FlatBuffer::operator=(FlatBuffer&&) noexcept = default;

torch::Tensor FlatBuffer::gather(FlatTarget target, torch::Dtype wire, double scale) {
  Impl& m = *impl_;
  MPU_CHECK(is_wire_dtype(wire), "FlatBuffer::gather: the wire dtype is ", wire,
            "; it must be Float, Half or BFloat16");
  const float s = checked_scale(scale, "gather");
  if (m.zero_copy) {
    m.repair(target, /*copy_values=*/true, "gather");
    const torch::Tensor& flat = m.buffer(target);
    if (wire == flat.scalar_type() && s == 1.0f) return flat;
    torch::NoGradGuard no_grad;
    torch::Tensor out = torch::empty({m.numel}, flat.options().dtype(wire));
    copy_scaled(out, flat, s);
    return out;
  }
  torch::Tensor out = torch::empty({m.numel}, torch::TensorOptions().dtype(wire).device(m.device));
  m.gather_copy(target, out, s, "gather");
  return out;
}

torch::Tensor FlatBuffer::gather(FlatTarget target) {
  return gather(target, impl_->options.dtype, 1.0);
}

void FlatBuffer::gather_into(FlatTarget target, const torch::Tensor& flat, double scale) {
  Impl& m = *impl_;
  m.check_flat(flat, "gather_into");
  const float s = checked_scale(scale, "gather_into");
  if (m.zero_copy) {
    m.repair(target, /*copy_values=*/true, "gather_into");
    const torch::Tensor& buf = m.buffer(target);
    torch::NoGradGuard no_grad;
    if (m.numel > 0 && flat.data_ptr() == buf.data_ptr()) {
      if (s != 1.0f) copy_scaled(flat, flat, s);
    } else {
      copy_scaled(flat, buf, s);
    }
    return;
  }
  m.gather_copy(target, flat, s, "gather_into");
}

void FlatBuffer::scatter(const torch::Tensor& flat, FlatTarget target) {
  Impl& m = *impl_;
  m.check_flat(flat, "scatter");
  if (m.zero_copy) {
    const torch::Tensor& buf = m.buffer(target);
    if (m.numel > 0 && flat.data_ptr() != buf.data_ptr()) {
      torch::NoGradGuard no_grad;
      buf.copy_(flat);
    }
    m.repair(target, /*copy_values=*/false, "scatter");
    if (target == FlatTarget::kData) {
      for (const auto& p : m.tensors) torch::autograd::impl::bump_version(p);
    }
    return;
  }
  m.scatter_copy(flat, target, "scatter");
}

void FlatBuffer::zero_grad() {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;
  if (m.zero_copy) {
    m.flat_grad.zero_();
    for (std::size_t i = 0; i < m.entries.size(); ++i) {
      torch::Tensor& p = m.tensors[i];
      if (!is_slot(p.grad(), m.flat_grad, m.entries[i])) {
        p.mutable_grad() = slot_of(m.flat_grad, m.entries[i]);
      }
    }
    return;
  }
  for (auto& p : m.tensors) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
}

std::int64_t FlatBuffer::numel() const {
  return impl_->numel;
}
std::size_t FlatBuffer::size() const {
  return impl_->entries.size();
}
const std::vector<FlatEntry>& FlatBuffer::entries() const {
  return impl_->entries;
}
const std::vector<torch::Tensor>& FlatBuffer::tensors() const {
  return impl_->tensors;
}
torch::Device FlatBuffer::device() const {
  return impl_->device;
}
torch::Dtype FlatBuffer::dtype() const {
  return impl_->options.dtype;
}
bool FlatBuffer::zero_copy() const {
  return impl_->zero_copy;
}
const std::string& FlatBuffer::zero_copy_reason() const {
  return impl_->zero_copy_reason;
}

const torch::Tensor& FlatBuffer::flat_data() const {
  MPU_CHECK(impl_->zero_copy,
            "FlatBuffer::flat_data: zero-copy mode is off: ", impl_->zero_copy_reason);
  return impl_->flat_data;
}

const torch::Tensor& FlatBuffer::flat_grad() const {
  MPU_CHECK(impl_->zero_copy,
            "FlatBuffer::flat_grad: zero-copy mode is off: ", impl_->zero_copy_reason);
  return impl_->flat_grad;
}

FlatBufferStats FlatBuffer::stats() const {
  FlatBufferStats s;
  s.table_builds = impl_->cuda.table_builds;
  s.repairs = impl_->repairs;
  return s;
}

bool FlatBuffer::all_finite(const torch::Tensor& flat) {
  if (!flat.defined() || flat.numel() == 0) return true;
  torch::NoGradGuard no_grad;
  return torch::isfinite(flat).all().item<bool>();
}

}  // namespace mpu
