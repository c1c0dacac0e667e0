// UpdaterOptions::cuda_graph: what it refuses, by name, and on a GPU that the captured step
// gives bit for bit the parameters, buffers and reported losses of the eager step.
#include "catch_torch.h"

#include <memory>
#include <string>
#include <vector>

#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/precision.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"

namespace {

constexpr std::int64_t kBatch = 16;

torch::nn::Sequential make_net() {
  mpu::manual_seed(11);
  return torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)),
                               torch::nn::BatchNorm2d(8), torch::nn::ReLU(), torch::nn::Flatten(),
                               torch::nn::Linear(8 * 6 * 6, 5));
}

// 8.5 batches an epoch: the batch that crosses the epoch end wraps around into the next.
std::shared_ptr<mpu::Iterator> make_iterator() {
  mpu::manual_seed(5);
  const std::int64_t n = 8 * kBatch + kBatch / 2;
  auto data = std::make_shared<mpu::TensorDataset>(torch::randn({n, 1, 6, 6}),
                                                   torch::randint(0, 5, {n}, torch::kLong));
  return std::make_shared<mpu::Iterator>(data, mpu::IteratorOptions(kBatch).seed(3));
}

mpu::LossFunction cross_entropy(torch::nn::Sequential net, torch::Dtype dtype) {
  return [net, dtype](const mpu::Batch& b) mutable {
    auto logits = net->forward(b.data.to(dtype)).to(torch::kFloat);
    auto loss = torch::nn::functional::cross_entropy(logits, b.target);
    mpu::report("loss", loss);
    return loss;
  };
}

std::vector<torch::Tensor> state_of(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().cpu().clone());
  for (const auto& b : m.buffers()) out.push_back(b.detach().cpu().clone());
  return out;
}

}  // namespace

TEST_CASE("cuda_graph refuses what it cannot capture, naming the option", "[cuda_graph]") {
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  mpu::UpdaterOptions o;
  o.cuda_graph = true;
  const auto build = [&](torch::Device device) {
    mpu::StandardUpdater u(net.ptr(), opt, make_iterator(), cross_entropy(net, torch::kFloat),
                           device, o);
  };
  SECTION("a CPU device") {
    CHECK_THROWS_WITH(build(torch::kCPU), Catch::Contains("cuda_graph") &&
                                              Catch::Contains(MPU_HAS_CUDA ? "cpu" : "CUDA"));
  }
  if (mpu::test::skip_without_cuda()) return;
  const torch::Device gpu("cuda:0");
  SECTION("no warm-up step") {
    o.cuda_graph_warmup = 0;
    CHECK_THROWS_WITH(build(gpu), Catch::Contains("cuda_graph_warmup") && Catch::Contains("got 0"));
  }
  SECTION("an fp16 policy: its overflow verdict is read on the host") {
    o.precision = mpu::Precision::kFp16Mixed;
    CHECK_THROWS_WITH(build(gpu), Catch::Contains("fp16_mixed"));
  }
  SECTION("gradient accumulation") {
    o.accumulation_steps = 2;
    CHECK_THROWS_WITH(build(gpu), Catch::Contains("accumulation_steps is 2"));
  }
}

TEST_CASE("A captured step equals the eager step bit for bit, with a changing learning rate",
          "[cuda_graph][cuda]") {
  if (mpu::test::skip_without_cuda()) return;
  constexpr int kSteps = 20;  // two epochs and a bit (the iterator wraps: every batch is full)
  at::globalContext().setBenchmarkCuDNN(false);
  at::globalContext().setDeterministicCuDNN(true);
  for (auto policy :
       {mpu::Precision::kFp32, mpu::Precision::kBf16Mixed, mpu::Precision::kBf16Autocast}) {
    for (const std::string optimizer : {"sgd", "adam"}) {
      DYNAMIC_SECTION(mpu::to_string(policy) << " " << optimizer) {
        std::vector<std::vector<torch::Tensor>> results;
        std::vector<std::vector<double>> losses;
        for (const bool graph : {false, true}) {
          auto net = make_net();
          std::unique_ptr<torch::optim::Optimizer> opt;
          if (optimizer == "sgd") {
            opt = std::make_unique<torch::optim::SGD>(
                net->parameters(),
                torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(1e-4));
          } else {
            opt = std::make_unique<torch::optim::Adam>(net->parameters(),
                                                       torch::optim::AdamOptions(1e-3));
          }
          mpu::UpdaterOptions o;
          o.precision = policy;
          o.cuda_graph = graph;
          o.cuda_graph_warmup = 2;
          const torch::Dtype dtype =
              mpu::has_master_weights(policy) ? mpu::compute_dtype(policy) : torch::kFloat;
          mpu::StandardUpdater u(net.ptr(), *opt, make_iterator(), cross_entropy(net, dtype),
                                 torch::Device("cuda:0"), o);
          std::vector<double> seen;
          for (int i = 0; i < kSteps; ++i) {
            // A schedule the captured step must follow: a new learning rate every step.
            for (auto& g : opt->param_groups()) g.options().set_lr(g.options().get_lr() * 0.97);
            mpu::Observation observation;
            {
              const mpu::ObservationScope scope(observation);
              u.update();
            }
            REQUIRE(observation.count("main/loss") == 1);
            seen.push_back(observation.at("main/loss").item<double>());
          }
          // Every step after the warm-up was a replay of the graph (none was, without it).
          CHECK(u.graph_replays() == (graph ? kSteps - o.cuda_graph_warmup : 0));
          results.push_back(state_of(*net));
          losses.push_back(seen);
        }
        REQUIRE(results[0].size() == results[1].size());
        for (std::size_t k = 0; k < results[0].size(); ++k) {
          INFO("tensor " << k);
          CHECK(torch::equal(results[0][k], results[1][k]));
        }
        CHECK(losses[0] == losses[1]);
      }
    }
  }
}

TEST_CASE("A loss function that synchronises with the host cannot be captured, and says so",
          "[cuda_graph][cuda]") {
  if (mpu::test::skip_without_cuda()) return;
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  mpu::UpdaterOptions o;
  o.cuda_graph = true;
  o.cuda_graph_warmup = 1;
  auto loss_fn = [net](const mpu::Batch& b) mutable {
    auto loss = torch::nn::functional::cross_entropy(net->forward(b.data), b.target);
    if (loss.item<double>() < 0) loss = loss * 0;  // a branch on a value: a host sync
    return loss;
  };
  mpu::StandardUpdater u(net.ptr(), opt, make_iterator(), loss_fn, torch::Device("cuda:0"), o);
  u.update();  // the eager warm-up step
  CHECK_THROWS_WITH(u.update(),
                    Catch::Contains("could not be captured") && Catch::Contains("host"));
}
