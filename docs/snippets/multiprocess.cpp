// The same training on every local GPU (or 2 CPU processes): MultiprocessParallelUpdater.
// Usage: multiprocess [data directory] [epochs, fractions allowed]
#include <mpu/mpu.h>

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
  const double epochs = argc > 2 ? std::atof(argv[2]) : 2;
  const auto devices = mpu::local_gpus();  // cuda:0..n-1 through NVML, or {cpu, cpu}
  mpu::manual_seed(0);                     // CPU only: CUDA must stay untouched before the fork

  auto model = std::make_shared<NetImpl>();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto train = mpu::make_dataset(torch::data::datasets::MNIST(dir));
  auto iterators = mpu::split_iterators(train, static_cast<int>(devices.size()), 64);

  torch::Tensor last_loss;
  auto loss_fn = [&](const mpu::Batch& batch) {
    auto loss = torch::nn::functional::cross_entropy(model->forward(batch.data), batch.target);
    last_loss = loss.detach();
    return loss;
  };
  mpu::MultiprocessParallelUpdater updater(model, opt, iterators, loss_fn, devices);
  while (updater.epoch_detail() < epochs) {
    updater.update();  // forward, backward, gradients summed on the master, step, broadcast
    if (updater.is_new_epoch() || updater.epoch_detail() >= epochs) {
      std::cout << "epoch " << updater.epoch_detail() << " loss " << last_loss.item<float>()
                << std::endl;
    }
  }
  updater.finalize();
  return 0;
}
