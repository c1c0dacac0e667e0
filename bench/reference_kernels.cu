#include "bench/reference_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mpu::kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_as_float(const void* p, FlatDtype dtype, std::int64_t i) {
  switch (dtype) {
    case FlatDtype::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case FlatDtype::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, FlatDtype dtype, std::int64_t i,
                                                 float x) {
  switch (dtype) {
    case FlatDtype::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(x);
      break;
    case FlatDtype::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
      break;
    default:
      static_cast<float*>(p)[i] = x;
      break;
  }
}

// The tensor t with offsets[t] <= i < offsets[t + 1].
__device__ __forceinline__ int find_tensor(const std::int64_t* offsets, int num_tensors,
                                           std::int64_t i) {
  int lo = 0;
  int hi = num_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (i < offsets[mid]) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return lo;
}

__global__ void bsearch_gather_kernel(const void* const* ptrs, const FlatDtype* dtypes,
                                      const std::int64_t* offsets, int num_tensors, void* flat,
                                      FlatDtype flat_dtype, std::int64_t numel) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= numel) return;
  const int t = find_tensor(offsets, num_tensors, i);
  const void* src = ptrs[t];
  const float x = src == nullptr ? 0.0f : load_as_float(src, dtypes[t], i - offsets[t]);
  store_from_float(flat, flat_dtype, i, x);
}

__global__ void bsearch_scatter_kernel(void* const* ptrs, const FlatDtype* dtypes,
                                       const std::int64_t* offsets, int num_tensors,
                                       const void* flat, FlatDtype flat_dtype, std::int64_t numel) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= numel) return;
  const int t = find_tensor(offsets, num_tensors, i);
  void* dst = ptrs[t];
  if (dst == nullptr) return;
  store_from_float(dst, dtypes[t], i - offsets[t], load_as_float(flat, flat_dtype, i));
}

bool bad_dtype(FlatDtype d) {
  return d != FlatDtype::kFloat32 && d != FlatDtype::kFloat16 && d != FlatDtype::kBFloat16;
}

unsigned blocks_for(std::int64_t numel) {
  return static_cast<unsigned>((numel + kThreads - 1) / kThreads);
}

}  // namespace

cudaError_t flat_gather_bsearch_reference(const void* const* ptrs, const FlatDtype* dtypes,
                                          const std::int64_t* offsets, int num_tensors, void* flat,
                                          FlatDtype flat_dtype, std::int64_t numel,
                                          cudaStream_t stream) noexcept {
  if (numel == 0) return cudaSuccess;
  if (ptrs == nullptr || dtypes == nullptr || offsets == nullptr || flat == nullptr ||
      num_tensors <= 0 || numel < 0 || bad_dtype(flat_dtype) ||
      (numel + kThreads - 1) / kThreads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  bsearch_gather_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(
      ptrs, dtypes, offsets, num_tensors, flat, flat_dtype, numel);
  return cudaGetLastError();
}

cudaError_t flat_scatter_bsearch_reference(void* const* ptrs, const FlatDtype* dtypes,
                                           const std::int64_t* offsets, int num_tensors,
                                           const void* flat, FlatDtype flat_dtype,
                                           std::int64_t numel, cudaStream_t stream) noexcept {
  if (numel == 0) return cudaSuccess;
  if (ptrs == nullptr || dtypes == nullptr || offsets == nullptr || flat == nullptr ||
      num_tensors <= 0 || numel < 0 || bad_dtype(flat_dtype) ||
      (numel + kThreads - 1) / kThreads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  bsearch_scatter_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(
      ptrs, dtypes, offsets, num_tensors, flat, flat_dtype, numel);
  return cudaGetLastError();
}

}  // namespace mpu::kernels
