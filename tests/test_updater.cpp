// Updaters: equivalence of n processes of batch b with one process of batch n·b, the seed's own
// cases, and every validation error. CPU through Gloo everywhere; GPUs through NCCL where
// present ([nccl]).
#include <unistd.h>

#include "catch_torch.h"
#include "remove_tree.h"

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <type_traits>
#include <utility>

#include "mpu/communicator.h"
#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/reporter.h"
#include "mpu/trainer.h"
#include "mpu/updater.h"
#include "multiprocess.h"

namespace {

constexpr int kIterations = 20;
constexpr std::int64_t kBatch = 4;  // per process
constexpr std::int64_t kFeatures = 8;
constexpr std::int64_t kClasses = 3;

struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(kFeatures, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, kClasses));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::tanh(fc1->forward(x));
    mpu::report("hidden_mean", h.mean());  // a submodule that reports, as in the seed's test
    return fc2->forward(h);
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

std::shared_ptr<NetImpl> make_net() {
  mpu::manual_seed(1234);
  return Net().ptr();
}

// The whole data set, in the order one process of batch n·b reads it.
std::shared_ptr<mpu::TensorDataset> make_data(std::int64_t n) {
  mpu::manual_seed(99);
  auto x = torch::randn({n, kFeatures});
  auto y = torch::randint(kClasses, {n}, torch::kInt64);
  return std::make_shared<mpu::TensorDataset>(x, y);
}

// Process k of n reads, in batch i, the examples i·n·b + k·b + j of the whole set: together the
// n batches i are exactly batch i of the single process.
std::shared_ptr<mpu::Iterator> shard_for(const mpu::DatasetPtr& all, int k, int n) {
  std::vector<std::int64_t> idx;
  const std::int64_t big = n * kBatch;
  for (std::int64_t i = 0; i < all->size() / big; ++i) {
    for (std::int64_t j = 0; j < kBatch; ++j) idx.push_back(i * big + k * kBatch + j);
  }
  auto subset = std::make_shared<mpu::SubsetDataset>(all, idx);
  return std::make_shared<mpu::Iterator>(
      subset, mpu::IteratorOptions(kBatch).shuffle(false).prefetch(false));
}

using MakeOptimizer =
    std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

std::vector<std::pair<std::string, MakeOptimizer>> optimizers() {
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

mpu::LossFunction loss_of(const std::shared_ptr<NetImpl>& net) {
  return [net](const mpu::Batch& b) {
    auto y = net->forward(b.data);
    auto loss = torch::nn::functional::cross_entropy(y, b.target);
    mpu::report("loss", loss);
    return loss;
  };
}

// Parameters after kIterations of one process of batch n·b.
std::vector<torch::Tensor> reference_run(const MakeOptimizer& make_opt, int n,
                                         const torch::Device& device) {
  auto all = make_data(n * kBatch * kIterations);
  auto net = make_net();
  auto opt = make_opt(net->parameters());
  auto it = std::make_shared<mpu::Iterator>(
      all, mpu::IteratorOptions(n * kBatch).shuffle(false).prefetch(false));
  mpu::StandardUpdater updater(net, *opt, it, loss_of(net), device);
  for (int i = 0; i < kIterations; ++i) updater.update();
  std::vector<torch::Tensor> out;
  for (const auto& p : net->parameters()) out.push_back(p.detach().to(torch::kCPU).clone());
  return out;
}

std::vector<torch::Tensor> mpu_run(const MakeOptimizer& make_opt,
                                   const std::vector<torch::Device>& devices,
                                   const mpu::ScalingPolicy& policy) {
  const int n = static_cast<int>(devices.size());
  auto all = make_data(n * kBatch * kIterations);
  auto net = make_net();
  auto opt = make_opt(net->parameters());
  std::vector<std::shared_ptr<mpu::Iterator>> its;
  for (int k = 0; k < n; ++k) its.push_back(shard_for(all, k, n));
  mpu::UpdaterOptions options;
  options.scaling = policy;
  mpu::MultiprocessParallelUpdater updater(net, *opt, its, loss_of(net), devices, options);
  for (int i = 0; i < kIterations; ++i) updater.update();
  updater.finalize();
  std::vector<torch::Tensor> out;
  for (const auto& p : net->parameters()) out.push_back(p.detach().to(torch::kCPU).clone());
  return out;
}

void check_close(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double diff = (a[i] - b[i]).abs().max().item<double>();
    INFO("parameter " << i << ": max |difference| " << diff);
    CHECK(torch::allclose(a[i], b[i], /*rtol=*/1e-5, /*atol=*/1e-6));
  }
}

