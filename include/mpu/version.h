/// \file
/// The library's version and what it was built with.
#pragma once

#include <string>

#include "mpu/config.h"

namespace mpu {

/// One line: torch-mpu's version, the LibTorch it was built against, and which of CUDA, NCCL
/// and Gloo are built in. For logs and bug reports.
std::string build_info();

}  // namespace mpu
