// The tables that the flat gather/scatter kernels read: one entry per tensor, one per chunk.
// Plain structs without CUDA headers, so that the host code that builds them compiles anywhere.
#pragma once

#include <cstdint>

namespace mpu::kernels {

/// Element type of a packed tensor or of the flat buffer. The flat buffer is never kFloat64.
enum class FlatDtype : std::int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

/// What the kernels do with a tensor.
enum class FlatMode : std::int32_t {
  kCopy = 0,  ///< gather reads it, scatter writes it
  kZero = 1,  ///< gather writes zeros to its slot (a missing gradient); scatter skips it
  kSkip = 2,  ///< both leave it alone (the caller handles it, e.g. a non-contiguous tensor)
};

/// One packed tensor. `ptr` points at its first element; its elements are contiguous.
struct FlatTensor {
  void* ptr;
  std::int64_t offset;  ///< index of its first element in the flat buffer
  std::int64_t numel;
  FlatDtype dtype;
  FlatMode mode;
};
static_assert(sizeof(FlatTensor) == 32, "FlatTensor is uploaded as raw bytes");

/// One block's work: elements [index * kFlatChunkElements, +kFlatChunkElements) of a tensor,
/// clipped to its size.
struct FlatChunk {
  std::int32_t tensor;
  std::int32_t index;
};
static_assert(sizeof(FlatChunk) == 8, "FlatChunk is uploaded as raw bytes");

/// Elements per chunk. Each block of kFlatBlockThreads threads moves one chunk, in packs of
/// kFlatPackElements elements (16-byte loads and stores where the addresses allow).
inline constexpr std::int64_t kFlatChunkElements = 16384;
inline constexpr int kFlatBlockThreads = 256;
inline constexpr int kFlatPackElements = 8;

/// Number of chunks of a tensor of `numel` elements.
constexpr std::int64_t flat_chunk_count(std::int64_t numel) {
  return (numel + kFlatChunkElements - 1) / kFlatChunkElements;
}

}  // namespace mpu::kernels
