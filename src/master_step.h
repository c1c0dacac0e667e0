// The per-iteration synchronisation of the MasterStep strategy (the seed's), shared by
// MultiprocessParallelUpdater (master and workers) and DistributedUpdater.
//
// Every rank calls the same methods in the same order. Streams: the communicator orders its
// collectives after torch's current stream and makes torch's current stream wait for them, so
// callers need no host synchronisation; the optimizer step on rank 0 runs on torch's current
// stream after the reduce.
#pragma once

#include <torch/torch.h>

#include "mpu/communicator.h"
#include "mpu/flat_buffer.h"
#include "mpu/scaling.h"

namespace mpu::detail {

/// Moves every tensor of the optimizer's per-parameter state to `device`. Needed because
/// Adagrad creates its state in its constructor, before the model reaches its device.
void move_optimizer_state(torch::optim::Optimizer& optimizer, const torch::Device& device);

/// Gradients reduced to rank 0, parameters broadcast from rank 0, over one flat buffer.
class MasterStep {
 public:
  /// `model` must already be on `comm.device()`. When every parameter is fp32 and the wire is
  /// fp32, parameters and gradients become views into the flat buffers (zero-copy).
  MasterStep(torch::nn::Module& model, Communicator& comm, Reduction reduction,
             torch::Dtype wire_dtype);

  /// Zeros every gradient (one fill in zero-copy mode).
  void zero_grad() { flat_.zero_grad(); }
  /// After backward, on every rank: rank 0's gradients become the sum (or mean) over ranks.
  void reduce_gradients();
  /// After rank 0's optimizer step, on every rank: the other ranks receive rank 0's parameters.
  void broadcast_parameters();
  /// On every rank: buffers (BatchNorm statistics, counters) are copied from rank 0. Integer
  /// buffers travel as fp32, exact up to 2^24.
  void broadcast_buffers();
  /// On every rank: throws `mpu::InvalidArgument` on every rank when parameter names, shapes
  /// or dtypes differ between ranks; the differing rank's message names the first difference.
  void check_same_layout();

  const FlatBuffer& flat() const { return flat_; }

 private:
  torch::nn::Module& model_;
  Communicator& comm_;
  Reduction reduction_;
  torch::Dtype wire_dtype_;
  FlatBuffer flat_;
  torch::Tensor grad_wire_;   // gradients on the wire, when they are not the flat buffer itself
  torch::Tensor param_wire_;  // parameters on the wire, when they are not the flat buffer itself
};

}  // namespace mpu::detail
