/// \file
/// The unit of data that loss functions, iterators and the Evaluator exchange.
#pragma once

#include <torch/torch.h>

namespace mpu {

/// One mini-batch: `data` (first dimension is the batch) and `target`.
using Batch = torch::data::Example<torch::Tensor, torch::Tensor>;

}  // namespace mpu
