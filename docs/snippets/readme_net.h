// The `Net` of the README's example, which the README leaves out: CMake force-includes this
// header when it compiles docs/snippets/readme.cpp (the README's code block, verbatim).
#pragma once

#include <torch/torch.h>

struct Net : torch::nn::Module {
  torch::nn::Sequential body{torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)),
                             torch::nn::ReLU(),
                             torch::nn::MaxPool2d(2),
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1)),
                             torch::nn::ReLU(),
                             torch::nn::MaxPool2d(2),
                             torch::nn::Flatten(),
                             torch::nn::Linear(32 * 7 * 7, 10)};
  Net() { register_module("body", body); }
  torch::Tensor forward(const torch::Tensor& x) { return body->forward(x); }
};
