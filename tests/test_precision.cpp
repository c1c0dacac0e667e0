// Precision policies: names, the loss scaler, autocast around the loss function, fp32 master
// weights, and the loss-scaled fp16 policies skipping exactly the overflowed steps on every rank.
#include "catch_torch.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "misc/torch_compat.h"
#include "mpu/communicator.h"
#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/precision.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"
#include "multiprocess.h"

namespace {

constexpr std::int64_t kBatch = 8;  // per process
constexpr std::int64_t kFeatures = 16;

std::shared_ptr<torch::nn::LinearImpl> make_linear() {
  mpu::manual_seed(7);
  return torch::nn::Linear(kFeatures, 4).ptr();
}

std::shared_ptr<mpu::TensorDataset> make_data(std::int64_t n) {
  mpu::manual_seed(3);
  return std::make_shared<mpu::TensorDataset>(torch::randn({n, kFeatures}), torch::randn({n, 4}));
}

// Process k of n reads examples i*n*b + k*b + j in batch i (see test_updater.cpp).
std::shared_ptr<mpu::Iterator> shard(const std::shared_ptr<mpu::TensorDataset>& all, int k, int n) {
  std::vector<std::int64_t> order;
  const std::int64_t batches = all->size() / (n * kBatch);
  for (std::int64_t i = 0; i < batches; ++i) {
    for (std::int64_t j = 0; j < kBatch; ++j) order.push_back(i * n * kBatch + k * kBatch + j);
  }
  return std::make_shared<mpu::Iterator>(std::make_shared<mpu::SubsetDataset>(all, order),
                                         mpu::IteratorOptions(kBatch).shuffle(false));
}

mpu::LossFunction mse(const std::shared_ptr<torch::nn::LinearImpl>& net) {
  return [net](const mpu::Batch& b) {
    return torch::mse_loss(net->forward(b.data).to(torch::kFloat), b.target);
  };
}

torch::Tensor flat_params(torch::nn::Module& m) {
  std::vector<torch::Tensor> v;
  for (const auto& p : m.parameters()) v.push_back(p.detach().to(torch::kFloat).cpu().reshape(-1));
  return torch::cat(v);
}

}  // namespace

TEST_CASE("Precision names round-trip, and a wrong one is refused naming the valid ones",
          "[precision]") {
  for (auto p :
       {mpu::Precision::kFp32, mpu::Precision::kBf16Autocast, mpu::Precision::kFp16Autocast,
        mpu::Precision::kBf16Mixed, mpu::Precision::kFp16Mixed}) {
    CHECK(mpu::parse_precision(mpu::to_string(p)) == p);
  }
  CHECK(mpu::compute_dtype(mpu::Precision::kBf16Mixed) == torch::kBFloat16);
  CHECK(mpu::compute_dtype(mpu::Precision::kFp16Autocast) == torch::kHalf);
  CHECK(mpu::has_master_weights(mpu::Precision::kFp16Mixed));
  CHECK_FALSE(mpu::has_master_weights(mpu::Precision::kBf16Autocast));
  CHECK(mpu::uses_loss_scaling(mpu::Precision::kFp16Autocast));
  CHECK_FALSE(mpu::uses_loss_scaling(mpu::Precision::kBf16Mixed));
  CHECK_THROWS_WITH(
      mpu::parse_precision("amp"),
      Catch::Contains("precision 'amp' is not a policy") && Catch::Contains("bf16_mixed"));
}

