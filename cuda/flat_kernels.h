// Kernels of the flat packing layer: many tensors of mixed dtype gathered into one flat buffer,
// or scattered back from it, in one launch. Framework-free: device pointers, counts and a stream
// in, cudaError_t out; nothing throws.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/flat_table.h"

namespace mpu::kernels {

/// Gathers every tensor of `tensors` into `flat`: flat[t.offset + i] = convert(t.ptr[i]), where
/// convert is a bit-exact copy when the dtypes match and `scale == 1`, and otherwise
/// round_to_nearest_even(float(x) * scale) in the flat dtype (without the multiply when
/// `scale == 1`). Tensors in mode kZero get zeros, in mode kSkip nothing.
///
/// `tensors` and `chunks` are device arrays; `chunks` lists every chunk of every tensor (see
/// FlatChunk), one block each. `flat_dtype` is kFloat32, kFloat16 or kBFloat16. Returns
/// cudaErrorInvalidValue for a bad dtype, a null pointer or more than 2^31-1 chunks, and
/// cudaSuccess without launching when `num_chunks == 0`.
cudaError_t flat_gather(const FlatTensor* tensors, const FlatChunk* chunks, std::int64_t num_chunks,
                        void* flat, FlatDtype flat_dtype, float scale,
                        cudaStream_t stream) noexcept;

/// The inverse: t.ptr[i] = convert(flat[t.offset + i]) for every tensor in mode kCopy, where
/// convert is a bit-exact copy for equal dtypes and a conversion through fp32 otherwise.
cudaError_t flat_scatter(const FlatTensor* tensors, const FlatChunk* chunks,
                         std::int64_t num_chunks, const void* flat, FlatDtype flat_dtype,
                         cudaStream_t stream) noexcept;

}  // namespace mpu::kernels
