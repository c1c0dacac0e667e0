#include "mpu/version.h"

#include "misc/torch_compat.h"
#include "mpu/error.h"

namespace mpu {

std::string build_info() {
  return detail::cat("torch-mpu ", MPU_VERSION_STRING, " (LibTorch ", TORCH_VERSION, ", CUDA ",
                     MPU_HAS_CUDA ? "on" : "off", ", NCCL ", MPU_HAS_NCCL ? "on" : "off", ", Gloo ",
                     MPU_HAS_GLOO ? "on" : "off", ")");
}

}  // namespace mpu