TEST_CASE("LossScaler follows GradScaler's rule and checks its options", "[precision]") {
  mpu::LossScaleOptions o;
  o.growth_interval = 3;
  mpu::LossScaler s(o);
  CHECK(s.scale() == 65536.0);
  s.update(false);
  s.update(false);
  CHECK(s.scale() == 65536.0);
  s.update(false);
  CHECK(s.scale() == 131072.0);
  CHECK(s.growth_tracker() == 0);
  s.update(false);
  s.update(true);
  CHECK(s.scale() == 65536.0);
  CHECK(s.growth_tracker() == 0);
  CHECK(s.skipped_steps() == 1);
  torch::serialize::OutputArchive out;
  s.save(out);
  std::ostringstream bytes;
  out.save_to(bytes);
  torch::serialize::InputArchive in;
  std::istringstream read(bytes.str());
  in.load_from(read);
  mpu::LossScaler t(o);
  t.load(in);
  CHECK(t.scale() == 65536.0);
  CHECK(t.skipped_steps() == 1);
  mpu::LossScaleOptions bad;
  bad.backoff_factor = 1.5;
  CHECK_THROWS_WITH(mpu::LossScaler(bad),
                    Catch::Contains("backoff_factor must be in (0, 1), got 1.5"));
  bad = {};
  bad.growth_interval = 0;
  CHECK_THROWS_WITH(mpu::LossScaler(bad), Catch::Contains("growth_interval must be >= 1, got 0"));
}

TEST_CASE("bf16_autocast runs the loss function under autocast, backward outside it",
          "[precision]") {
  auto net = make_linear();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  mpu::UpdaterOptions o;
  o.precision = mpu::Precision::kBf16Autocast;
  torch::Dtype seen = torch::kFloat;
  auto loss_fn = [&](const mpu::Batch& b) {
    auto y = net->forward(b.data);
    seen = y.scalar_type();
    return torch::mse_loss(y.to(torch::kFloat), b.target);
  };
  mpu::StandardUpdater u(net, opt, shard(make_data(64), 0, 1), loss_fn, torch::kCPU, o);
  u.update();
  CHECK(seen == torch::kBFloat16);
  CHECK(net->weight.scalar_type() == torch::kFloat);  // autocast keeps fp32 parameters
  CHECK(u.precision() == mpu::Precision::kBf16Autocast);
}

TEST_CASE("bf16_mixed keeps bf16 parameters, fp32 master weights and fp32 optimizer state",
          "[precision]") {
  auto net = make_linear();
  const torch::Tensor before = flat_params(*net);
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-2));
  mpu::UpdaterOptions o;
  o.precision = mpu::Precision::kBf16Mixed;
  auto data = make_data(256);
  mpu::StandardUpdater u(net, opt, shard(data, 0, 1), mse(net), torch::kCPU, o);
  CHECK(net->weight.scalar_type() == torch::kBFloat16);
  // The master starts from the bf16-rounded parameters.
  CHECK(torch::equal(flat_params(*net), before.to(torch::kBFloat16).to(torch::kFloat)));
  auto loss_of = [&] {
    torch::NoGradGuard g;
    mpu::manual_seed(3);  // make_data's examples again
    const torch::Tensor x = torch::randn({256, kFeatures});
    const torch::Tensor y = torch::randn({256, 4});
    return torch::mse_loss(net->forward(x.to(torch::kBFloat16)).to(torch::kFloat), y)
        .item<double>();
  };
  const double first = loss_of();
  for (int i = 0; i < 30; ++i) u.update();
  CHECK(loss_of() < first);
  for (const auto& p : net->parameters()) {
    auto& state = static_cast<torch::optim::AdamParamState&>(
        *opt.state().at(mpu::detail::optimizer_state_key(p)));
    CHECK(state.exp_avg().scalar_type() == torch::kFloat);
    CHECK(state.step() == 30);
  }
  // A learning rate too small for bf16 to see still moves the fp32 master weights: after
  // enough steps the bf16 parameters change, where pure bf16 would stand still.
  auto net2 = make_linear();
  torch::optim::SGD sgd(net2->parameters(), torch::optim::SGDOptions(1e-5));
  mpu::StandardUpdater u2(net2, sgd, shard(data, 0, 1), mse(net2), torch::kCPU, o);
  const torch::Tensor start = flat_params(*net2);
  for (int i = 0; i < 30; ++i) u2.update();
  CHECK_FALSE(torch::equal(flat_params(*net2), start));
}

