// REFERENCE ONLY, for bench/bench_flat_buffer: the seed's way of packing, one thread per element
// of the flat buffer, each finding its tensor by a binary search over the tensors' offsets. The
// library packs with flat_kernels.h; these exist to measure what that replaced.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/flat_table.h"

namespace mpu::kernels {

/// flat[i] = convert(ptrs[t][i - offsets[t]]) for the t with offsets[t] <= i < offsets[t + 1];
/// zero where ptrs[t] is null. `ptrs` and `dtypes` have `num_tensors` entries and `offsets`
/// num_tensors + 1, all in device memory. Source dtypes: kFloat32, kFloat16, kBFloat16; the flat
/// dtype: the same three. `numel == offsets[num_tensors]`.
cudaError_t flat_gather_bsearch_reference(const void* const* ptrs, const FlatDtype* dtypes,
                                          const std::int64_t* offsets, int num_tensors, void* flat,
                                          FlatDtype flat_dtype, std::int64_t numel,
                                          cudaStream_t stream) noexcept;

/// The inverse of flat_gather_bsearch_reference; null pointers are skipped.
cudaError_t flat_scatter_bsearch_reference(void* const* ptrs, const FlatDtype* dtypes,
                                           const std::int64_t* offsets, int num_tensors,
                                           const void* flat, FlatDtype flat_dtype,
                                           std::int64_t numel, cudaStream_t stream) noexcept;

}  // namespace mpu::kernels
