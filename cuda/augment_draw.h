// The random draws of the device-resident data path, shared by the CUDA kernels and the CPU
// loops of src/data/device_dataset.cpp, so that both produce the same bits.
//
// Everything is a pure function of 64-bit keys through SplitMix64's finaliser (Steele, Lea,
// Flood 2014), the mixing function mpu::derive_seed uses:
// - epoch order: the order of epoch e sorts the positions i = 0..n-1 by the key
//   mix(base ^ i), base = derive_seed(seed, e, kOrderStream). The finaliser is a bijection of
//   64-bit words, so the keys of distinct positions differ and the sort has no ties: every
//   sort gives the same permutation, on any device.
// - augmentation: example k (its index in the full dataset) served in epoch e draws
//   r = derive_seed(seed, e, k); its crop offsets are (r & 0xffff) and ((r >> 16) & 0xffff)
//   modulo 2 * padding + 1, and it is flipped when bit 32 of r is set.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MPU_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MPU_HOST_DEVICE inline
#endif

namespace mpu::kernels {

/// Channels a normalisation can hold one mean and deviation for.
inline constexpr int kAugmentMaxChannels = 4;

/// The stream key of epoch orders (derive_seed(seed, epoch, kOrderStream)).
inline constexpr std::uint64_t kOrderStream = 0x6f72646572ULL;  // "order"

/// SplitMix64's step: add the golden gamma, then its finaliser.
MPU_HOST_DEVICE std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// mpu::derive_seed(seed, a, b) when `seed_mix` is mix64(seed).
MPU_HOST_DEVICE std::uint64_t derive_from_mix(std::uint64_t seed_mix, std::uint64_t a,
                                              std::uint64_t b) {
  return mix64(mix64(seed_mix ^ a) ^ b);
}

/// The sort key of position `i` of an epoch whose base is `base`.
MPU_HOST_DEVICE std::int64_t order_key(std::uint64_t base, std::int64_t i) {
  return static_cast<std::int64_t>(mix64(base ^ static_cast<std::uint64_t>(i)));
}

/// One example's crop offsets (in [0, 2 * padding]) and flip, from its draw `r`.
struct AugmentDraw {
  std::int32_t dy;
  std::int32_t dx;
  bool flip;
};

MPU_HOST_DEVICE AugmentDraw augment_draw(std::uint64_t r, std::int32_t padding, bool flip) {
  const std::uint32_t span = 2u * static_cast<std::uint32_t>(padding) + 1u;
  AugmentDraw d;
  d.dy = static_cast<std::int32_t>((r & 0xffffu) % span);
  d.dx = static_cast<std::int32_t>(((r >> 16) & 0xffffu) % span);
  d.flip = flip && ((r >> 32) & 1u) != 0;
  return d;
}

}  // namespace mpu::kernels
