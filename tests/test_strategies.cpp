// Strategies (MasterStep, Replicated, Sharded) and the step options: bucketed overlap, wire
// dtypes, gradient accumulation, the non-finite skip and the drift check. CPU ranks through
// Gloo everywhere; GPUs through NCCL where present ([nccl]).
#include "catch_torch.h"

#include <cmath>
#include <functional>
#include <sstream>

#include "mpu/communicator.h"
#include "mpu/error.h"
#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/updater.h"
#include "multiprocess.h"
#include "sync/sync_engine.h"

namespace {

constexpr std::int64_t kIn = 6;
constexpr std::int64_t kOut = 4;
constexpr std::int64_t kMicro = 3;  // examples per micro-batch and rank
constexpr int kSteps = 8;

struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    a = register_module("a", torch::nn::Linear(kIn, 10));
    b = register_module("b", torch::nn::Linear(10, 10));
    c = register_module("c", torch::nn::Linear(10, kOut));
  }
  torch::Tensor forward(const torch::Tensor& x, torch::Tensor* hidden = nullptr) {
    auto h = torch::relu(a->forward(x));
    if (hidden != nullptr) *hidden = h;
    return c->forward(torch::tanh(b->forward(h)));
  }
  torch::nn::Linear a{nullptr}, b{nullptr}, c{nullptr};
};
TORCH_MODULE(Mlp);

std::shared_ptr<MlpImpl> make_mlp() {
  mpu::manual_seed(77);
  return Mlp().ptr();
}

// A model whose parameters have two dtypes, so that the flat buffer cannot be zero-copy.
struct MixedImpl : torch::nn::Module {
  MixedImpl() {
    a = register_module("a", torch::nn::Linear(kIn, kOut));
    s = register_parameter("s", torch::ones({kOut}, torch::kDouble));
  }
  torch::Tensor forward(const torch::Tensor& x) { return a->forward(x) * s.to(torch::kFloat); }
  torch::nn::Linear a{nullptr};
  torch::Tensor s;
};
TORCH_MODULE(Mixed);

std::shared_ptr<MixedImpl> make_mixed() {
  mpu::manual_seed(78);
  return Mixed().ptr();
}

std::shared_ptr<mpu::TensorDataset> make_examples(std::int64_t n) {
  mpu::manual_seed(5);
  return std::make_shared<mpu::TensorDataset>(torch::randn({n, kIn}),
                                              torch::randint(kOut, {n}, torch::kInt64));
}

// Rank r of n with k micro-batches per step reads, in micro-batch m of step i, the examples
// i*n*k*b + (r*k + m)*b + j: together they are exactly batch i of one process of batch n*k*b.
std::shared_ptr<mpu::Iterator> rank_iterator(const mpu::DatasetPtr& all, int r, int n, int k) {
  std::vector<std::int64_t> idx;
  const std::int64_t big = n * k * kMicro;
  for (std::int64_t i = 0; i < all->size() / big; ++i) {
    for (int m = 0; m < k; ++m) {
      for (std::int64_t j = 0; j < kMicro; ++j) idx.push_back(i * big + (r * k + m) * kMicro + j);
    }
  }
  return std::make_shared<mpu::Iterator>(
      std::make_shared<mpu::SubsetDataset>(all, idx),
      mpu::IteratorOptions(kMicro).shuffle(false).prefetch(false));
}

mpu::LossFunction cross_entropy(const std::shared_ptr<MlpImpl>& net) {
  return [net](const mpu::Batch& b) {
    return torch::nn::functional::cross_entropy(net->forward(b.data), b.target);
  };
}

using MakeOpt = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