TEST_CASE("Precision policies refuse what they cannot do, by name", "[precision]") {
  auto data = make_data(64);
  {
    auto net = make_linear();
    net->to(torch::kBFloat16);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions o;
    o.precision = mpu::Precision::kBf16Autocast;
    CHECK_THROWS_WITH(mpu::StandardUpdater(net, opt, shard(data, 0, 1), mse(net), torch::kCPU, o),
                      Catch::Contains("' is BFloat16") &&
                          Catch::Contains("autocast policies train fp32 parameters"));
  }
  {
    auto net = make_linear();
    // A subclass may step differently: the flat step does not take it.
    struct OwnSGD : torch::optim::SGD {
      using torch::optim::SGD::SGD;
    };
    OwnSGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions o;
    o.precision = mpu::Precision::kBf16Mixed;
    CHECK_THROWS_WITH(mpu::StandardUpdater(net, opt, shard(data, 0, 1), mse(net), torch::kCPU, o),
                      Catch::Contains("bf16_mixed steps fp32 master weights in the flat step") &&
                          Catch::Contains("Use SGD, Adam"));
  }
  if (!mpu::detail::kTorch2) {
    auto net = make_linear();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions o;
    o.precision = mpu::Precision::kFp16Mixed;
    CHECK_THROWS_WITH(
        mpu::StandardUpdater(net, opt, shard(data, 0, 1), mse(net), torch::kCPU, o),
        Catch::Contains("fp16_mixed") && Catch::Contains("fp16 on the CPU needs LibTorch 2.x"));
  }
}

TEST_CASE("bf16_mixed on 2 ranks equals one process of batch 2b, for every strategy",
          "[precision][multiprocess]") {
  constexpr int kSteps = 6;
  auto data = make_data(2 * kBatch * kSteps);
  for (auto strategy :
       {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
    DYNAMIC_SECTION(mpu::to_string(strategy)) {
      mpu::UpdaterOptions o;
      o.precision = mpu::Precision::kBf16Mixed;
      o.strategy = strategy;
      o.scaling = mpu::ScalingPolicy::mean();
      // The reference: one process, batch 2b, the same policy (in a child: this process forks
      // the ranks next, and must not have run autograd).
      const torch::Tensor expected =
          mpu::test::run_isolated([&] {
            auto ref = make_linear();
            torch::optim::SGD opt(ref->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
            auto whole = std::make_shared<mpu::Iterator>(
                data, mpu::IteratorOptions(2 * kBatch).shuffle(false));
            mpu::StandardUpdater ru(ref, opt, whole, mse(ref), torch::kCPU, o);
            for (int i = 0; i < kSteps; ++i) ru.update();
            return std::vector<torch::Tensor>{flat_params(*ref)};
          }).at(0);
      mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
        auto net = make_linear();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
        auto comm = ctx.make_communicator();
        mpu::DistributedUpdater u(net, opt, shard(data, ctx.rank, 2), mse(net), comm, o);
        for (int i = 0; i < kSteps; ++i) u.update();
        const torch::Tensor mine = flat_params(*net);
        // Every rank holds rank 0's parameters, bit for bit.
        torch::Tensor zero = mine.clone();
        comm->broadcast(zero, 0);
        MPU_EXPECT(torch::equal(mine, zero), "rank ", ctx.rank, " differs from rank 0");
        // The mean of two bf16 gradients of batch b is not the bf16 gradient of batch 2b bit
        // for bit; they agree to bf16's resolution.
        MPU_EXPECT(torch::allclose(mine, expected, 2e-2, 2e-2), "rank ", ctx.rank,
                   " max difference from one process of batch 2b: ",
                   (mine - expected).abs().max().item<double>());
      });
    }
  }
}

