// The device-resident data path's kernels as the library calls them (device_dataset.cpp): the
// CPU loops here, the CUDA launches in device_dataset_cuda.cpp. Both follow
// cuda/augment_draw.h, so they give the same bits.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "cuda/augment_draw.h"
#include "mpu/config.h"

namespace mpu::detail {

/// What the augmentation kernel needs besides the tensors (kernels::AugmentArgs less them).
struct AugmentSpec {
  std::int32_t channels = 1;
  std::int32_t height = 0;
  std::int32_t width = 0;
  std::int32_t padding = 0;
  bool flip = false;
  std::uint64_t seed_mix = 0;
  float mean[kernels::kAugmentMaxChannels] = {};
  float stddev[kernels::kAugmentMaxChannels] = {};
};

/// out (int64 [n], contiguous) = the order keys of `base`, on out's device.
void fill_order_keys(torch::Tensor& out, std::uint64_t base);

/// out (float32 [B, C, H, W], contiguous) = the augmented examples `indices` of `images`
/// (uint8 [N, C, H, W]), example b served in epoch epochs[b]; every tensor on one device.
void augment_into(const AugmentSpec& spec, const torch::Tensor& images,
                  const torch::Tensor& indices, const torch::Tensor& epochs,
                  const torch::Tensor& keys, torch::Tensor& out);

#if MPU_HAS_CUDA
void fill_order_keys_cuda(torch::Tensor& out, std::uint64_t base);
void augment_into_cuda(const AugmentSpec& spec, const torch::Tensor& images,
                       const torch::Tensor& indices, const torch::Tensor& epochs,
                       const torch::Tensor& keys, torch::Tensor& out);
/// Free bytes on `device` (cudaMemGetInfo).
std::int64_t free_device_bytes(const torch::Device& device);
#endif

}  // namespace mpu::detail
