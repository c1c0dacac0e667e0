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

// --- Groups: G consecutive elements moved with one vector load or store -----------------------
// A group of G elements of T is G * sizeof(T) = 4, 8 or 16 bytes, held as 1, 2 or 4 32-bit words
// (element 0 in the low bits, as in memory).
template <typename T, int G>
struct Group {
  static constexpr int kBytes = G * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16,
                "a group is one 4-, 8- or 16-byte vector");
  static constexpr int kWords = kBytes / 4;
  unsigned w[kWords];
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

// Element i of a group. Bit operations, not pointer casts, so that the group stays in registers
// and its loads and stores stay one vector wide.
template <typename T, int G>
__device__ __forceinline__ T group_get(const Group<T, G>& g, int i) {
  if constexpr (sizeof(T) == 2) {
    return from_bits<T>(g.w[i / 2] >> (16 * (i % 2)));
  } else if constexpr (sizeof(T) == 4) {
    return from_bits<T>(g.w[i]);
  } else {
    const unsigned long long lo = g.w[2 * i];
    const unsigned long long hi = g.w[2 * i + 1];
    return from_bits<T>(lo | (hi << 32));
  }
}

// A group made of G elements.
template <typename T, int G>
__device__ __forceinline__ void group_set_all(Group<T, G>& g, const T (&x)[G]) {
#pragma unroll
  for (int j = 0; j < Group<T, G>::kWords; ++j) {
    if constexpr (sizeof(T) == 2) {
      g.w[j] = to_bits(x[2 * j]) | (to_bits(x[2 * j + 1]) << 16);
    } else if constexpr (sizeof(T) == 4) {
      g.w[j] = to_bits(x[j]);
    } else {
      g.w[j] = static_cast<unsigned>(to_bits(x[j / 2]) >> (32 * (j % 2)));
    }
  }
}

// `src` must be aligned to the group's size.
template <typename T, int G>
__device__ __forceinline__ void load_group(Group<T, G>& g, const T* __restrict__ src) {
  if constexpr (Group<T, G>::kWords == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    g.w[0] = v.x;
    g.w[1] = v.y;
    g.w[2] = v.z;
    g.w[3] = v.w;
  } else if constexpr (Group<T, G>::kWords == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
    g.w[0] = v.x;
    g.w[1] = v.y;
  } else {
    g.w[0] = __ldg(reinterpret_cast<const unsigned*>(src));
  }
}

// `dst` must be aligned to the group's size.
template <typename T, int G>
__device__ __forceinline__ void store_group(T* __restrict__ dst, const Group<T, G>& g) {
  if constexpr (Group<T, G>::kWords == 4) {
    __stwb(reinterpret_cast<uint4*>(dst), make_uint4(g.w[0], g.w[1], g.w[2], g.w[3]));
  } else if constexpr (Group<T, G>::kWords == 2) {
    __stwb(reinterpret_cast<uint2*>(dst), make_uint2(g.w[0], g.w[1]));
  } else {
    __stwb(reinterpret_cast<unsigned*>(dst), g.w[0]);
  }
}

// Elements per group when moving Src to Dst: as many as fill 16 bytes of the wider type, so the
// wide side moves 16-byte vectors and the narrow side 8- or 4-byte ones (8 for 2-byte pairs,
// 4 when a 4-byte type is involved, 2 when an 8-byte type is).
template <typename Src, typename Dst>
constexpr int kGroupElements = 16 / static_cast<int>(sizeof(Src) > sizeof(Dst) ? sizeof(Src)
                                                                               : sizeof(Dst));

// Packs loaded before the first store: 128 bytes of source per thread per round, so that every
// source dtype keeps the same number of bytes in flight and the same register budget. (64 bytes
// left fp32 gathers at 78% of a D2D copy on an H200: too few loads in flight.)
template <typename T>
constexpr int kPacksPerRound = 128 / (kPack * static_cast<int>(sizeof(T))) < kPacksPerThread
                                   ? 128 / (kPack * static_cast<int>(sizeof(T)))
                                   : kPacksPerThread;

