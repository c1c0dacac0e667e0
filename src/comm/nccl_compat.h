// The one place for NCCL version gates. torch-mpu needs ncclAvg and ncclBfloat16 (2.10),
// ncclGetLastError (2.13), non-blocking communicators and ncclCommFinalize (2.14).
#pragma once

#include <nccl.h>

#include <string>

static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0),
              "torch-mpu needs NCCL 2.14 or newer (non-blocking communicators, ncclCommFinalize)");

namespace mpu::detail {

/// "ncclSystemError (unhandled system error): <NCCL's last error text>".
inline std::string nccl_error_text(ncclResult_t result, ncclComm_t comm) {
  std::string text = ncclGetErrorString(result);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') {
    text += ": ";
    text += last;
  }
  return text;
}

}  // namespace mpu::detail