std::vector<std::pair<std::string, MakeOpt>> optimizers() {
  using namespace torch::optim;
  return {
      {"SGD", [](auto p) { return std::make_unique<SGD>(p, SGDOptions(0.1).momentum(0.9)); }},
      {"Adam", [](auto p) { return std::make_unique<Adam>(p, AdamOptions(1e-2)); }},
      {"AdamW",
       [](auto p) { return std::make_unique<AdamW>(p, AdamWOptions(1e-2).weight_decay(0.05)); }},
      {"Adagrad", [](auto p) { return std::make_unique<Adagrad>(p, AdagradOptions(5e-2)); }},
      {"RMSprop", [](auto p) { return std::make_unique<RMSprop>(p, RMSpropOptions(1e-2)); }},
  };
}

// Parameters after kSteps of one process of batch n*k*b, with the plain per-parameter step.
std::vector<torch::Tensor> single_process(const MakeOpt& make_opt, int n, int k) {
  auto all = make_examples(n * k * kMicro * kSteps);
  auto net = make_mlp();
  auto opt = make_opt(net->parameters());
  auto it = std::make_shared<mpu::Iterator>(
      all, mpu::IteratorOptions(n * k * kMicro).shuffle(false).prefetch(false));
  mpu::UpdaterOptions o;
  o.flat_step = false;
  mpu::StandardUpdater updater(net, *opt, it, cross_entropy(net), torch::kCPU, o);
  for (int i = 0; i < kSteps; ++i) updater.update();
  std::vector<torch::Tensor> out;
  for (const auto& p : net->parameters()) out.push_back(p.detach().clone());
  return out;
}

// Runs the DistributedUpdater with `options` on `ctx`'s rank and checks the result against one
// process of the whole batch, and bit-identity with rank 0.
void check_equivalent(const mpu::SpawnContext& ctx, const std::string& name, const MakeOpt& make,
                      mpu::UpdaterOptions options) {
  const int n = ctx.world_size;
  const int k = options.accumulation_steps;
  auto all = make_examples(n * k * kMicro * kSteps);
  auto net = make_mlp();
  auto opt = make(net->parameters());
  auto comm = ctx.make_communicator();
  mpu::DistributedUpdater updater(net, *opt, rank_iterator(all, ctx.rank, n, k), cross_entropy(net),
                                  comm, options);
  for (int i = 0; i < kSteps; ++i) updater.update();
  const auto reference = single_process(make, n, k);
  const auto params = net->parameters();
  const auto initial = make_mlp()->parameters();
  MPU_EXPECT(!torch::equal(params[0].detach().cpu(), initial[0]), name, ": nothing was trained");
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto mine = params[i].detach().cpu().clone();
    MPU_EXPECT(torch::allclose(mine, reference[i], 1e-5, 1e-6), name, " (",
               mpu::to_string(options.strategy), ", k=", k, ") parameter ", i,
               " differs from one process of batch n*k*b by ",
               (mine - reference[i]).abs().max().item<double>());
    auto root = params[i].detach().clone();
    comm->broadcast(root, 0);
    MPU_EXPECT_EQUAL(params[i].detach(), root, " (", name, " parameter ", i, " vs rank 0)");
  }
}

mpu::UpdaterOptions with(mpu::Strategy strategy, std::size_t bucket_bytes = 256) {
  mpu::UpdaterOptions o;
  o.strategy = strategy;
  o.bucket_bytes = bucket_bytes;
  return o;
}

}  // namespace

TEST_CASE("to_string and parse_strategy are inverse - unknown names are refused", "[strategies]") {
  for (auto s : {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded})
    CHECK(mpu::parse_strategy(mpu::to_string(s)) == s);
  try {
    mpu::parse_strategy("zero3");
    FAIL("no exception");
  } catch (const mpu::InvalidArgument& e) {
    CHECK(std::string(e.what()).find(
              "unknown strategy 'zero3'; valid strategies: master, replicated, sharded") !=
          std::string::npos);
  }
}

