#include "cuda/flat_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace mpu::kernels {
namespace {

constexpr int kPack = kFlatPackElements;
constexpr int kThreads = kFlatBlockThreads;
// Packs each thread moves per chunk.
constexpr int kPacksPerThread = static_cast<int>(kFlatChunkElements / (kPack * kThreads));
static_assert(kPacksPerThread * kPack * kThreads == kFlatChunkElements,
              "a chunk must be a whole number of packs per thread");
static_assert(kPack * 2 % 16 == 0, "a pack of 2-byte elements must fill 16-byte vectors");

// --- Conversions: through fp32, rounding to nearest even ---------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<double>(double x) {
  return __double2float_rn(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ double from_float<double>(float x) {
  return static_cast<double>(x);
}

// A bit-exact copy when nothing changes; otherwise one rounding from fp32.
template <typename Src, typename Dst, bool kScaled>
__device__ __forceinline__ Dst convert(Src x, float scale) {
  if constexpr (std::is_same_v<Src, Dst> && !kScaled) {
    return x;
  } else if constexpr (kScaled) {
    return from_float<Dst>(to_float<Src>(x) * scale);
  } else {
    return from_float<Dst>(to_float<Src>(x));
  }
}

// --- Packs: kPack elements moved with 16-byte loads and stores ---------------------------------
template <typename T>
struct Pack {
  static constexpr int kVecs = kPack * static_cast<int>(sizeof(T)) / 16;
  uint4 v[kVecs];
};

// Bit patterns, widened to unsigned (2- and 4-byte types) or unsigned long long (8-byte types).
__device__ __forceinline__ unsigned to_bits(__half x) {
  return __half_as_ushort(x);
}
__device__ __forceinline__ unsigned to_bits(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}
__device__ __forceinline__ unsigned to_bits(float x) {
  return __float_as_uint(x);
}
__device__ __forceinline__ unsigned long long to_bits(double x) {
  return static_cast<unsigned long long>(__double_as_longlong(x));
}
template <typename T>
__device__ __forceinline__ T from_bits(unsigned long long b);
template <>
__device__ __forceinline__ __half from_bits<__half>(unsigned long long b) {
  return __ushort_as_half(static_cast<unsigned short>(b));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned long long b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b));
}
template <>
__device__ __forceinline__ float from_bits<float>(unsigned long long b) {
  return __uint_as_float(static_cast<unsigned>(b));
}
template <>
__device__ __forceinline__ double from_bits<double>(unsigned long long b) {
  return __longlong_as_double(static_cast<long long>(b));
}

__device__ __forceinline__ unsigned word_of(const uint4& v, int k) {
  return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

// Element i of a pack. Bit operations, not pointer casts, so that the pack stays in registers
// and its stores stay 16 bytes wide.
template <typename T>
__device__ __forceinline__ T pack_get(const Pack<T>& p, int i) {
  if constexpr (sizeof(T) == 2) {
    return from_bits<T>(word_of(p.v[i / 8], (i % 8) / 2) >> (16 * (i % 2)));
  } else if constexpr (sizeof(T) == 4) {
    return from_bits<T>(word_of(p.v[i / 4], i % 4));
  } else {
    const unsigned long long lo = word_of(p.v[i / 2], (i % 2) * 2);
    const unsigned long long hi = word_of(p.v[i / 2], (i % 2) * 2 + 1);
    return from_bits<T>(lo | (hi << 32));
  }
}

// A pack made of kPack elements.
template <typename T>
__device__ __forceinline__ void pack_set_all(Pack<T>& p, const T (&x)[kPack]) {
#pragma unroll
  for (int k = 0; k < Pack<T>::kVecs; ++k) {
    unsigned w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (sizeof(T) == 2) {
        w[j] = to_bits(x[k * 8 + 2 * j]) | (to_bits(x[k * 8 + 2 * j + 1]) << 16);
      } else if constexpr (sizeof(T) == 4) {
        w[j] = to_bits(x[k * 4 + j]);
      } else {
        w[j] = static_cast<unsigned>(to_bits(x[k * 2 + j / 2]) >> (32 * (j % 2)));
      }
    }
    p.v[k] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& pack, const T* __restrict__ src) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int i = 0; i < Pack<T>::kVecs; ++i) pack.v[i] = __ldg(s + i);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ dst, const Pack<T>& pack) {
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < Pack<T>::kVecs; ++i) __stwb(d + i, pack.v[i]);
}

// Packs loaded before the first store: 128 bytes of source per thread per round, so that every
// source dtype keeps the same number of bytes in flight and the same register budget. (64 bytes
// left fp32 gathers at 78% of a D2D copy on an H200: too few loads in flight.)
template <typename T>
constexpr int kPacksPerRound = 128 / (kPack * static_cast<int>(sizeof(T))) < kPacksPerThread
                                   ? 128 / (kPack * static_cast<int>(sizeof(T)))
                                   : kPacksPerThread;

