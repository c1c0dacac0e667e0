// The one place where LibTorch 1.13 (Debian's libtorch-dev) and LibTorch 2.x (the PyTorch
// wheel) differ for torch-mpu. Everything else includes this header and stays version-free.
#pragma once

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

}  // namespace mpu::detail
