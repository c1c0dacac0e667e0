// The CUDA binding of FlatBuffer: device tables, device guard, current stream, launch, check.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda/flat_kernels.h"
#include "flat/flat_buffer_detail.h"
#include "flat/kernel_dtype.h"
#include "mpu/error.h"

namespace mpu::detail {
namespace {

kernels::FlatDtype kernel_dtype(torch::Dtype dtype) {
  return detail::kernel_dtype(dtype, "FlatBuffer (CUDA)");
}

kernels::FlatMode kernel_mode(FlatSlotMode mode) {
  return static_cast<kernels::FlatMode>(static_cast<std::int32_t>(mode));
}

// Copies `size` bytes to a new tensor on `device`, through pinned memory and stream-ordered on
// the current stream, so that no host synchronisation is needed; torch's host allocator keeps
// the pinned block until the copy has run.
torch::Tensor upload(const void* bytes, std::size_t size, torch::Device device) {
  auto host = torch::empty({static_cast<std::int64_t>(size)},
                           torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes, size);
  return host.to(torch::TensorOptions().device(device), /*non_blocking=*/true);
}

void ensure_tables(FlatCudaState& state, FlatDeviceTable& table,
                   const std::vector<FlatEntry>& entries, const std::vector<FlatSlot>& slots,
                   torch::Device device) {
  if (!state.chunks.defined()) {
    std::vector<kernels::FlatChunk> chunks;
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const std::int64_t count = kernels::flat_chunk_count(entries[i].numel);
      MPU_CHECK(count <= std::numeric_limits<std::int32_t>::max() &&
                    i <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
                "FlatBuffer (CUDA): parameter '", entries[i].name, "' has ", entries[i].numel,
                " elements, more than the kernels' chunk table can address");
      for (std::int64_t c = 0; c < count; ++c) {
        chunks.push_back({static_cast<std::int32_t>(i), static_cast<std::int32_t>(c)});
      }
    }
    state.num_chunks = static_cast<std::int64_t>(chunks.size());
    state.chunks = upload(chunks.data(), chunks.size() * sizeof(kernels::FlatChunk), device);
  }
  if (table.valid && table.key == slots) return;
  std::vector<kernels::FlatTensor> tensors(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    tensors[i].ptr = slots[i].ptr;
    tensors[i].offset = entries[i].offset;
    tensors[i].numel = entries[i].numel;
    tensors[i].dtype = slots[i].mode == FlatSlotMode::kCopy ? kernel_dtype(slots[i].dtype)
                                                            : kernels::FlatDtype::kFloat32;
    tensors[i].mode = kernel_mode(slots[i].mode);
  }
  table.bytes = upload(tensors.data(), tensors.size() * sizeof(kernels::FlatTensor), device);
  table.key = slots;
  table.valid = true;
  ++state.table_builds;
}

}  // namespace

void flat_gather_cuda(FlatCudaState& state, FlatDeviceTable& table,
                      const std::vector<FlatEntry>& entries, const std::vector<FlatSlot>& slots,
                      const torch::Tensor& flat, float scale) {
  if (entries.empty()) return;
  const c10::cuda::CUDAGuard guard(flat.device());
  ensure_tables(state, table, entries, slots, flat.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(flat.device().index()).stream();
  MPU_CUDA_CHECK(kernels::flat_gather(
      static_cast<const kernels::FlatTensor*>(table.bytes.data_ptr()),
      static_cast<const kernels::FlatChunk*>(state.chunks.data_ptr()), state.num_chunks,
      flat.data_ptr(), kernel_dtype(flat.scalar_type()), scale, stream));
}

void flat_scatter_cuda(FlatCudaState& state, FlatDeviceTable& table,
                       const std::vector<FlatEntry>& entries, const std::vector<FlatSlot>& slots,
                       const torch::Tensor& flat) {
  if (entries.empty()) return;
  const c10::cuda::CUDAGuard guard(flat.device());
  ensure_tables(state, table, entries, slots, flat.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(flat.device().index()).stream();
  MPU_CUDA_CHECK(kernels::flat_scatter(
      static_cast<const kernels::FlatTensor*>(table.bytes.data_ptr()),
      static_cast<const kernels::FlatChunk*>(state.chunks.data_ptr()), state.num_chunks,
      flat.data_ptr(), kernel_dtype(flat.scalar_type()), stream));
}

}  // namespace mpu::detail
