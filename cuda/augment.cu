#include "cuda/augment.h"

#include "cuda/augment_draw.h"

namespace mpu::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void augment_kernel(AugmentArgs a) {
  const std::int64_t plane = static_cast<std::int64_t>(a.height) * a.width;
  const std::int64_t per_image = plane * a.channels;
  const std::int64_t total = a.batch * per_image;
  for (std::int64_t o = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t b = o / per_image;
    const std::int64_t rest = o - b * per_image;
    const int c = static_cast<int>(rest / plane);
    const int y = static_cast<int>((rest - c * plane) / a.width);
    const int x = static_cast<int>(rest - c * plane - static_cast<std::int64_t>(y) * a.width);
    const std::int64_t row = a.indices[b];
    const std::uint64_t r = derive_from_mix(a.seed_mix, static_cast<std::uint64_t>(a.epochs[b]),
                                            static_cast<std::uint64_t>(a.keys[row]));
    const AugmentDraw d = augment_draw(r, a.padding, a.flip);
    const int sy = y + d.dy - a.padding;
    const int sx = (d.flip ? a.width - 1 - x : x) + d.dx - a.padding;
    float v = 0.0f;
    if (sy >= 0 && sy < a.height && sx >= 0 && sx < a.width) {
      v = static_cast<float>(a.images[row * per_image + c * plane +
                                      static_cast<std::int64_t>(sy) * a.width + sx]) /
          255.0f;
    }
    a.out[o] = (v - a.mean[c]) / a.stddev[c];
  }
}

__global__ void order_keys_kernel(std::int64_t n, std::uint64_t base, std::int64_t* out) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    out[i] = order_key(base, i);
  }
}

unsigned int blocks_for(std::int64_t n) {
  const std::int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 65535 ? b : 65535);
}

}  // namespace

cudaError_t augment_images(const AugmentArgs& args, cudaStream_t stream) {
  const std::int64_t total =
      args.batch * args.channels * static_cast<std::int64_t>(args.height) * args.width;
  if (total <= 0) return cudaSuccess;
  augment_kernel<<<blocks_for(total), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t order_keys(std::int64_t n, std::uint64_t base, std::int64_t* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  order_keys_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, base, out);
  return cudaGetLastError();
}

}  // namespace mpu::kernels
