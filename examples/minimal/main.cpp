// The smallest complete torch-mpu program: a small network trained on Fashion-MNIST with
// MultiprocessParallelUpdater on every local GPU, or on 2 CPU processes where there is none.
// Usage: mpu_minimal [epochs]
#include <mpu/mpu.h>

#include <cstdlib>
#include <iostream>

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

int main(int argc, char** argv) try {
  const int epochs = argc > 1 ? std::atoi(argv[1]) : 2;
  const auto devices = mpu::local_gpus();  // NVML: CUDA stays untouched before the fork
  const int n = static_cast<int>(devices.size());
  auto train = mpu::datasets::FashionMNIST(mpu::datasets::Split::Train);
  auto test = mpu::datasets::FashionMNIST(mpu::datasets::Split::Test);

  auto model = std::make_shared<NetImpl>();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto loss_fn = [&](const mpu::Batch& b) {
    auto y = model->forward(b.data);
    auto loss = torch::nn::functional::cross_entropy(y, b.target);
    mpu::report("loss", loss);
    mpu::report("accuracy", mpu::accuracy(y, b.target));
    return loss;
  };
  auto iterators = mpu::split_iterators(train, n, /*batch=*/64);
  mpu::MultiprocessParallelUpdater updater(model, opt, iterators, loss_fn, devices);

  mpu::Trainer trainer(updater, mpu::stop_after_epochs(epochs), "result/minimal");
  auto test_it = std::make_shared<mpu::Iterator>(
      test, mpu::IteratorOptions(1000).repeat(false).shuffle(false));
  trainer.extend(mpu::Evaluator(test_it, loss_fn));
  trainer.extend(mpu::LogReport());
  trainer.extend(
      mpu::PrintReport({"epoch", "iteration", "main/loss", "main/accuracy", "validation/main/loss",
                        "validation/main/accuracy", "elapsed_time"}));
  trainer.extend(mpu::ProgressBar());
  std::cout << "training on " << n << " device(s): " << devices.front() << " ...\n";
  trainer.run();
  updater.finalize();
  return 0;
} catch (const std::exception& e) {
  std::cerr << "mpu_minimal: " << e.what() << "\n";
  return 1;
}