// Moves n <= kFlatChunkElements elements from src to dst with the whole block.
//
// Layout. The wide side is the one with the larger element type (src on a tie). When the wide
// side can reach a 16-byte boundary at element `head` (< 16 / its element size) and, at that
// element, the narrow side is aligned to its vector size, then:
//   - elements [0, head) go one by one;
//   - the body goes in groups of G = kGroupElements consecutive elements, group g covering
//     elements head + g*G ... head + g*G + G-1 and moved by thread g % kThreads, so a thread's
//     i-th group is g = tid + i*kThreads. Each thread thus still moves kPack elements per round
//     of kThreads packs (kPack / G groups, kThreads*G elements apart), and consecutive threads
//     touch consecutive vectors on both sides: every warp load and store is fully coalesced;
//   - a tail of fewer than G elements goes one by one.
// Otherwise every element goes one by one (still coalesced). Every element is converted on its
// own, so the layout does not change any result.
template <typename Src, typename Dst, bool kScaled>
__device__ __forceinline__ void copy_chunk(const Src* __restrict__ src, Dst* __restrict__ dst,
                                           int n, float scale) {
  constexpr int G = kGroupElements<Src, Dst>;
  static_assert(kPack % G == 0, "a pack must be a whole number of groups");
  constexpr bool kSrcWide = sizeof(Src) >= sizeof(Dst);
  constexpr std::uintptr_t kWideSize = kSrcWide ? sizeof(Src) : sizeof(Dst);
  constexpr std::uintptr_t kSrcVec = G * sizeof(Src);
  constexpr std::uintptr_t kDstVec = G * sizeof(Dst);
  static_assert((kSrcWide ? kSrcVec : kDstVec) == 16, "the wide side moves 16-byte vectors");

  const int tid = static_cast<int>(threadIdx.x);
  const auto src_addr = reinterpret_cast<std::uintptr_t>(src);
  const auto dst_addr = reinterpret_cast<std::uintptr_t>(dst);
  const std::uintptr_t wide_addr = kSrcWide ? src_addr : dst_addr;
  const int head = static_cast<int>(((16 - wide_addr % 16) % 16) / kWideSize);
  const auto h = static_cast<std::uintptr_t>(head);
  // These also imply that src and dst are aligned to their element sizes.
  const bool packed = head < n && (src_addr + h * sizeof(Src)) % kSrcVec == 0 &&
                      (dst_addr + h * sizeof(Dst)) % kDstVec == 0;
  if (!packed) {
    for (int i = tid; i < n; i += kThreads) dst[i] = convert<Src, Dst, kScaled>(src[i], scale);
    return;
  }
  if (tid < head) dst[tid] = convert<Src, Dst, kScaled>(src[tid], scale);
  const int groups = (n - head) / G;
  // This thread's groups are tid + i*kThreads for i < mine.
  const int mine = tid < groups ? (groups - tid + kThreads - 1) / kThreads : 0;
  const Src* __restrict__ s = src + head + tid * G;
  Dst* __restrict__ d = dst + head + tid * G;
  // groups <= n / G <= kThreads * kGroupsPerThread, so the loop below reaches every group.
  constexpr int kGroupsPerThread = kPacksPerThread * (kPack / G);
  constexpr int kGroupsPerRound = kPacksPerRound<Src> * (kPack / G);
  static_assert(kGroupsPerRound >= 1 && kGroupsPerThread % kGroupsPerRound == 0,
                "rounds must tile the chunk");
  static_assert(static_cast<std::int64_t>(kThreads) * kGroupsPerThread * G == kFlatChunkElements,
                "the groups of all threads must cover a chunk");
#pragma unroll
  for (int r = 0; r < kGroupsPerThread; r += kGroupsPerRound) {
    Group<Src, G> in[kGroupsPerRound];
#pragma unroll
    for (int u = 0; u < kGroupsPerRound; ++u) {
      if (r + u < mine) load_group(in[u], s + (r + u) * (kThreads * G));
    }
#pragma unroll
    for (int u = 0; u < kGroupsPerRound; ++u) {
      if (r + u >= mine) continue;
      Dst* __restrict__ out_ptr = d + (r + u) * (kThreads * G);
      if constexpr (std::is_same_v<Src, Dst> && !kScaled) {
        store_group(out_ptr, in[u]);
      } else {
        Dst x[G];
#pragma unroll
        for (int j = 0; j < G; ++j) x[j] = convert<Src, Dst, kScaled>(group_get(in[u], j), scale);
        Group<Dst, G> out;
        group_set_all(out, x);
        store_group(out_ptr, out);
      }
    }
  }
  const int tail = head + groups * G;
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

// ptxas gives the gather 48 registers either way, but spills a few bytes unless told to aim at
// this many blocks per SM (65536 / (5 * 256) = 51 registers). The scatter needs more registers
// and keeps the default bound.
constexpr int kGatherMinBlocks = 5;

template <typename Wire>
__global__ void __launch_bounds__(kThreads, kGatherMinBlocks)
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