TEST_CASE("Every strategy on 2 and 3 CPU ranks equals one process of batch n*b, every optimizer",
          "[strategies][multiprocess]") {
  for (int n : {2, 3}) {
    for (auto strategy :
         {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
      DYNAMIC_SECTION(mpu::to_string(strategy) << " n=" << n) {
        mpu::test::run_ranks(n, [&](const mpu::SpawnContext& ctx) {
          for (const auto& [name, make] : optimizers()) {
            check_equivalent(ctx, name, make, with(strategy));
          }
        });
      }
    }
  }
}

TEST_CASE(
    "Mean reduction, the per-parameter step and one unbucketed collective give the same "
    "results",
    "[strategies][multiprocess]") {
  mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
    const auto adam = optimizers()[1].second;
    for (auto strategy : {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated}) {
      auto o = with(strategy, /*bucket_bytes=*/0);
      o.flat_step = false;
      check_equivalent(ctx, "Adam, per-parameter step, one bucket", adam, o);
    }
    // Mean: the gradients are averaged and the optimizer left alone; the reference sees the
    // same mean over the whole batch.
    auto sgd = [](std::vector<torch::Tensor> p) {
      return std::make_unique<torch::optim::SGD>(p, torch::optim::SGDOptions(0.1));
    };
    auto o = with(mpu::Strategy::kReplicated);
    o.scaling = mpu::ScalingPolicy::mean();
    check_equivalent(ctx, "SGD, mean", sgd, o);
  });
}

TEST_CASE("Gradient accumulation: k micro-batches per step equal one process of batch n*k*b",
          "[strategies][multiprocess]") {
  mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
    for (auto strategy :
         {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
      for (const auto& [name, make] : optimizers()) {
        if (name != "SGD" && name != "Adam") continue;
        auto o = with(strategy);
        o.accumulation_steps = 3;
        check_equivalent(ctx, name, make, o);
      }
    }
  });
}