std::vector<torch::Device> cpus(int n) {
  return std::vector<torch::Device>(static_cast<std::size_t>(n), torch::kCPU);
}

void equivalence(const std::string& name, const std::vector<torch::Device>& devices) {
  for (const auto& [opt_name, make_opt] : optimizers()) {
    if (opt_name != name) continue;
    const int n = static_cast<int>(devices.size());
    for (const auto& [policy_name, policy] : {std::pair{"sum", mpu::ScalingPolicy::sum()},
                                              std::pair{"mean", mpu::ScalingPolicy::mean()}}) {
      SECTION(opt_name + " n=" + std::to_string(n) + " " + policy_name) {
        // Each run in a child of its own: see mpu::test::run_isolated.
        const auto parallel =
            mpu::test::run_isolated([&, p = policy] { return mpu_run(make_opt, devices, p); });
        const auto reference =
            mpu::test::run_isolated([&] { return reference_run(make_opt, n, devices[0]); });
        check_close(parallel, reference);
        // And the parameters moved: the comparison is not between two untouched models.
        const auto initial = make_net()->parameters();
        CHECK_FALSE(torch::allclose(parallel[0], initial[0]));
      }
    }
  }
}

}  // namespace

TEST_CASE("MultiprocessParallelUpdater on n CPUs equals one process of batch n*b",
          "[updater][multiprocess]") {
  for (const auto& [name, make] : optimizers()) {
    (void)make;
    for (int n : {2, 4}) {
      DYNAMIC_SECTION(name << " n=" << n) {
        equivalence(name, cpus(n));
      }
    }
  }
}

TEST_CASE("MultiprocessParallelUpdater on GPUs equals one process of batch n*b",
          "[updater][multiprocess][nccl]") {
  const int gpus = mpu::local_gpu_count();
  if (gpus < 1) {
    WARN("skipped: needs a GPU, this machine has none");
    return;
  }
  if (gpus == 1) WARN("1 GPU: runs 1 NCCL rank only; 2 and 4 ranks need more GPUs");
  std::vector<torch::Device> devices;
  for (int i = 0; i < std::min(gpus, 4); ++i) devices.emplace_back(torch::kCUDA, i);
  for (const auto& [name, make] : optimizers()) {
    (void)make;
    DYNAMIC_SECTION(name << " n=" << devices.size()) {
      equivalence(name, devices);
    }
  }
}

TEST_CASE(
    "DistributedUpdater on 2 and 4 ranks equals one process of batch n*b, bit-identical "
    "across ranks",
    "[updater][multiprocess]") {
  for (int n : {2, 4}) {
    DYNAMIC_SECTION("n=" << n) {
      mpu::test::run_ranks(n, [n](const mpu::SpawnContext& ctx) {
        for (const auto& [name, make_opt] : optimizers()) {
          auto all = make_data(n * kBatch * kIterations);
          auto net = make_net();
          auto opt = make_opt(net->parameters());
          auto comm = ctx.make_communicator();
          mpu::DistributedUpdater updater(net, *opt, shard_for(all, ctx.rank, n), loss_of(net),
                                          comm);
          for (int i = 0; i < kIterations; ++i) updater.update();
          const auto reference = reference_run(make_opt, n, torch::kCPU);
          const auto params = net->parameters();
          for (std::size_t i = 0; i < params.size(); ++i) {
            auto mine = params[i].detach().clone();
            MPU_EXPECT(torch::allclose(mine, reference[i], 1e-5, 1e-6), name, " parameter ", i,
                       " differs from the single-process run by ",
                       (mine - reference[i]).abs().max().item<double>());
            auto root = mine.clone();
            comm->broadcast(root, 0);
            MPU_EXPECT_EQUAL(mine, root, " (", name, " parameter ", i, " on rank ", ctx.rank,
                             " vs rank 0)");
          }
        }
      });
    }
  }
}

