// Private: what src/flat_buffer.cpp shares with its CUDA binding, src/flat_buffer_cuda.cpp.
// Compiles without the CUDA toolkit, so it mirrors the kernels' enums instead of including them.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "mpu/flat_buffer.h"

namespace mpu::detail {

/// What the kernels do with one entry on one call; the values are kernels::FlatMode's.
enum class FlatSlotMode : std::int32_t { kCopy = 0, kZero = 1, kSkip = 2 };

/// One entry's tensor on one call: the gradient or parameter the kernels read or write.
struct FlatSlot {
  void* ptr = nullptr;  ///< its first element; null in mode kZero
  torch::Dtype dtype = torch::kFloat;
  FlatSlotMode mode = FlatSlotMode::kCopy;

  bool operator==(const FlatSlot& o) const {
    return ptr == o.ptr && dtype == o.dtype && mode == o.mode;
  }
  bool operator!=(const FlatSlot& o) const { return !(*this == o); }
};

/// The device copy of one target's tensor table, and the slots it was built from.
struct FlatDeviceTable {
  std::vector<FlatSlot> key;
  torch::Tensor bytes;  ///< kernels::FlatTensor per entry, on the device
  bool valid = false;
};

/// What the CUDA path caches between calls.
struct FlatCudaState {
  torch::Tensor chunks;  ///< kernels::FlatChunk per chunk, on the device; depends on sizes only
  std::int64_t num_chunks = 0;
  FlatDeviceTable grad;
  FlatDeviceTable data;
  std::int64_t table_builds = 0;
};

#if MPU_HAS_CUDA
/// Gathers `slots` into `flat` (contiguous, on the entries' CUDA device, of a wire dtype) with
/// one kernel launch on the current stream. Entries in mode kSkip are left to the caller.
/// Rebuilds `table` when `slots` differ from the slots it was built from. Throws mpu::Error when
/// CUDA fails.
void flat_gather_cuda(FlatCudaState& state, FlatDeviceTable& table,
                      const std::vector<FlatEntry>& entries, const std::vector<FlatSlot>& slots,
                      const torch::Tensor& flat, float scale);

/// Scatters `flat` into `slots` in mode kCopy with one kernel launch on the current stream.
void flat_scatter_cuda(FlatCudaState& state, FlatDeviceTable& table,
                       const std::vector<FlatEntry>& entries, const std::vector<FlatSlot>& slots,
                       const torch::Tensor& flat);
#endif

}  // namespace mpu::detail
