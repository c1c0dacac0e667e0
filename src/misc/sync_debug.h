// MPU_SYNC_DEBUG: LibTorch's CUDA synchronisation check over the training loop, for finding
// where a step waits for the device. "warn" prints a warning (with its place) at every
// synchronising call, "error" throws at the first; unset or "off" leaves it as it is.
#pragma once

namespace mpu::detail {

/// Sets LibTorch's CUDA sync-debug mode from MPU_SYNC_DEBUG for its lifetime, and restores the
/// previous mode after. Throws InvalidArgument for a value other than off, warn or error. Does
/// nothing on a build without CUDA, or when the variable is unset.
class SyncDebugScope {
 public:
  SyncDebugScope();
  ~SyncDebugScope();
  SyncDebugScope(const SyncDebugScope&) = delete;
  SyncDebugScope& operator=(const SyncDebugScope&) = delete;

 private:
  int previous_ = -1;  // -1: nothing was changed
};

/// The mode of MPU_SYNC_DEBUG: 0 off (or unset), 1 warn, 2 error; throws InvalidArgument
/// naming the variable and its value otherwise.
int sync_debug_mode_from_env();

/// Sets the CUDA sync-debug mode (0 off, 1 warn, 2 error) and returns the previous one; -1 and
/// nothing set on a build without CUDA.
int set_cuda_sync_debug(int mode);

}  // namespace mpu::detail
