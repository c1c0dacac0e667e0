// Pieces shared by the updaters' implementations.
#pragma once

#include <torch/torch.h>

#include <functional>

#include "mpu/error.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"

namespace mpu::detail {

/// Throws `InvalidArgument` naming the parameter when one is not floating-point (integer state
/// belongs in a buffer), or when the parameters lie on more than one device (the updaters move
/// the whole model to one device per process: no model parallelism).
inline void check_parameter_types(torch::nn::Module& model, const char* who) {
  std::string first_name;
  torch::Device first_device = torch::kCPU;
  for (const auto& p : model.named_parameters(true)) {
    const torch::Tensor& t = p.value();
    MPU_CHECK(t.is_floating_point(), who, ": parameter '", p.key(), "' has dtype ",
              c10::toString(t.scalar_type()),
              "; only floating-point parameters (Float, Double, Half, BFloat16) can be trained. "
              "Register integer state with register_buffer");
    // A meta tensor has a shape but no storage (a model built under a meta-device guard, or
    // loaded lazily): it would only fail at the first update, deep inside the packing layer.
    MPU_CHECK(t.device().type() != c10::DeviceType::Meta, who, ": parameter '", p.key(),
              "' is on the meta device (shape ", t.sizes(),
              ", no storage); materialise the model's parameters (build it on the CPU or a GPU, or "
              "load its weights) before handing it to the updater");
    if (first_name.empty()) {
      first_name = p.key();
      first_device = t.device();
    }
    MPU_CHECK(t.device() == first_device, who, ": the parameters are on more than one device: '",
              first_name, "' is on ", first_device.str(), ", '", p.key(), "' is on ",
              t.device().str(),
              ". Data-parallel updaters move the whole model to one device per process (no "
              "model parallelism); put every parameter on one device");
  }
}

/// Throws `InvalidArgument` when `model` has no parameter with elements, or one that
/// `check_parameter_types` refuses.
inline void check_has_parameters(torch::nn::Module& model, const char* who) {
  std::int64_t n = 0;
  for (const auto& p : model.parameters()) n += p.numel();
  MPU_CHECK(n > 0, who, ": the model has no parameters (", model.parameters().size(),
            " parameter tensors, 0 elements); there is nothing to train");
  check_parameter_types(model, who);
}

/// Zeros every defined gradient in place, keeping views (unlike set_to_none).
inline void zero_grads(torch::nn::Module& model) {
  for (auto& p : model.parameters()) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
}

/// Next batch, converter, loss (under the reporter scope "main" and, for the precision policies,
/// autocast), `zero_grad()`, backward of the loss times `loss_scale`.
/// Returns the loss.
torch::Tensor forward_backward(Iterator& iterator, const UpdaterOptions& options,
                               const LossFunction& loss_fn, const torch::Device& device,
                               const std::function<void()>& zero_grad, double loss_scale = 1.0);

/// The same for a batch already on the device: loss, `zero_grad()`, backward.
torch::Tensor forward_backward_on(const Batch& on_device, const UpdaterOptions& options,
                                  const LossFunction& loss_fn, const torch::Device& device,
                                  const std::function<void()>& zero_grad, double loss_scale = 1.0);

class SyncEngine;

/// One data-parallel step on this rank: `options.accumulation_steps` micro-batches (forward and
/// backward; gradients zeroed before the first), then `engine.finish(iteration)`.
void data_parallel_step(Iterator& iterator, const UpdaterOptions& options,
                        const LossFunction& loss_fn, const torch::Device& device,
                        SyncEngine& engine, std::int64_t iteration);

void save_state(torch::serialize::OutputArchive& archive, const torch::nn::Module& model,
                const torch::optim::Optimizer& optimizer, const Iterator& iterator,
                std::int64_t iteration);

/// Loads what `save_state` wrote and returns the iteration; moves model and optimizer state to
/// `device`. Throws `InvalidArgument` naming what does not match.
std::int64_t load_state(torch::serialize::InputArchive& archive, torch::nn::Module& model,
                        torch::optim::Optimizer& optimizer, Iterator& iterator,
                        const torch::Device& device);

}  // namespace mpu::detail
