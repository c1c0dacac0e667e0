/// \file
/// FlatBuffer: every parameter of a model, or every gradient, whatever its dtype, packed into one
/// contiguous buffer so that one collective moves it all, and unpacked again.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mpu/config.h"

namespace mpu {

/// What a FlatBuffer packs: each parameter's gradient, or each parameter's value.
enum class FlatTarget { kGrad, kData };

/// Whether the parameters and their gradients become views into the flat buffers.
enum class ZeroCopy {
  kOff,   ///< Never: gather and scatter always copy, and the parameters are left untouched.
  kAuto,  ///< When every parameter has the buffer's dtype and is contiguous; else off, and
          ///< `zero_copy_reason()` says which parameter prevented it.
  kOn,    ///< Always; the constructor throws `mpu::InvalidArgument` naming the first parameter
          ///< that prevents it.
};

/// How a FlatBuffer is built.
struct FlatBufferOptions {
  /// The dtype of the flat buffers in zero-copy mode, and the wire dtype `gather(target)` uses
  /// by default: torch::kFloat, torch::kHalf or torch::kBFloat16.
  torch::Dtype dtype = torch::kFloat;
  /// See `ZeroCopy`. Off by default, because zero-copy replaces the parameters' storage.
  ZeroCopy zero_copy = ZeroCopy::kOff;
};

/// One tensor's place in the flat buffer.
struct FlatEntry {
  std::string name;         ///< from named_parameters(), or "0", "1", ... for a tensor list
  std::int64_t offset = 0;  ///< index of its first element in the flat buffer
  std::int64_t numel = 0;   ///< its number of elements (never 0: empty tensors are skipped)
  /// the tensor's shape
  std::vector<std::int64_t> shape;
  torch::Dtype dtype = torch::kFloat;  ///< the parameter's own dtype
};

/// Counters, for tests and for diagnosing a slow step.
struct FlatBufferStats {
  /// How often a device pointer table was built: once per target, then only when a parameter's
  /// or gradient's storage changed (or a gradient appeared or disappeared).
  std::int64_t table_builds = 0;
  /// Zero-copy mode: how many times a gradient or parameter that had stopped being a view into
  /// the flat buffer was copied into it and made a view again.
  std::int64_t repairs = 0;
};

/// A layout over a list of floating-point tensors (Float, Half, BFloat16 or Double, freely
/// mixed), and the operations that pack them into one flat buffer and unpack it.
///
/// Layout. The order is that of `module.named_parameters()` (recursive: a module's own
/// parameters in registration order, then each submodule's, depth first, in registration
/// order), or the order of the tensor list. It depends only on the model's structure, so it is
/// identical on every rank that builds the same model. Empty tensors are skipped; a tensor that
/// appears twice (tied weights) is kept once, under its first name. Entries are dense: entry i+1
/// starts where entry i ends, and `numel()` is the sum of their sizes. Each entry is the
/// tensor's elements in row-major (logical) order, whatever its strides.
///
/// Packing. `gather(target, wire, scale)` returns a 1-D tensor of `numel()` elements of the wire
/// dtype (Float, Half or BFloat16), on `device()`: element offset+i is `scale * x[i]`, computed
/// in fp32 and rounded once to the wire dtype (round to nearest even). With scale 1 and equal
/// dtypes the copy is bit-exact. A parameter without a gradient gathers as zeros.
/// `scatter(flat, target)` writes the flat buffer back, converting to each tensor's dtype; it
/// creates a parameter's missing gradient. Both work on CPU tensors (through torch ops) and on
/// CUDA tensors (one kernel launch each, whatever the number of tensors).
///
/// CUDA. Everything runs on torch's current stream of `device()`, in stream order, with no host
/// synchronisation. The kernels read pointer tables that live on the device; they are built on
/// the first call per target and rebuilt only when a tensor's storage changed. Use one
/// FlatBuffer from one stream at a time (or order the streams yourself), as with any tensor.
///
/// Zero-copy mode. When every parameter has the buffer's dtype (`FlatBufferOptions::dtype`), the
/// constructor moves the parameters into one flat parameter buffer and gives every parameter a
/// gradient that is a view into one flat gradient buffer (existing gradients are copied, missing
/// ones start at zero). Backward then accumulates straight into the flat gradient buffer, an
/// optimizer steps the flat parameter buffer, and `gather(target)` with the buffer's dtype and
/// scale 1 returns the buffer itself (an alias, no copy); `scatter` from that buffer costs
/// nothing. Gathering with another dtype or scale makes a converted copy. `flat_data()` and
/// `flat_grad()` give the buffers to collectives and flat optimizers. User code must not:
/// - replace a gradient: assign `p.mutable_grad()`, or set it to none, which LibTorch 2.x's
///   `Optimizer::zero_grad()` and `Module::zero_grad()` do by default. Use `zero_grad()` of this
///   class, or `zero_grad(/*set_to_none=*/false)`;
/// - replace a parameter's storage: `set_data()`, or `Module::to()` to another dtype or device
///   (the latter two make the layout invalid, and the next call throws);
/// - write the flat parameter buffer between a forward pass and its backward pass.
/// A gather or scatter that finds a gradient or parameter that is no longer a view copies it into
/// its slot, makes it a view again and logs a warning, once per FlatBuffer; `stats().repairs`
/// counts these.
///
/// Errors. The constructor throws `mpu::InvalidArgument` naming the parameter and the values
/// seen when parameters are on different devices, have a non-floating dtype, or are not strided;
/// gather, gather_into and scatter throw it for a flat buffer of the wrong size, dtype, device or
/// layout, and for a parameter or gradient whose shape, dtype or device changed since the layout
/// was built.
///
/// A FlatBuffer holds the parameter tensors (shared), not the module. It is movable, not
/// copyable, and not thread-safe.
class FlatBuffer {
 public:
  /// A layout over `module.named_parameters()`.
  explicit FlatBuffer(torch::nn::Module& module, FlatBufferOptions options = {});
  /// A layout over `tensors`, named "0", "1", ... by their index in the list.
  explicit FlatBuffer(const std::vector<torch::Tensor>& tensors, FlatBufferOptions options = {});
  /// A layout over named tensors, in the list's order.
  explicit FlatBuffer(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                      FlatBufferOptions options = {});
  ~FlatBuffer();
  /// Moves the layout and its buffers; the moved-from FlatBuffer may only be destroyed or assigned.
  FlatBuffer(FlatBuffer&&) noexcept;
  /// Moves the layout and its buffers; the moved-from FlatBuffer may only be destroyed or assigned.
  FlatBuffer& operator=(FlatBuffer&&) noexcept;
  FlatBuffer(const FlatBuffer&) = delete;
  FlatBuffer& operator=(const FlatBuffer&) = delete;

