// Kernels of the device-resident data path: the sort keys of an epoch order, and the gather of
// a batch of uint8 images with random crop (zero padding), horizontal flip and normalisation
// in one pass. The draws are those of cuda/augment_draw.h. Raw pointers and a stream in,
// cudaError_t out; nothing throws, nothing allocates, nothing synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/augment_draw.h"

namespace mpu::kernels {

/// One batch: out[b, c, y, x] for b < batch, from images[indices[b]].
struct AugmentArgs {
  const std::uint8_t* images;   ///< [N, C, H, W], contiguous
  const std::int64_t* indices;  ///< [batch] rows of `images`
  const std::int64_t* epochs;   ///< [batch] the epoch each example is served in
  const std::int64_t* keys;     ///< [N] each row's index in the full dataset (its draw key)
  float* out;                   ///< [batch, C, H, W], contiguous
  std::int64_t batch;
  std::int32_t channels;
  std::int32_t height;
  std::int32_t width;
  std::int32_t padding;    ///< crop an H x W window after this many zeros on every side
  bool flip;               ///< mirror with probability 1/2
  std::uint64_t seed_mix;  ///< mix64(seed) of the augmentation's seed
  float mean[kAugmentMaxChannels];
  float stddev[kAugmentMaxChannels];
};

/// Writes the batch; an empty batch launches nothing.
cudaError_t augment_images(const AugmentArgs& args, cudaStream_t stream);

/// out[i] = order_key(base, i) for i < n.
cudaError_t order_keys(std::int64_t n, std::uint64_t base, std::int64_t* out, cudaStream_t stream);

}  // namespace mpu::kernels
