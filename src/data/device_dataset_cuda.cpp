// CUDA launches of the device-resident data path: device guard, current stream, launch, check.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "cuda/augment.h"
#include "data/device_dataset_impl.h"
#include "mpu/error.h"

namespace mpu::detail {

void fill_order_keys_cuda(torch::Tensor& out, std::uint64_t base) {
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  MPU_CUDA_CHECK(kernels::order_keys(out.numel(), base, out.data_ptr<std::int64_t>(), stream));
}

void augment_into_cuda(const AugmentSpec& spec, const torch::Tensor& images,
                       const torch::Tensor& indices, const torch::Tensor& epochs,
                       const torch::Tensor& keys, torch::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  kernels::AugmentArgs a{};
  a.images = images.data_ptr<std::uint8_t>();
  a.indices = indices.data_ptr<std::int64_t>();
  a.epochs = epochs.data_ptr<std::int64_t>();
  a.keys = keys.data_ptr<std::int64_t>();
  a.out = out.data_ptr<float>();
  a.batch = out.size(0);
  a.channels = spec.channels;
  a.height = spec.height;
  a.width = spec.width;
  a.padding = spec.padding;
  a.flip = spec.flip;
  a.seed_mix = spec.seed_mix;
  std::copy(std::begin(spec.mean), std::end(spec.mean), std::begin(a.mean));
  std::copy(std::begin(spec.stddev), std::end(spec.stddev), std::begin(a.stddev));
  MPU_CUDA_CHECK(kernels::augment_images(a, stream));
}

std::int64_t free_device_bytes(const torch::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  std::size_t free = 0;
  std::size_t total = 0;
  MPU_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<std::int64_t>(free);
}

}  // namespace mpu::detail