// Moves n <= kFlatChunkElements elements from src to dst with the whole block. When src and dst
// can both reach a 16-byte boundary at the same element, a head of fewer than kPack elements
// goes one by one, the body in 16-byte packs, and a tail of fewer than kPack one by one;
// otherwise every element goes one by one (still coalesced).
template <typename Src, typename Dst, bool kScaled>
__device__ __forceinline__ void copy_chunk(const Src* __restrict__ src, Dst* __restrict__ dst,
                                           int n, float scale) {
  const int tid = static_cast<int>(threadIdx.x);
  const auto src_addr = reinterpret_cast<std::uintptr_t>(src);
  const auto dst_addr = reinterpret_cast<std::uintptr_t>(dst);
  const int head = static_cast<int>(((16 - src_addr % 16) % 16) / sizeof(Src));
  const bool packed = src_addr % sizeof(Src) == 0 && head < n &&
                      (dst_addr + static_cast<std::uintptr_t>(head) * sizeof(Dst)) % 16 == 0;
  if (!packed) {
    for (int i = tid; i < n; i += kThreads) dst[i] = convert<Src, Dst, kScaled>(src[i], scale);
    return;
  }
  if (tid < head) dst[tid] = convert<Src, Dst, kScaled>(src[tid], scale);
  const int packs = (n - head) / kPack;
  const Src* __restrict__ s = src + head;
  Dst* __restrict__ d = dst + head;
  constexpr int kRound = kPacksPerRound<Src>;
  static_assert(kRound >= 1 && kPacksPerThread % kRound == 0, "rounds must tile the chunk");
#pragma unroll
  for (int r = 0; r < kPacksPerThread; r += kRound) {
    Pack<Src> in[kRound];
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int p = tid + (r + u) * kThreads;
      if (p < packs) load_pack(in[u], s + p * kPack);
    }
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int p = tid + (r + u) * kThreads;
      if (p >= packs) continue;
      if constexpr (std::is_same_v<Src, Dst> && !kScaled) {
        store_pack(d + p * kPack, in[u]);
      } else {
        Dst x[kPack];
#pragma unroll
        for (int j = 0; j < kPack; ++j)
          x[j] = convert<Src, Dst, kScaled>(pack_get(in[u], j), scale);
        Pack<Dst> out;
        pack_set_all(out, x);
        store_pack(d + p * kPack, out);
      }
    }
  }
  const int tail = head + packs * kPack;
  if (tail + tid < n) dst[tail + tid] = convert<Src, Dst, kScaled>(src[tail + tid], scale);
}

// Writes n <= kFlatChunkElements zeros (+0.0) to dst with the whole block.
template <typename Dst>
__device__ __forceinline__ void zero_chunk(Dst* __restrict__ dst, int n) {
  const int tid = static_cast<int>(threadIdx.x);
  const Dst zero = from_float<Dst>(0.0f);
  const auto addr = reinterpret_cast<std::uintptr_t>(dst);
  int head = static_cast<int>(((16 - addr % 16) % 16) / sizeof(Dst));
  if (addr % sizeof(Dst) != 0 || head > n) head = n;
  if (tid < head) dst[tid] = zero;
  constexpr int kPerVec = 16 / static_cast<int>(sizeof(Dst));
  const int vecs = (n - head) / kPerVec;
  uint4* v = reinterpret_cast<uint4*>(dst + head);
  for (int i = tid; i < vecs; i += kThreads) v[i] = make_uint4(0, 0, 0, 0);
  const int tail = head + vecs * kPerVec;
  if (tail + tid < n) dst[tail + tid] = zero;
}

// The chunk's tensor, its first element and its size.
struct ChunkWork {
  FlatTensor tensor;
  std::int64_t start;
  int n;
};

__device__ __forceinline__ ChunkWork chunk_work(const FlatTensor* __restrict__ tensors,
                                                const FlatChunk* __restrict__ chunks) {
  const FlatChunk chunk = chunks[blockIdx.x];
  ChunkWork w;
  w.tensor = tensors[chunk.tensor];
  w.start = static_cast<std::int64_t>(chunk.index) * kFlatChunkElements;
  const std::int64_t left = w.tensor.numel - w.start;
  w.n = static_cast<int>(left < kFlatChunkElements ? left : kFlatChunkElements);
  return w;
}