TEST_CASE(
    "MultiprocessParallelUpdater: one forward per update on the master, identical "
    "parameters on every process at every step",
    "[updater][multiprocess]") {
  const int n = 3;
  const auto dir =
      std::filesystem::temp_directory_path() / ("mpu_updater_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto all = make_data(n * kBatch * kIterations);
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  std::vector<std::shared_ptr<mpu::Iterator>> its;
  for (int k = 0; k < n; ++k) its.push_back(shard_for(all, k, n));
  int calls = 0;  // counted in each process's own copy
  auto inner = loss_of(net);
  auto loss_fn = [&, dir](const mpu::Batch& b) {
    // Each process records a checksum of the parameters it starts this forward with.
    double sum = 0;
    for (const auto& p : net->parameters())
      sum += p.detach().to(torch::kDouble).sum().item<double>();
    std::ofstream(dir / ("step" + std::to_string(calls) + "_pid" + std::to_string(::getpid())))
        << std::hexfloat << sum;
    ++calls;
    return inner(b);
  };
  mpu::MultiprocessParallelUpdater updater(net, opt, its, loss_fn, cpus(n));
  for (int i = 0; i < 5; ++i) updater.update();
  CHECK(calls == 5);
  CHECK(updater.iteration() == 5);
  updater.finalize();
  CHECK(updater.worker_pids().empty());
  for (int step = 0; step < 5; ++step) {
    std::set<std::string> sums;
    int files = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      const auto name = e.path().filename().string();
      if (name.rfind("step" + std::to_string(step) + "_", 0) != 0) continue;
      std::ifstream in(e.path());
      std::string s;
      in >> s;
      sums.insert(s);
      ++files;
    }
    INFO("step " << step);
    CHECK(files == n);
    CHECK(sums.size() == 1);
  }
  mpu::test::remove_tree(dir.string());
}

TEST_CASE("MultiprocessParallelUpdater on a single device", "[updater][multiprocess]") {
  auto all = make_data(kBatch * kIterations);
  auto net = make_net();
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-2));
  std::vector<std::shared_ptr<mpu::Iterator>> its{shard_for(all, 0, 1)};
  mpu::MultiprocessParallelUpdater updater(net, opt, its, loss_of(net),
                                           std::vector<torch::Device>{torch::kCPU});
  CHECK(updater.scaling_changes().empty());
  for (int i = 0; i < kIterations; ++i) updater.update();
  updater.finalize();
  std::vector<torch::Tensor> params;
  for (const auto& p : net->parameters()) params.push_back(p.detach().clone());
  check_close(params, reference_run(
                          [](auto p) {
                            return std::make_unique<torch::optim::Adam>(
                                p, torch::optim::AdamOptions(1e-2));
                          },
                          1, torch::kCPU));
}

TEST_CASE("MultiprocessParallelUpdater rescales exactly once, also across save and load",
          "[updater][multiprocess]") {
  auto all = make_data(2 * kBatch * kIterations);
  auto make_its = [&] {
    return std::vector<std::shared_ptr<mpu::Iterator>>{shard_for(all, 0, 2), shard_for(all, 1, 2)};
  };
  auto lr_of = [](torch::optim::Optimizer& o) {
    return static_cast<torch::optim::SGDOptions&>(o.param_groups()[0].options()).lr();
  };
  // The first run forks and trains in a child of its own (see mpu::test::run_isolated), and
  // hands back its saved state and its rescaled learning rate.
  const auto saved = mpu::test::run_isolated([&] {
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::MultiprocessParallelUpdater updater(net, opt, make_its(), loss_of(net), cpus(2));
    const double lr = lr_of(opt);
    for (int i = 0; i < 3; ++i) updater.update();
    torch::serialize::OutputArchive archive;
    updater.save(archive);
    std::ostringstream out;
    archive.save_to(out);
    const std::string b = out.str();
    return std::vector<torch::Tensor>{
        torch::tensor(std::vector<std::uint8_t>(b.begin(), b.end()), torch::kUInt8),
        torch::tensor(lr, torch::kDouble)};
  });
  REQUIRE(saved.size() == 2);
  CHECK(saved[1].item<double>() == 0.05);
  const auto raw = saved[0].contiguous();
  const std::string bytes(reinterpret_cast<const char*>(raw.data_ptr<std::uint8_t>()),
                          static_cast<std::size_t>(raw.numel()));
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  mpu::MultiprocessParallelUpdater updater(net, opt, make_its(), loss_of(net), cpus(2));
  std::istringstream in(bytes);
  torch::serialize::InputArchive loaded;
  loaded.load_from(in);
  updater.load(loaded);
  CHECK(lr_of(opt) == 0.05);
  CHECK(updater.iteration() == 3);
  updater.update();
  CHECK(updater.iteration() == 4);
}