TEST_CASE("One rank issues no collective per step and equals one process, every strategy",
          "[strategies][multiprocess]") {
  mpu::test::run_ranks(1, [&](const mpu::SpawnContext& ctx) {
    for (auto strategy :
         {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
      for (int k : {1, 3}) {
        for (const auto& [name, make] : optimizers()) {
          auto o = with(strategy);
          o.accumulation_steps = k;
          check_equivalent(ctx, name, make, o);
        }
        // The mean over k micro-batches is the only scaling left on one rank.
        auto o = with(strategy);
        o.accumulation_steps = k;
        o.scaling = mpu::ScalingPolicy::mean();
        o.wire_dtype = torch::kHalf;  // nothing travels: no fp16 rounding either
        check_equivalent(ctx, "SGD, mean, fp16 wire", optimizers()[0].second, o);
      }
      auto all = make_examples(kMicro * kSteps);
      auto net = make_mlp();
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
      auto comm = ctx.make_communicator();
      auto o = with(strategy);
      o.drift_check_interval = 1;
      mpu::DistributedUpdater updater(net, opt, rank_iterator(all, 0, 1, 1), cross_entropy(net),
                                      comm, o);
      const auto before = comm->sequence_number();
      for (int i = 0; i < kSteps; ++i) updater.update();
      MPU_EXPECT(comm->sequence_number() == before, mpu::to_string(strategy), ": ",
                 comm->sequence_number() - before, " collectives in ", kSteps,
                 " steps on one rank");
    }
    // Parameters of two dtypes (no zero-copy flat buffer): the gradients are gathered, scaled
    // and scattered back, as with several ranks, still without a collective, also with the
    // non-finite check on. The reference: the plain updater with the same accumulation.
    for (auto strategy : {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated}) {
      auto run = [&](bool distributed) {
        auto all = make_examples(2 * kMicro * kSteps);
        auto net = make_mixed();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
        auto o = with(strategy);
        o.accumulation_steps = 2;
        o.scaling = mpu::ScalingPolicy::mean();
        o.skip_nonfinite = true;
        o.flat_step = false;
        auto loss = [net](const mpu::Batch& b) {
          return torch::nn::functional::cross_entropy(net->forward(b.data), b.target);
        };
        auto it = rank_iterator(all, 0, 1, 2);
        std::uint64_t collectives = 0;
        if (distributed) {
          auto comm = ctx.make_communicator();
          mpu::DistributedUpdater updater(net, opt, it, loss, comm, o);
          const auto before = comm->sequence_number();
          for (int i = 0; i < kSteps; ++i) updater.update();
          collectives = comm->sequence_number() - before;
        } else {
          mpu::StandardUpdater updater(net, opt, it, loss, torch::kCPU, o);
          for (int i = 0; i < kSteps; ++i) updater.update();
        }
        MPU_EXPECT(collectives == 0, collectives, " collectives on one rank, mixed dtypes");
        return net->parameters();
      };
      const auto mine = run(true);
      const auto reference = run(false);
      for (std::size_t i = 0; i < mine.size(); ++i) {
        MPU_EXPECT(mine[i].scalar_type() == reference[i].scalar_type() &&
                       torch::allclose(mine[i], reference[i], 1e-5, 1e-6),
                   mpu::to_string(strategy), ", mixed dtypes: parameter ", i,
                   " differs from the plain updater's");
      }
    }
  });
}

TEST_CASE("MultiprocessParallelUpdater with Replicated and Sharded equals one process",
          "[strategies][multiprocess]") {
  const int n = 2;
  for (auto strategy : {mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
    DYNAMIC_SECTION(mpu::to_string(strategy)) {
      const auto adam = optimizers()[1].second;
      const auto parallel = mpu::test::run_isolated([&] {
        auto all = make_examples(n * kMicro * kSteps);
        auto net = make_mlp();
        auto opt = adam(net->parameters());
        std::vector<std::shared_ptr<mpu::Iterator>> its;
        for (int r = 0; r < n; ++r) its.push_back(rank_iterator(all, r, n, 1));
        mpu::MultiprocessParallelUpdater updater(net, *opt, its, cross_entropy(net),
                                                 std::vector<torch::Device>(n, torch::kCPU),
                                                 with(strategy));
        for (int i = 0; i < kSteps; ++i) updater.update();
        updater.finalize();
        std::vector<torch::Tensor> out;
        for (const auto& p : net->parameters()) out.push_back(p.detach().clone());
        return out;
      });
      const auto reference = mpu::test::run_isolated([&] { return single_process(adam, n, 1); });
      REQUIRE(parallel.size() == reference.size());
      for (std::size_t i = 0; i < parallel.size(); ++i) {
        INFO("parameter " << i);
        CHECK(torch::allclose(parallel[i], reference[i], 1e-5, 1e-6));
      }
    }
  }
}

TEST_CASE("Buckets go out during backward - with bucket_bytes 0 one collective follows it",
          "[strategies][multiprocess]") {
  mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
    for (auto strategy : {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated}) {
      for (std::size_t bucket_bytes : {std::size_t{64}, std::size_t{0}}) {
        auto all = make_examples(2 * kMicro * kSteps);
        auto net = make_mlp();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
        auto comm = ctx.make_communicator();
        std::uint64_t at_start = 0;
        std::uint64_t at_first_layer = 0;
        auto loss_fn = [&](const mpu::Batch& b) {
          torch::Tensor h;
          auto loss = torch::nn::functional::cross_entropy(net->forward(b.data, &h), b.target);
          at_start = comm->sequence_number();
          // Runs when backward reaches the first layer, after the later layers' gradients.
          h.register_hook([&](torch::Tensor g) {
            at_first_layer = comm->sequence_number();
            return g;
          });
          return loss;
        };
        mpu::DistributedUpdater updater(net, opt, rank_iterator(all, ctx.rank, 2, 1), loss_fn, comm,
                                        with(strategy, bucket_bytes));
        updater.update();
        const auto end = comm->sequence_number();
        const std::string what = std::string(mpu::to_string(strategy)) + ", bucket_bytes " +
                                 std::to_string(bucket_bytes);
        if (bucket_bytes > 0) {
          // 64-byte buckets over the parameters in reverse order: {c.bias, c.weight},
          // {b.bias, b.weight}, {a.bias, a.weight}: a bucket closes once it holds 64 bytes. The
          // first two go out before backward reaches the first layer. MasterStep adds the
          // parameter broadcast.
          MPU_EXPECT(at_first_layer - at_start == 2u, what, ": ", at_first_layer - at_start,
                     " buckets went out before backward reached the first layer");
          MPU_EXPECT(end - at_start == (strategy == mpu::Strategy::kMasterStep ? 4u : 3u), what,
                     ": ", end - at_start, " collectives in the step");
        } else {
          MPU_EXPECT(at_first_layer == at_start, what, ": a collective ran during backward");
          MPU_EXPECT(end - at_start == (strategy == mpu::Strategy::kMasterStep ? 2u : 1u), what,
                     ": ", end - at_start, " collectives in the step");
        }
      }
    }
  });
}

