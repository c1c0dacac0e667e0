// The one place where LibTorch 1.13 (Debian's libtorch-dev) and LibTorch 2.x (the PyTorch
// wheel) differ for torch-mpu. Everything else includes this header and stays version-free.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <sstream>
#include <string>
#include <type_traits>

#define MPU_TORCH_VERSION (TORCH_VERSION_MAJOR * 10000 + TORCH_VERSION_MINOR * 100)

static_assert(MPU_TORCH_VERSION >= 11300, "torch-mpu needs LibTorch 1.13 or newer");

namespace mpu::detail {

/// True when built against LibTorch 2.x.
inline constexpr bool kTorch2 = TORCH_VERSION_MAJOR >= 2;

/// The key type of `torch::optim::Optimizer::state()`: std::string in LibTorch 1.13, void* in
/// 2.x (what `optimizer_state_key` returns).
using OptimizerStateKey =
    std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())>::key_type;

/// The type of the `step` count in the per-parameter state of Adam, AdamW, Adagrad and RMSprop
/// (int64_t in 1.13 and 2.x, checked here so that a change shows up as a compile error in one
/// place).
using OptimizerStepCount =
    std::decay_t<decltype(std::declval<torch::optim::AdamParamState&>().step())>;
static_assert(std::is_integral_v<OptimizerStepCount>,
              "torch-mpu expects an integral step count in torch::optim's param states");

/// The key under which `torch::optim` keeps a parameter's state: the address of its TensorImpl
/// as a string in LibTorch 1.13, the address itself in 2.x. (A template only so that the branch
/// that does not apply is never compiled.)
template <typename Opt = torch::optim::Optimizer>
auto optimizer_state_key(const torch::Tensor& p) {
  using Key = typename std::decay_t<decltype(std::declval<Opt&>().state())>::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

/// Turns LibTorch's autocast on for `device_type` (kCPU or kCUDA) with `dtype` for its lifetime,
/// as torch.autocast does: the previous state comes back, and the cast cache is cleared when
/// the outermost scope ends. `enabled` false: does nothing.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType device_type, at::ScalarType dtype, bool enabled = true)
      : device_type_(device_type), enabled_(enabled) {
    if (!enabled_) return;
    was_enabled_ = is_enabled();
    was_dtype_ = get_dtype();
    set_enabled(true);
    set_dtype(dtype);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    set_enabled(was_enabled_);
    set_dtype(was_dtype_);
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool cuda() const { return device_type_ == c10::DeviceType::CUDA; }
#if TORCH_VERSION_MAJOR >= 2
  bool is_enabled() const {
    return at::autocast::is_autocast_enabled(device_type_);
  }
  void set_enabled(bool on) const {
    at::autocast::set_autocast_enabled(device_type_, on);
  }
  at::ScalarType get_dtype() const {
    return at::autocast::get_autocast_dtype(device_type_);
  }
  void set_dtype(at::ScalarType d) const {
    at::autocast::set_autocast_dtype(device_type_, d);
  }
#else
  bool is_enabled() const {
    return cuda() ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
  }
  void set_enabled(bool on) const {
    cuda() ? at::autocast::set_enabled(on) : at::autocast::set_cpu_enabled(on);
  }
  at::ScalarType get_dtype() const {
    return cuda() ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
  }
  void set_dtype(at::ScalarType d) const {
    cuda() ? at::autocast::set_autocast_gpu_dtype(d) : at::autocast::set_autocast_cpu_dtype(d);
  }
#endif

  c10::DeviceType device_type_;
  bool enabled_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

/// Whether LibTorch's autocast can run `dtype` on `device_type`: CUDA takes fp16 and bf16; the
/// CPU takes bf16, and fp16 from LibTorch 2.x on.
inline bool autocast_supports(c10::DeviceType device_type, at::ScalarType dtype) {
  if (device_type == c10::DeviceType::CUDA) {
    return dtype == at::kHalf || dtype == at::kBFloat16;
  }
  if (device_type != c10::DeviceType::CPU) return false;
  return dtype == at::kBFloat16 || (kTorch2 && dtype == at::kHalf);
}

}  // namespace mpu::detail

// --- CUDA graphs: only for the *_cuda.cpp files, which define MPU_TORCH_COMPAT_CUDA_GRAPH
// ---------
#ifdef MPU_TORCH_COMPAT_CUDA_GRAPH
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>

namespace mpu::detail {

/// Begins capturing `graph` on the current stream. LibTorch 2.x: in thread-local mode, so that
/// another thread's CUDA calls (a prefetching data loader pinning memory) do not break the
/// capture; 1.13 has global mode only.
inline void capture_begin_thread_local(at::cuda::CUDAGraph& graph) {
#if TORCH_VERSION_MAJOR >= 2
  graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
#else
  graph.capture_begin();
#endif
}

/// After a capture that failed before capture_end() completed: the caching allocator stops
/// sending the capture stream's allocations to the graph's pool, and the pool is released.
inline void abandon_capture_pool(at::cuda::CUDAGraph& graph, c10::DeviceIndex device) {
#if TORCH_VERSION_MAJOR >= 2
  auto* allocator = c10::cuda::CUDACachingAllocator::get();
  allocator->endAllocateToPool(device, graph.pool());
  allocator->releasePool(device, graph.pool());
#else
  (void)graph;
  (void)device;
#endif
}

}  // namespace mpu::detail
#endif  // MPU_TORCH_COMPAT_CUDA_GRAPH
