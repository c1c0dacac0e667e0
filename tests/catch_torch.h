// Include this instead of <catch2/catch.hpp> in tests that use LibTorch. Debian's LibTorch
// pulls in glog, whose CHECK macro would replace Catch's (a failing one-argument CHECK would then
// abort the process instead of reporting). LibTorch goes first, glog's CHECK is dropped, and
// Catch defines its own.
#pragma once

#include <torch/torch.h>

#undef CHECK
#include <catch2/catch.hpp>

#include "mpu/config.h"

namespace mpu::test {

/// True, with a visible reason, when this build or this machine has no CUDA: the first line of
/// every "[cuda]" test case.
inline bool skip_without_cuda() {
  if (!MPU_HAS_CUDA) {
    WARN("skipped: torch-mpu was built without CUDA");
    return true;
  }
  if (!torch::cuda::is_available()) {
    WARN("skipped: no CUDA device");
    return true;
  }
  return false;
}

}  // namespace mpu::test