TEST_CASE(
    "Wire dtypes: fp32, bf16 and fp16 (with its 1/n scale) sum exactly where the values "
    "are exact",
    "[strategies][multiprocess]") {
  for (int n : {2, 4}) {
    DYNAMIC_SECTION("n=" << n) {
      mpu::test::run_ranks(n, [&](const mpu::SpawnContext& ctx) {
        for (auto strategy :
             {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
          for (auto wire : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
            // loss = sum(w * c) gives the gradient c = (rank + 1) * 2^-3 everywhere, exact in
            // every wire dtype. SGD with lr 1, rescaled to 1/n for the sum of n gradients:
            // w' = w - (1/n) * sum_r c_r = w - (n + 1)/16.
            auto net =
                std::make_shared<torch::nn::LinearImpl>(torch::nn::LinearOptions(5, 3).bias(false));
            {
              torch::NoGradGuard g;
              net->weight.fill_(1.0);
            }
            torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(1.0));
            auto all = std::make_shared<mpu::TensorDataset>(torch::zeros({8, 1}),
                                                            torch::zeros({8}, torch::kInt64));
            auto it = std::make_shared<mpu::Iterator>(
                all, mpu::IteratorOptions(1).shuffle(false).prefetch(false));
            const double c = (ctx.rank + 1) / 8.0;
            auto loss_fn = [&](const mpu::Batch&) { return (net->weight * c).sum(); };
            auto o = with(strategy);
            o.wire_dtype = wire;
            mpu::DistributedUpdater updater(net, opt, it, loss_fn, ctx.make_communicator(), o);
            updater.update();
            const auto expected = torch::full({3, 5}, 1.0 - (n + 1) / 16.0);
            MPU_EXPECT_EQUAL(net->weight.detach(), expected, " (", mpu::to_string(strategy),
                             ", wire ", wire, ")");
          }
        }
      });
    }
  }
}

TEST_CASE(
    "skip_nonfinite: a NaN gradient on one rank skips the step on every rank, and is "
    "counted",
    "[strategies][multiprocess]") {
  mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
    for (auto strategy :
         {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
      auto all = make_examples(2 * kMicro * kSteps);
      auto net = make_mlp();
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
      int call = 0;
      auto inner = cross_entropy(net);
      auto loss_fn = [&](const mpu::Batch& b) {
        auto loss = inner(b);
        // Rank 1's third step has a NaN loss, hence NaN gradients.
        if (++call == 3 && ctx.rank == 1) loss = loss * std::numeric_limits<float>::quiet_NaN();
        return loss;
      };
      auto o = with(strategy);
      o.skip_nonfinite = true;
      mpu::DistributedUpdater updater(net, opt, rank_iterator(all, ctx.rank, 2, 1), loss_fn,
                                      ctx.make_communicator(), o);
      updater.update();
      updater.update();
      std::vector<torch::Tensor> before;
      for (const auto& p : net->parameters()) before.push_back(p.detach().clone());
      updater.update();  // skipped
      const std::string what = mpu::to_string(strategy);
      MPU_EXPECT(updater.skipped_steps() == 1, what, ": skipped_steps() is ",
                 updater.skipped_steps());
      const auto after = net->parameters();
      for (std::size_t i = 0; i < after.size(); ++i)
        MPU_EXPECT_EQUAL(after[i].detach(), before[i], " (", what, " parameter ", i, ")");
      updater.update();  // trains again
      MPU_EXPECT(!torch::equal(net->parameters()[0].detach(), before[0]), what,
                 ": the step after the skipped one did not train");
      MPU_EXPECT(torch::isfinite(net->parameters()[0].detach()).all().item<bool>(), what,
                 ": a NaN reached the parameters");
    }
  });
}

