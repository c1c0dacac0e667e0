// A small concrete Updater for the Trainer's tests: linear regression on a fixed in-memory
// dataset, torch::optim::SGD with momentum, a seeded shuffle per epoch, and save/load of the
// model, the optimizer and the position in the data. It stands in for the real updaters, which
// are tested on their own.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "mpu/batch.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"

namespace mpu_test {

struct ToyOptions {
  std::int64_t samples = 12;
  std::int64_t batch_size = 4;
  std::int64_t features = 3;
  std::int64_t outputs = 1;
  // Ranks, when the test plays several ranks in threads.
  int rank = 0;
  int world_size = 1;
  std::function<void(torch::Tensor&)> allreduce;  // empty: no cross-rank aggregation
};

/// The dataset: x[i][j] = ((3i + 7j) mod 11) / 5 - 1, y = x·(1, -2, 0.5, ...) + 0.3 + i/100.
inline mpu::Batch toy_dataset(std::int64_t samples, std::int64_t features) {
  auto i = torch::arange(samples, torch::kFloat32).unsqueeze(1);
  auto j = torch::arange(features, torch::kFloat32).unsqueeze(0);
  auto x = torch::fmod(3 * i + 7 * j, 11.0) / 5.0 - 1.0;
  auto w = torch::ones({features, 1});
  if (features > 1) w[1] = -2.0;
  if (features > 2) w[2] = 0.5;
  auto y = x.matmul(w) + 0.3 + i / 100.0;
  return {x, y};
}

class ToyUpdater : public mpu::Updater {
 public:
  explicit ToyUpdater(ToyOptions options = {})
      : options_(std::move(options)),
        data_(toy_dataset(options_.samples, options_.features)),
        model_(torch::nn::LinearOptions(options_.features, options_.outputs)),
        optimizer_(model_->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9)) {
    torch::NoGradGuard no_grad;
    // Fixed start, independent of torch's global seed.
    model_->weight.copy_(
        torch::linspace(-0.3, 0.3, model_->weight.numel()).reshape(model_->weight.sizes()));
    model_->bias.fill_(0.1);
    make_order();
  }

  /// The loss the updater trains on; reports "loss" and "batch_size" under the open scope.
  torch::Tensor loss(const mpu::Batch& batch) {
    auto loss = torch::mse_loss(model_->forward(batch.data), batch.target);
    mpu::report("loss", loss);
    mpu::report("batch_size", static_cast<double>(batch.data.size(0)));
    if (on_loss) on_loss(loss.item<float>(), batch.data.size(0));
    return loss;
  }

  /// Called with every training loss and its batch size.
  std::function<void(float, std::int64_t)> on_loss;

  void update() override {
    const std::int64_t end = std::min(position_ + options_.batch_size, options_.samples);
    auto idx =
        torch::tensor(std::vector<std::int64_t>(order_.begin() + position_, order_.begin() + end));
    mpu::Batch batch{data_.data.index_select(0, idx), data_.target.index_select(0, idx)};
    optimizer_.zero_grad();
    torch::Tensor l;
    {
      mpu::ReportScope scope("main");
      l = loss(batch);
    }
    l.backward();
    optimizer_.step();
    ++iteration_;
    position_ = end;
    is_new_epoch_ = position_ == options_.samples;
    if (is_new_epoch_) {
      position_ = 0;
      ++epoch_;
      make_order();
    }
  }
  std::int64_t iteration() const override { return iteration_; }
  std::int64_t epoch() const override { return epoch_; }
  double epoch_detail() const override {
    return static_cast<double>(epoch_) +
           static_cast<double>(position_) / static_cast<double>(options_.samples);
  }
  bool is_new_epoch() const override { return is_new_epoch_; }
  bool is_main() const override { return options_.rank == 0; }
  int rank() const override { return options_.rank; }
  int world_size() const override { return options_.world_size; }
  torch::Device device() const override { return torch::kCPU; }
  torch::nn::Module& model() override { return *model_; }
  torch::nn::Linear& linear() { return model_; }
  bool allreduce_sum(torch::Tensor& tensor) override {
    if (!options_.allreduce) return mpu::Updater::allreduce_sum(tensor);
    options_.allreduce(tensor);
    return true;
  }

  void save(torch::serialize::OutputArchive& archive) override {
    torch::serialize::OutputArchive model;
    model_->save(model);
    archive.write("model", model);
    torch::serialize::OutputArchive optimizer;
    optimizer_.save(optimizer);
    archive.write("optimizer", optimizer);
    archive.write("counters",
                  torch::tensor({iteration_, epoch_, position_, std::int64_t{is_new_epoch_}}));
  }
  void load(torch::serialize::InputArchive& archive) override {
    torch::serialize::InputArchive model;
    archive.read("model", model);
    model_->load(model);
    torch::serialize::InputArchive optimizer;
    archive.read("optimizer", optimizer);
    optimizer_.load(optimizer);
    torch::Tensor counters;
    archive.read("counters", counters);
    iteration_ = counters[0].item<std::int64_t>();
    epoch_ = counters[1].item<std::int64_t>();
    position_ = counters[2].item<std::int64_t>();
    is_new_epoch_ = counters[3].item<std::int64_t>() != 0;
    make_order();
  }

  void finalize() override { ++finalize_calls; }
  int finalize_calls = 0;

 private:
  // The order of one epoch: a shuffle seeded by the epoch, so a resumed run sees the same data.
  void make_order() {
    order_.resize(static_cast<std::size_t>(options_.samples));
    std::iota(order_.begin(), order_.end(), 0);
    std::mt19937_64 rng(static_cast<std::uint64_t>(1000 + epoch_));
    std::shuffle(order_.begin(), order_.end(), rng);
  }

  ToyOptions options_;
  mpu::Batch data_;
  torch::nn::Linear model_;
  torch::optim::SGD optimizer_;
  std::vector<std::int64_t> order_;
  std::int64_t iteration_ = 0;
  std::int64_t epoch_ = 0;
  std::int64_t position_ = 0;
  bool is_new_epoch_ = false;
};

}  // namespace mpu_test
