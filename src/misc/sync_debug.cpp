#include "misc/sync_debug.h"

#include <string>

#include "misc/env.h"
#include "mpu/config.h"
#include "mpu/error.h"

namespace mpu::detail {

int sync_debug_mode_from_env() {
  const auto text = env_text("MPU_SYNC_DEBUG");
  if (!text || *text == "off") return 0;
  if (*text == "warn") return 1;
  if (*text == "error") return 2;
  MPU_THROW(InvalidArgument, "MPU_SYNC_DEBUG must be off, warn or error, got '", *text, "'");
}

#if !MPU_HAS_CUDA
int set_cuda_sync_debug(int /*mode*/) {
  return -1;
}
#endif

SyncDebugScope::SyncDebugScope() {
  const int mode = sync_debug_mode_from_env();
  if (mode != 0) previous_ = set_cuda_sync_debug(mode);
}

SyncDebugScope::~SyncDebugScope() {
  if (previous_ >= 0) set_cuda_sync_debug(previous_);
}

}  // namespace mpu::detail