TEST_CASE("drift_check_interval: a parameter changed on one rank is found and named",
          "[strategies][multiprocess]") {
  mpu::test::run_ranks(3, [&](const mpu::SpawnContext& ctx) {
    auto all = make_examples(3 * kMicro * kSteps);
    auto net = make_mlp();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    auto o = with(mpu::Strategy::kReplicated);
    o.drift_check_interval = 2;
    mpu::DistributedUpdater updater(net, opt, rank_iterator(all, ctx.rank, 3, 1),
                                    cross_entropy(net), ctx.make_communicator(), o);
    updater.update();
    updater.update();  // checked: no drift
    if (ctx.rank == 2) {
      torch::NoGradGuard g;
      net->b->bias[0].add_(1e-3);
    }
    updater.update();
    std::string message;
    try {
      updater.update();  // checked: rank 2 differs
    } catch (const mpu::CommError& e) {
      message = e.what();
    }
    MPU_EXPECT(message.find("parameter drift at iteration 4: rank 2's parameters differ from "
                            "rank 0's") != std::string::npos,
               "message: '", message, "'");
  });
}

TEST_CASE(
    "Sharded: optimizer state per rank is its shard - snapshots hold the whole state and "
    "resume exactly",
    "[strategies][multiprocess]") {
  const int n = 3;
  mpu::test::run_ranks(n, [&](const mpu::SpawnContext& ctx) {
    const auto adam = optimizers()[1].second;
    auto all = make_examples(n * kMicro * kSteps);
    std::int64_t numel = 0;
    for (const auto& p : make_mlp()->parameters()) numel += p.numel();
    auto comm = ctx.make_communicator();

    // Uninterrupted: kSteps steps.
    auto net = make_mlp();
    auto opt = adam(net->parameters());
    mpu::DistributedUpdater full(net, *opt, rank_iterator(all, ctx.rank, n, 1), cross_entropy(net),
                                 comm, with(mpu::Strategy::kSharded));
    const std::int64_t expected_bytes = 2 * comm->shard_numel(numel) * 4;  // exp_avg, exp_avg_sq
    MPU_EXPECT(full.optimizer_state_bytes() == expected_bytes, "state bytes ",
               full.optimizer_state_bytes(), " vs 2 x ", comm->shard_numel(numel), " x 4");
    MPU_EXPECT(full.collective_save(), "a sharded save must be collective");
    for (int i = 0; i < kSteps; ++i) full.update();

    // Interrupted: half, save on every rank (collective), fresh objects, load, the rest.
    auto net2 = make_mlp();
    auto opt2 = adam(net2->parameters());
    auto o = with(mpu::Strategy::kSharded);
    std::ostringstream bytes;
    {
      mpu::DistributedUpdater first(net2, *opt2, rank_iterator(all, ctx.rank, n, 1),
                                    cross_entropy(net2), comm, o);
      for (int i = 0; i < kSteps / 2; ++i) first.update();
      torch::serialize::OutputArchive archive;
      first.save(archive);
      archive.save_to(bytes);
      // The archive holds the whole state: a plain Adam loads it, with full-size tensors.
      torch::serialize::InputArchive in;
      std::istringstream read(bytes.str());
      in.load_from(read);
      torch::serialize::InputArchive opt_part;
      in.read("optimizer", opt_part);
      auto plain_net = make_mlp();
      torch::optim::Adam plain(plain_net->parameters(), torch::optim::AdamOptions(1e-2));
      plain.load(opt_part);
      std::int64_t loaded = 0;
      for (const auto& entry : plain.state()) {
        auto& s = static_cast<torch::optim::AdamParamState&>(*entry.second);
        loaded += s.exp_avg().numel();
      }
      MPU_EXPECT(loaded == numel, "the saved optimizer holds ", loaded, " of ", numel,
                 " elements of exp_avg");
    }
    auto net3 = make_mlp();
    auto opt3 = adam(net3->parameters());
    mpu::DistributedUpdater second(net3, *opt3, rank_iterator(all, ctx.rank, n, 1),
                                   cross_entropy(net3), comm, o);
    torch::serialize::InputArchive in;
    std::istringstream read(bytes.str());
    in.load_from(read);
    second.load(in);
    MPU_EXPECT(second.iteration() == kSteps / 2, "iteration after load ", second.iteration());
    for (int i = kSteps / 2; i < kSteps; ++i) second.update();
    const auto a = net->parameters();
    const auto b = net3->parameters();
    for (std::size_t i = 0; i < a.size(); ++i)
      MPU_EXPECT_EQUAL(b[i].detach(), a[i].detach(), " (parameter ", i, " after resume)");
  });
}

