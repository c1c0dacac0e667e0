// Bit-for-bit tensor comparison, for tests that promise exact results.
#pragma once

#include <torch/torch.h>

namespace mpu::test {

/// True when `a` and `b` have the same dtype, shape and bit patterns (so -0.0 != 0.0, and a NaN
/// equals the same NaN). Two undefined tensors are equal.
inline bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() || !b.defined()) return a.defined() == b.defined();
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto as_int = [](const torch::Tensor& t) {
    const torch::Tensor c = t.detach().cpu().contiguous();
    switch (c.element_size()) {
      case 2:
        return c.view(torch::kShort);
      case 4:
        return c.view(torch::kInt);
      default:
        return c.view(torch::kLong);
    }
  };
  return torch::equal(as_int(a), as_int(b));
}

}  // namespace mpu::test