TEST_CASE("MultiprocessParallelUpdater refuses bad input with a message that says what to do",
          "[updater]") {
  auto all = make_data(64);
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  auto it = [&](std::int64_t n) {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    return std::make_shared<mpu::Iterator>(std::make_shared<mpu::SubsetDataset>(all, idx),
                                           mpu::IteratorOptions(4));
  };
  using Devs = std::vector<torch::Device>;
  auto make = [&](std::vector<std::shared_ptr<mpu::Iterator>> its, Devs devs) {
    mpu::MultiprocessParallelUpdater u(net, opt, std::move(its), loss_of(net), std::move(devs));
  };
  CHECK_THROWS_WITH(make({it(16), it(16), it(16)}, cpus(4)),
                    Catch::Contains("3 iterators for 4 devices"));
  CHECK_THROWS_WITH(make({it(16), it(12)}, cpus(2)),
                    Catch::Contains("datasets differ in length") &&
                        Catch::Contains("iterator 0 has 16 examples, iterator 1 has 12"));
  CHECK_THROWS_WITH(make({it(16), it(16)}, Devs{torch::Device("cuda:1"), torch::Device("cuda:1")}),
                    Catch::Contains("cuda:1 is listed twice"));
  CHECK_THROWS_WITH(make({it(16), it(16)}, Devs{torch::kCPU, torch::Device("cuda:0")}),
                    Catch::Contains("mix CPU and GPU"));
  CHECK_THROWS_WITH(
      make({it(16), it(16)}, Devs{torch::Device("cuda:60"), torch::Device("cuda:61")}),
      Catch::Contains("cuda:60 is not present"));
  CHECK_THROWS_WITH(make({}, Devs{}), Catch::Contains("no devices"));
  std::map<std::string, torch::Device> no_main{{"second", torch::kCPU}};
  CHECK_THROWS_WITH(mpu::MultiprocessParallelUpdater(net, opt, {it(16)}, loss_of(net), no_main),
                    Catch::Contains("needs a \"main\" entry"));

  auto empty = std::make_shared<torch::nn::Module>();
  CHECK_THROWS_WITH(mpu::MultiprocessParallelUpdater(empty, opt, {it(16)}, loss_of(net), cpus(1)),
                    Catch::Contains("the model has no parameters"));
}

// Before the fix a meta-device model was accepted; its first update failed inside the packing
// layer with a bare c10 error and a long backtrace that named no parameter.
TEST_CASE("The updaters refuse a model whose parameters are on the meta device, naming one",
          "[updater]") {
  auto all = make_data(16);
  auto net = std::make_shared<torch::nn::Module>();
  net->register_module("fc1", torch::nn::Linear(kFeatures, kClasses));
  net->register_parameter("scale", torch::empty({kClasses}, torch::Device(torch::kMeta)));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  auto loss = [](const mpu::Batch& b) { return b.data.sum(); };
  auto it = [&] { return std::make_shared<mpu::Iterator>(all, mpu::IteratorOptions(4)); };
  CHECK_THROWS_AS(mpu::StandardUpdater(net, opt, it(), loss), mpu::InvalidArgument);
  CHECK_THROWS_WITH(mpu::StandardUpdater(net, opt, it(), loss),
                    Catch::Contains("StandardUpdater: parameter 'scale' is on the meta device") &&
                        Catch::Contains("materialise"));
  CHECK_THROWS_WITH(
      mpu::MultiprocessParallelUpdater(net, opt, {it(), it()}, loss, cpus(2)),
      Catch::Contains("MultiprocessParallelUpdater: parameter 'scale' is on the meta device"));
}

namespace {
// Saving runs collectives (the sharded state is gathered, the workers are asked for their
// iterators), so it must not be callable on a const updater or trainer; it was const before.
template <typename T, typename = void>
struct SavableWhenConst : std::false_type {};
template <typename T>
struct SavableWhenConst<T, std::void_t<decltype(std::declval<const T&>().save(
                               std::declval<torch::serialize::OutputArchive&>()))>>
    : std::true_type {};
}  // namespace

TEST_CASE("save() is not const: it is collective and advances the communicator", "[updater]") {
  STATIC_REQUIRE_FALSE(SavableWhenConst<mpu::Updater>::value);
  STATIC_REQUIRE_FALSE(SavableWhenConst<mpu::StandardUpdater>::value);
  STATIC_REQUIRE_FALSE(SavableWhenConst<mpu::MultiprocessParallelUpdater>::value);
  STATIC_REQUIRE_FALSE(SavableWhenConst<mpu::DistributedUpdater>::value);
  STATIC_REQUIRE_FALSE(SavableWhenConst<mpu::Trainer>::value);
}