TEST_CASE("Bad step options are refused with the option and the value", "[strategies]") {
  auto net = make_mlp();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  auto it = std::make_shared<mpu::Iterator>(make_examples(12), mpu::IteratorOptions(3));
  auto expect = [&](mpu::UpdaterOptions o, const std::string& text) {
    try {
      mpu::StandardUpdater u(net, opt, it, cross_entropy(net), torch::kCPU, o);
      FAIL("no exception for " << text);
    } catch (const mpu::InvalidArgument& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(text) != std::string::npos);
    }
  };
  mpu::UpdaterOptions o;
  o.accumulation_steps = 0;
  expect(o, "UpdaterOptions::accumulation_steps must be at least 1, got 0");
  o = {};
  o.drift_check_interval = -5;
  expect(o, "UpdaterOptions::drift_check_interval must be 0 (off) or positive, got -5");
  o = {};
  o.wire_dtype = torch::kInt;
  expect(o, "UpdaterOptions::wire_dtype must be float32, float16 or bfloat16, got Int");
}

TEST_CASE("Replicated and Sharded on GPUs equal one process of batch n*b", "[strategies][nccl]") {
  const int gpus = mpu::local_gpu_count();
  if (gpus < 1) {
    WARN("skipped: needs a GPU, this machine has none");
    return;
  }
  if (gpus == 1) WARN("1 GPU: runs 1 NCCL rank only; 2 and 4 ranks need more GPUs");
  const int n = std::min(gpus, 4);
  mpu::test::RunOptions ro;
  for (int i = 0; i < n; ++i) ro.devices.emplace_back(torch::kCUDA, i);
  mpu::test::run_ranks(
      n,
      [&](const mpu::SpawnContext& ctx) {
        // Single-process references run on the CPU inside check_equivalent; the ranks' models
        // are moved to their GPUs by the updater.
        for (auto strategy :
             {mpu::Strategy::kMasterStep, mpu::Strategy::kReplicated, mpu::Strategy::kSharded}) {
          for (const auto& [name, make] : optimizers()) {
            if (name != "SGD" && name != "Adam") continue;
            auto o = with(strategy);
            o.accumulation_steps = strategy == mpu::Strategy::kReplicated ? 2 : 1;
            check_equivalent(ctx, name, make, o);
          }
        }
      },
      ro);
}

