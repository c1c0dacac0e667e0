// The one place where LibTorch 1.13 (Debian's libtorch-dev) and LibTorch 2.x (the PyTorch
// wheel) differ for torch-mpu. Everything else includes this header and stays version-free.
#pragma once

#include <torch/version.h>

#define MPU_TORCH_VERSION (TORCH_VERSION_MAJOR * 10000 + TORCH_VERSION_MINOR * 100)

static_assert(MPU_TORCH_VERSION >= 11300, "torch-mpu needs LibTorch 1.13 or newer");

namespace mpu::detail {

/// True when built against LibTorch 2.x.
inline constexpr bool kTorch2 = TORCH_VERSION_MAJOR >= 2;

}  // namespace mpu::detail