template <typename Src, typename Wire>
__device__ __forceinline__ void gather_from(const void* ptr, Wire* __restrict__ dst,
                                            std::int64_t start, int n, float scale) {
  const Src* src = static_cast<const Src*>(ptr) + start;
  if (scale != 1.0f) {
    copy_chunk<Src, Wire, true>(src, dst, n, scale);
  } else {
    copy_chunk<Src, Wire, false>(src, dst, n, scale);
  }
}

template <typename Wire>
__global__ void __launch_bounds__(kThreads)
    flat_gather_kernel(const FlatTensor* __restrict__ tensors, const FlatChunk* __restrict__ chunks,
                       Wire* __restrict__ flat, float scale) {
  const ChunkWork w = chunk_work(tensors, chunks);
  if (w.tensor.mode == FlatMode::kSkip) return;
  Wire* dst = flat + w.tensor.offset + w.start;
  if (w.tensor.mode == FlatMode::kZero) {
    zero_chunk(dst, w.n);
    return;
  }
  switch (w.tensor.dtype) {
    case FlatDtype::kFloat32:
      gather_from<float>(w.tensor.ptr, dst, w.start, w.n, scale);
      break;
    case FlatDtype::kFloat16:
      gather_from<__half>(w.tensor.ptr, dst, w.start, w.n, scale);
      break;
    case FlatDtype::kBFloat16:
      gather_from<__nv_bfloat16>(w.tensor.ptr, dst, w.start, w.n, scale);
      break;
    case FlatDtype::kFloat64:
      gather_from<double>(w.tensor.ptr, dst, w.start, w.n, scale);
      break;
  }
}

template <typename Wire>
__global__ void __launch_bounds__(kThreads)
    flat_scatter_kernel(const FlatTensor* __restrict__ tensors,
                        const FlatChunk* __restrict__ chunks, const Wire* __restrict__ flat) {
  const ChunkWork w = chunk_work(tensors, chunks);
  if (w.tensor.mode != FlatMode::kCopy) return;
  const Wire* src = flat + w.tensor.offset + w.start;
  switch (w.tensor.dtype) {
    case FlatDtype::kFloat32:
      copy_chunk<Wire, float, false>(src, static_cast<float*>(w.tensor.ptr) + w.start, w.n, 1.0f);
      break;
    case FlatDtype::kFloat16:
      copy_chunk<Wire, __half, false>(src, static_cast<__half*>(w.tensor.ptr) + w.start, w.n, 1.0f);
      break;
    case FlatDtype::kBFloat16:
      copy_chunk<Wire, __nv_bfloat16, false>(
          src, static_cast<__nv_bfloat16*>(w.tensor.ptr) + w.start, w.n, 1.0f);
      break;
    case FlatDtype::kFloat64:
      copy_chunk<Wire, double, false>(src, static_cast<double*>(w.tensor.ptr) + w.start, w.n, 1.0f);
      break;
  }
}

bool bad_launch(const FlatTensor* tensors, const FlatChunk* chunks, std::int64_t num_chunks,
                const void* flat) {
  return tensors == nullptr || chunks == nullptr || flat == nullptr || num_chunks < 0 ||
         num_chunks > 0x7fffffff;
}

}  // namespace

cudaError_t flat_gather(const FlatTensor* tensors, const FlatChunk* chunks, std::int64_t num_chunks,
                        void* flat, FlatDtype flat_dtype, float scale,
                        cudaStream_t stream) noexcept {
  if (num_chunks == 0) return cudaSuccess;
  if (bad_launch(tensors, chunks, num_chunks, flat)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_chunks));
  switch (flat_dtype) {
    case FlatDtype::kFloat32:
      flat_gather_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks, static_cast<float*>(flat),
                                                        scale);
      break;
    case FlatDtype::kFloat16:
      flat_gather_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks, static_cast<__half*>(flat),
                                                        scale);
      break;
    case FlatDtype::kBFloat16:
      flat_gather_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks,
                                                        static_cast<__nv_bfloat16*>(flat), scale);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t flat_scatter(const FlatTensor* tensors, const FlatChunk* chunks,
                         std::int64_t num_chunks, const void* flat, FlatDtype flat_dtype,
                         cudaStream_t stream) noexcept {
  if (num_chunks == 0) return cudaSuccess;
  if (bad_launch(tensors, chunks, num_chunks, flat)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_chunks));
  switch (flat_dtype) {
    case FlatDtype::kFloat32:
      flat_scatter_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks,
                                                         static_cast<const float*>(flat));
      break;
    case FlatDtype::kFloat16:
      flat_scatter_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks,
                                                         static_cast<const __half*>(flat));
      break;
    case FlatDtype::kBFloat16:
      flat_scatter_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks,
                                                         static_cast<const __nv_bfloat16*>(flat));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace mpu::kernels