namespace {

// Parameters whose bit patterns are negative int32s (negative floats): the drift checksum, their
// sum in int64, is negative.
struct NegativeImpl : torch::nn::Module {
  NegativeImpl() { w = register_parameter("w", torch::full({64}, -1.5f)); }
  torch::Tensor w;
};
TORCH_MODULE(Negative);

std::int64_t bit_checksum(const torch::Tensor& t) {
  return t.detach().contiguous().view(torch::kInt).sum().item<std::int64_t>();
}

// Buffers fp32 cannot carry: an int64 counter above 2^24 + 1 and a double with 52 bits of
// mantissa, next to an fp32 and a bool buffer.
struct BuffersImpl : torch::nn::Module {
  explicit BuffersImpl(int rank) {
    w = register_parameter("w", torch::zeros({3}));
    count = register_buffer("count", torch::full({2}, std::int64_t{0}, torch::kLong));
    scale = register_buffer("scale", torch::zeros({2}, torch::kDouble));
    mean = register_buffer("mean", torch::zeros({3}));
    mask = register_buffer("mask", torch::zeros({2}, torch::kBool));
    if (rank == 0) {
      count.copy_(torch::tensor({(std::int64_t{1} << 24) + 1, (std::int64_t{1} << 40) + 3}));
      scale.copy_(torch::tensor({1.0 + std::ldexp(1.0, -40), 0.1}, torch::kDouble));
      mean.copy_(torch::tensor({0.25f, -3.0f, 7.5f}));
      mask.copy_(torch::tensor({true, false}));
    }
  }
  torch::Tensor w, count, scale, mean, mask;
};
TORCH_MODULE(Buffers);

}  // namespace

TEST_CASE("The drift message names both checksums exactly, negative ones too",
          "[strategies][multiprocess]") {
  // Old code: the checksum travelled as three fp32 pieces and was put back together with
  // `static_cast<std::int64_t>(piece) << 44`, which overflows (undefined) for a negative sum
  // and printed a wrong number. Now one int64 per rank is allgathered.
  mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
    Negative net;
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.0));
    auto comm = ctx.make_communicator();
    auto o = with(mpu::Strategy::kReplicated);
    o.drift_check_interval = 1;
    mpu::detail::SyncEngine engine(*net, opt, *comm, o);
    if (ctx.rank == 1) {
      torch::NoGradGuard g;
      net->w[5].fill_(-2.5f);
    }
    const std::int64_t mine = bit_checksum(net->w);
    auto all = torch::zeros({2}, torch::kLong);
    comm->allgather(all, torch::full({1}, mine, torch::kLong));
    const auto r0 = all[0].item<std::int64_t>();
    const auto r1 = all[1].item<std::int64_t>();
    MPU_EXPECT(r0 < 0 && r1 < 0, "checksums ", r0, ", ", r1, " should be negative");
    engine.zero_grad();
    engine.arm(true);
    (net->w * 0).sum().backward();
    MPU_EXPECT_THROWS(engine.finish(1), mpu::CommError,
                      mpu::detail::cat("rank 1's parameters differ from rank 0's (bit checksums ",
                                       r1, " vs ", r0, ")"));
  });
}

TEST_CASE("broadcast_buffers copies int64, double, fp32 and bool buffers exactly",
          "[strategies][multiprocess]") {
  // Old code: every buffer went through one fp32 tensor; 2^24 + 1 arrived as 2^24, 2^40 + 3 as
  // 2^40 and 1 + 2^-40 as 1, so BatchNorm's num_batches_tracked and double statistics diverged.
  mpu::test::run_ranks(2, [&](const mpu::SpawnContext& ctx) {
    Buffers net(ctx.rank);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    auto comm = ctx.make_communicator();
    mpu::detail::SyncEngine engine(*net, opt, *comm, with(mpu::Strategy::kReplicated));
    engine.broadcast_buffers();
    const Buffers root(0);
    MPU_EXPECT_EQUAL(net->count, root->count, " int64 buffer");
    MPU_EXPECT_EQUAL(net->scale, root->scale, " double buffer");
    MPU_EXPECT_EQUAL(net->mean, root->mean, " fp32 buffer");
    MPU_EXPECT_EQUAL(net->mask, root->mask, " bool buffer");
    MPU_EXPECT(net->count[0].item<std::int64_t>() == (std::int64_t{1} << 24) + 1, "count ",
               net->count[0].item<std::int64_t>());
  });
}