TEST_CASE("MultiprocessParallelUpdater refuses to fork once CUDA is initialised",
          "[updater][cuda]") {
  if (mpu::local_gpu_count() < 1) {
    WARN("skipped: needs a GPU, this machine has none");
    return;
  }
  (void)torch::cuda::device_count();  // initialises CUDA, as user code often does by accident
  REQUIRE(mpu::cuda_initialized());
  auto all = make_data(64);
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  std::vector<std::shared_ptr<mpu::Iterator>> its{shard_for(all, 0, 1)};
  CHECK_THROWS_WITH(
      mpu::MultiprocessParallelUpdater(net, opt, its, loss_of(net),
                                       std::vector<torch::Device>{torch::Device("cuda:0")}),
      Catch::Contains("CUDA is already initialised") && Catch::Contains("mpu::local_gpus()"));
}

TEST_CASE("DistributedUpdater names the first parameter that differs between ranks",
          "[updater][multiprocess]") {
  mpu::test::run_ranks(2, [](const mpu::SpawnContext& ctx) {
    mpu::manual_seed(0);
    auto net = std::make_shared<torch::nn::Module>();
    net->register_parameter("a", torch::zeros({2, 3}));
    net->register_parameter("b", torch::zeros({ctx.rank == 0 ? 4 : 5}));
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    auto it = std::make_shared<mpu::Iterator>(make_data(16), mpu::IteratorOptions(4));
    auto loss = [](const mpu::Batch& b) { return b.data.sum(); };
    auto comm = ctx.make_communicator();
    if (ctx.rank == 1) {
      MPU_EXPECT_THROWS(mpu::DistributedUpdater(net, opt, it, loss, comm), mpu::InvalidArgument,
                        "parameter #1: rank 0 has 'b Float [4]', rank 1 has 'b Float [5]'");
    } else {
      MPU_EXPECT_THROWS(mpu::DistributedUpdater(net, opt, it, loss, comm), mpu::InvalidArgument,
                        "the model on rank 1 differs from rank 0's");
    }
  });
}

TEST_CASE("The engine's layout keeps zero-copy views 16-byte aligned behind a small bias",
          "[updater]") {
  // In reverse registration order a 10-class head's bias (10 floats, 40 bytes) comes first, and
  // every view behind it would start 8 bytes off 16-byte alignment. The engine moves parameters
  // whose size is not a multiple of 8 elements to the end and keeps the rest in reverse order.
  mpu::manual_seed(1);
  auto net = torch::nn::Sequential(torch::nn::Linear(12, 32), torch::nn::Tanh(),
                                   torch::nn::Linear(32, 10));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto data = std::make_shared<mpu::TensorDataset>(torch::randn({8, 12}),
                                                   torch::randint(0, 10, {8}, torch::kLong));
  auto it = std::make_shared<mpu::Iterator>(data, mpu::IteratorOptions(4));
  mpu::LossFunction loss = [net](const mpu::Batch& b) mutable {
    return torch::nn::functional::cross_entropy(net->forward(b.data), b.target);
  };
  std::vector<std::shared_ptr<mpu::Iterator>> its{it};
  mpu::MultiprocessParallelUpdater u(net.ptr(), opt, its, loss,
                                     std::vector<torch::Device>{torch::kCPU});
  const auto at = [&net](const char* name) {
    return reinterpret_cast<std::uintptr_t>(net->named_parameters()[name].data_ptr());
  };
  const auto check_layout = [&] {
    const std::uintptr_t base = at("2.weight");  // first: the last layer's weight
    CHECK(at("0.bias") == base + 320 * sizeof(float));
    CHECK(at("0.weight") == base + (320 + 32) * sizeof(float));
    CHECK(at("2.bias") == base + (320 + 32 + 384) * sizeof(float));  // last: 10 elements
    for (const char* name : {"2.weight", "0.bias", "0.weight", "2.bias"}) {
      INFO(name);
      CHECK(at(name) % 16 == 0);
    }
  };
  for (int i = 0; i < 3; ++i) {
    u.update();  // the engine is built at the first update
    INFO("after update " << i + 1);
    check_layout();
  }
  u.finalize();
}
