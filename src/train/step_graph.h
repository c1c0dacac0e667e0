// The whole-step CUDA graph of UpdaterOptions::cuda_graph: eager warm-up steps, one captured
// step, then replays with the batch copied into the captured input tensors and the optimizer's
// scalars staged on the device before each replay.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>

#include "mpu/iterator.h"
#include "mpu/updater.h"

namespace mpu::detail {

class SyncEngine;

/// Throws InvalidArgument, naming `who` and the option, when `options.cuda_graph` is on and
/// this updater cannot capture its step: not a CUDA device, more than one process, an fp16
/// policy (host-side overflow verdict), skip_nonfinite, accumulation_steps != 1, flat_step off,
/// or cuda_graph_warmup < 1. Does nothing when cuda_graph is off.
void check_cuda_graph(const UpdaterOptions& options, const torch::Device& device, int processes,
                      const char* who);

/// One updater's captured step. Every step runs on a stream of its own that waits for the
/// caller's current stream before and that the caller's stream waits for after, so the caller
/// sees the step as if it ran on its stream; no host synchronisation either way.
class StepGraph {
 public:
  virtual ~StepGraph() = default;
  /// One step: the next batch of `iterator`, forward and backward, `engine.finish(iteration)`;
  /// eager for the warm-up steps and for a batch whose shapes differ from the captured one,
  /// else a replay of the captured step (captured at the first step after the warm-up).
  virtual void step(Iterator& iterator, const UpdaterOptions& options, const LossFunction& loss_fn,
                    SyncEngine& engine, std::int64_t iteration) = 0;
  /// Steps replayed from the graph so far (the capture's own step counts as one).
  virtual std::int64_t replays() const = 0;
};

/// The step graph for `device` (CUDA); throws InvalidArgument on a build without CUDA.
std::unique_ptr<StepGraph> make_step_graph(const UpdaterOptions& options,
                                           const torch::Device& device);

}  // namespace mpu::detail
