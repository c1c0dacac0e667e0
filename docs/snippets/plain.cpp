// A plain single-device LibTorch training loop: Fashion-MNIST, a small CNN, SGD.
// Usage: plain [data directory] [epochs]
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>

struct NetImpl : torch::nn::Module {
  torch::nn::Sequential body{torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)),
                             torch::nn::ReLU(),
                             torch::nn::MaxPool2d(2),
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1)),
                             torch::nn::ReLU(),
                             torch::nn::MaxPool2d(2),
                             torch::nn::Flatten(),
                             torch::nn::Linear(32 * 7 * 7, 10)};
  NetImpl() { register_module("body", body); }
  torch::Tensor forward(const torch::Tensor& x) { return body->forward(x); }
};

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "data/fashion-mnist";
  const int epochs = argc > 2 ? std::atoi(argv[2]) : 2;
  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  torch::manual_seed(0);

  auto model = std::make_shared<NetImpl>();
  model->to(device);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto train = torch::data::datasets::MNIST(dir).map(torch::data::transforms::Stack<>());
  auto loader = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(
      std::move(train), torch::data::DataLoaderOptions(64));

  torch::Tensor last_loss;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    for (auto& batch : *loader) {
      auto data = batch.data.to(device), target = batch.target.to(device);
      opt.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(data), target);
      loss.backward();
      opt.step();
      last_loss = loss.detach();
    }
    std::cout << "epoch " << epoch << " loss " << last_loss.item<float>() << std::endl;
  }
  return 0;
}
