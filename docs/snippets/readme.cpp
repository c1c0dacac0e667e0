#include <mpu/mpu.h>

int main() {
  auto devices = mpu::local_gpus();  // NVML: CUDA untouched before the fork; {cpu, cpu} if no GPU
  auto train = mpu::datasets::FashionMNIST(mpu::datasets::Split::Train);
  auto model = std::make_shared<Net>();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto loss_fn = [&](const mpu::Batch& b) {
    auto loss = torch::nn::functional::cross_entropy(model->forward(b.data), b.target);
    mpu::report("loss", loss);
    return loss;
  };
  auto iterators = mpu::split_iterators(train, devices.size(), 64);  // one shard per device
  // Forks one worker per extra device at the first update; rescales opt for the summed gradients.
  mpu::MultiprocessParallelUpdater updater(model, opt, iterators, loss_fn, devices);
  mpu::Trainer trainer(updater, mpu::stop_after_epochs(2), "result");
  trainer.extend(mpu::LogReport());
  trainer.extend(mpu::PrintReport({"epoch", "main/loss", "elapsed_time"}));
  trainer.run();
}
