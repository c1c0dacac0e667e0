#include <c10/cuda/CUDAFunctions.h>

#include "misc/sync_debug.h"

namespace mpu::detail {

int set_cuda_sync_debug(int mode) {
  auto& state = c10::cuda::warning_state();
  const int previous = static_cast<int>(state.get_sync_debug_mode());
  state.set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(mode));
  return previous;
}

}  // namespace mpu::detail
