// The kernels' dtype tag of a torch dtype, shared by the CUDA bindings of the packing layer and
// of the fused optimizer step.
#pragma once

#include <torch/torch.h>

#include "cuda/flat_table.h"
#include "mpu/error.h"

namespace mpu::detail {

/// kFloat32, kFloat16, kBFloat16 or kFloat64; InvalidArgument naming `who` for any other dtype.
inline kernels::FlatDtype kernel_dtype(torch::ScalarType dtype, const char* who) {
  switch (dtype) {
    case torch::kFloat:
      return kernels::FlatDtype::kFloat32;
    case torch::kHalf:
      return kernels::FlatDtype::kFloat16;
    case torch::kBFloat16:
      return kernels::FlatDtype::kBFloat16;
    case torch::kDouble:
      return kernels::FlatDtype::kFloat64;
    default:
      MPU_THROW(InvalidArgument, who, ": dtype ", dtype, " has no kernel");
  }
}

}  // namespace mpu::detail