  /// Packs `target` into a new flat tensor of dtype `wire`, multiplied by `scale`. In zero-copy
  /// mode with `wire == dtype()` and `scale == 1`, returns the flat buffer itself.
  torch::Tensor gather(FlatTarget target, torch::Dtype wire, double scale = 1.0);
  /// `gather(target, dtype())`.
  torch::Tensor gather(FlatTarget target);
  /// Packs `target` into `flat`, a contiguous tensor of `numel()` elements on `device()`, whose
  /// dtype is the wire dtype; no allocation. In zero-copy mode, when `flat` is the buffer itself,
  /// only `scale` is applied, in place.
  void gather_into(FlatTarget target, const torch::Tensor& flat, double scale = 1.0);
  /// Unpacks `flat` (contiguous, `numel()` elements of Float, Half or BFloat16, on `device()`)
  /// into `target`, creating missing gradients. In zero-copy mode, scattering the buffer itself
  /// costs nothing.
  void scatter(const torch::Tensor& flat, FlatTarget target);

  /// Zeros every gradient. In zero-copy mode: one fill of the flat gradient buffer, and a
  /// gradient that was replaced becomes a view again, silently.
  void zero_grad();

  /// Total number of elements: the size of a flat buffer.
  std::int64_t numel() const;
  /// Number of entries (tensors packed).
  std::size_t size() const;
  /// Where each packed tensor lies in the flat buffer, in layout order.
  const std::vector<FlatEntry>& entries() const;
  /// The packed tensors, in layout order.
  const std::vector<torch::Tensor>& tensors() const;
  /// The device of every packed tensor; CPU for an empty layout.
  torch::Device device() const;
  /// `FlatBufferOptions::dtype`.
  torch::Dtype dtype() const;

  /// True when zero-copy mode is active.
  bool zero_copy() const;
  /// Why zero-copy mode is off; empty when it is on.
  const std::string& zero_copy_reason() const;
  /// Zero-copy mode only (else throws mpu::InvalidArgument): the flat parameter buffer, which
  /// the parameters are views of. Writing it writes the parameters.
  const torch::Tensor& flat_data() const;
  /// Zero-copy mode only (else throws mpu::InvalidArgument): the flat gradient buffer, which the
  /// gradients are views of. Writing it writes the gradients.
  const torch::Tensor& flat_grad() const;

  /// The counters so far.
  FlatBufferStats stats() const;

  /// True when every element of `flat` is finite (no inf, no NaN). One pass; on CUDA it waits
  /// for the result, so it synchronises the current stream with the host.
  static bool all_finite(const torch::Tensor& flat);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mpu
