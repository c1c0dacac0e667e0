// Pieces shared by the updaters' implementations.
#pragma once

#include <torch/torch.h>

#include <functional>

#include "mpu/error.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"

namespace mpu::detail {

/// Throws `InvalidArgument` when `model` has no parameter with elements.
inline void check_has_parameters(torch::nn::Module& model, const char* who) {
  std::int64_t n = 0;
  for (const auto& p : model.parameters()) n += p.numel();
  MPU_CHECK(n > 0, who, ": the model has no parameters (", model.parameters().size(),
            " parameter tensors, 0 elements); there is nothing to train");
}

/// Zeros every defined gradient in place, keeping views (unlike set_to_none).
inline void zero_grads(torch::nn::Module& model) {
  for (auto& p : model.parameters()) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
}

/// Next batch, converter, loss (under the reporter scope "main"), `zero_grad()`, backward.
/// Returns the loss.
torch::Tensor forward_backward(Iterator& iterator, const UpdaterOptions& options,
                               const LossFunction& loss_fn, const torch::Device& device,
                               const std::function<void()>& zero_grad);

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