TEST_CASE("fp16 loss scaling: an overflow on one rank skips that step on every rank",
          "[precision][multiprocess]") {
  if (!mpu::detail::kTorch2) {
    WARN("skipped: fp16 autocast on the CPU needs LibTorch 2.x (the [cuda] run covers GPUs)");
    return;
  }
  constexpr int kSteps = 5;
  constexpr int kOverflowAt = 3;  // 1-based iteration whose loss overflows on rank 1
  auto data = make_data(2 * kBatch * kSteps);
  for (auto policy : {mpu::Precision::kFp16Mixed, mpu::Precision::kFp16Autocast}) {
    DYNAMIC_SECTION(mpu::to_string(policy)) {
      mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
        auto net = make_linear();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
        mpu::UpdaterOptions o;
        o.precision = policy;
        o.strategy = mpu::Strategy::kReplicated;
        int iteration = 0;
        auto loss = [&, net](const mpu::Batch& b) {
          ++iteration;
          auto l = torch::mse_loss(net->forward(b.data).to(torch::kFloat), b.target);
          // 1e36 times the loss scale overflows the gradients of this rank only.
          return ctx.rank == 1 && iteration == kOverflowAt ? l * 1e36 : l;
        };
        auto comm = ctx.make_communicator();
        mpu::DistributedUpdater u(net, opt, shard(data, ctx.rank, 2), loss, comm, o);
        torch::Tensor before;
        for (int i = 1; i <= kSteps; ++i) {
          before = flat_params(*net);
          u.update();
          const torch::Tensor now = flat_params(*net);
          const std::int64_t skipped = u.skipped_steps();
          MPU_EXPECT(skipped == (i < kOverflowAt ? 0 : 1), "rank ", ctx.rank, " iteration ", i,
                     ": ", skipped, " skipped steps");
          MPU_EXPECT(torch::equal(now, before) == (i == kOverflowAt), "rank ", ctx.rank,
                     " iteration ", i, ": the parameters ",
                     torch::equal(now, before) ? "did not change" : "changed");
          torch::Tensor zero = now.clone();
          comm->broadcast(zero, 0);
          MPU_EXPECT(torch::equal(now, zero), "rank ", ctx.rank, " iteration ", i,
                     ": differs from rank 0");
        }
      });
    }
  }
}

TEST_CASE("On a GPU, every policy trains and fp16 policies skip exactly the overflowed step",
          "[precision][cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("skipped: no GPU");
    return;
  }
  constexpr int kSteps = 5;
  constexpr int kOverflowAt = 3;
  auto data = make_data(kBatch * kSteps);
  for (auto policy : {mpu::Precision::kBf16Autocast, mpu::Precision::kFp16Autocast,
                      mpu::Precision::kBf16Mixed, mpu::Precision::kFp16Mixed}) {
    DYNAMIC_SECTION(mpu::to_string(policy)) {
      auto net = make_linear();
      torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-2));
      mpu::UpdaterOptions o;
      o.precision = policy;
      int iteration = 0;
      const bool scaled = mpu::uses_loss_scaling(policy);
      auto loss = [&, net](const mpu::Batch& b) {
        ++iteration;
        auto l = torch::mse_loss(net->forward(b.data).to(torch::kFloat), b.target);
        return scaled && iteration == kOverflowAt ? l * 1e36 : l;
      };
      mpu::StandardUpdater u(net, opt, shard(data, 0, 1), loss, torch::Device("cuda:0"), o);
      CHECK(net->weight.scalar_type() ==
            (mpu::has_master_weights(policy) ? mpu::compute_dtype(policy) : torch::kFloat));
      for (int i = 1; i <= kSteps; ++i) {
        const torch::Tensor before = flat_params(*net);
        u.update();
        const bool skipped_now = scaled && i == kOverflowAt;
        INFO("iteration " << i);
        CHECK(torch::equal(flat_params(*net), before) == skipped_now);
      }
      CHECK(u.skipped_steps() == (scaled ? 1 : 0));
      // GradScaler's backoff: the scale halved once, no growth within 2000 steps.
      CHECK(u.loss_scale() == (scaled ? 32768.0 : 1.0));
    }
  }
}
