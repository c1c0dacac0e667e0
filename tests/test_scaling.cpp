#include "catch_torch.h"

#include "mpu/error.h"
#include "mpu/scaling.h"

namespace {

using torch::optim::Optimizer;

// Steps `opt` 5 times on the parameter `p`, each time with gradient `factor` * g_k where g_k is a
// fixed pseudo-random sequence; returns the final parameter.
torch::Tensor run_steps(
    const std::function<std::unique_ptr<Optimizer>(std::vector<torch::Tensor>)>& make, int n,
    const mpu::ScalingPolicy& policy, double factor) {
  torch::manual_seed(7);
  auto p = torch::randn({64}, torch::kFloat64).requires_grad_(true);
  auto opt = make({p});
  mpu::apply_scaling(*opt, n, policy);
  for (int k = 0; k < 5; ++k) {
    torch::manual_seed(100 + k);
    p.mutable_grad() = torch::randn({64}, torch::kFloat64) * factor;
    opt->step();
  }
  return p.detach();
}

struct Case {
  const char* name;
  std::function<std::unique_ptr<Optimizer>(std::vector<torch::Tensor>)> make;
};

std::vector<Case> cases() {
  using namespace torch::optim;
  return {
      {"SGD momentum nesterov wd",
       [](auto ps) {
         return std::make_unique<SGD>(
             ps, SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-2));
       }},
      {"SGD dampening",
       [](auto ps) {
         return std::make_unique<SGD>(ps, SGDOptions(0.1).momentum(0.5).dampening(0.3));
       }},
      {"Adam wd amsgrad",
       [](auto ps) {
         return std::make_unique<Adam>(
             ps, AdamOptions(1e-2).weight_decay(1e-2).amsgrad(true).eps(1e-3));
       }},
      {"AdamW",
       [](auto ps) {
         return std::make_unique<AdamW>(ps, AdamWOptions(1e-2).weight_decay(0.1).eps(1e-3));
       }},
      {"Adagrad",
       [](auto ps) {
         return std::make_unique<Adagrad>(
             ps, AdagradOptions(1e-1).weight_decay(1e-2).initial_accumulator_value(0.5).eps(1e-3));
       }},
      {"RMSprop centered momentum",
       [](auto ps) {
         return std::make_unique<RMSprop>(
             ps, RMSpropOptions(1e-2).momentum(0.9).centered(true).weight_decay(1e-2).eps(1e-3));
       }},
  };
}

struct MyOptimizer : torch::optim::SGD {
  using SGD::SGD;
};

}  // namespace

TEST_CASE("Sum rescaling makes n-times-larger gradients step exactly like the mean", "[scaling]") {
  for (const auto& c : cases()) {
    for (int n : {2, 3, 4}) {
      SECTION(std::string(c.name) + " n=" + std::to_string(n)) {
        const auto reference = run_steps(c.make, 1, mpu::ScalingPolicy::sum(), 1.0);
        const auto summed = run_steps(c.make, n, mpu::ScalingPolicy::sum(), n);
        INFO("max difference " << (reference - summed).abs().max().item<double>());
        CHECK(torch::allclose(reference, summed, 1e-12, 1e-12));
        // Without rescaling the summed gradient gives a different trajectory: the test can fail.
        const auto unscaled = run_steps(c.make, n, mpu::ScalingPolicy::sum_unscaled(), n);
        CHECK_FALSE(torch::allclose(reference, unscaled, 1e-9, 1e-9));
      }
    }
  }
}

TEST_CASE("apply_scaling reports every change with old and new values", "[scaling]") {
  auto p = torch::zeros({3}, torch::requires_grad());
  torch::optim::SGD sgd({p}, torch::optim::SGDOptions(0.4).weight_decay(1e-4));
  sgd.add_param_group(
      torch::optim::OptimizerParamGroup({torch::zeros({2}, torch::requires_grad())},
                                        std::make_unique<torch::optim::SGDOptions>(0.2)));
  const auto changes = mpu::apply_scaling(sgd, 4, mpu::ScalingPolicy::sum());
  REQUIRE(changes.size() == 3);
  CHECK(changes[0].optimizer == "SGD");
  CHECK(changes[0].group == 0);
  CHECK(changes[0].option == "lr");
  CHECK(changes[0].before == 0.4);
  CHECK(changes[0].after == 0.1);
  CHECK(changes[1].option == "weight_decay");
  CHECK(changes[1].after == 4e-4);
  CHECK(changes[2].group == 1);
  CHECK(changes[2].after == 0.05);
  auto& o1 = static_cast<torch::optim::SGDOptions&>(sgd.param_groups()[1].options());
  CHECK(o1.lr() == 0.05);

  torch::optim::AdamW adamw({p}, torch::optim::AdamWOptions(1e-3).weight_decay(0.1));
  const auto ac = mpu::apply_scaling(adamw, 2, mpu::ScalingPolicy::sum());
  REQUIRE(ac.size() == 1);  // decoupled weight decay stays
  CHECK(ac[0].option == "eps");
  CHECK(ac[0].after == 2e-8);
}

TEST_CASE("Mean, opt-out and a single process change nothing", "[scaling]") {
  auto p = torch::zeros({3}, torch::requires_grad());
  torch::optim::Adam adam({p}, torch::optim::AdamOptions(1e-3));
  CHECK(mpu::apply_scaling(adam, 4, mpu::ScalingPolicy::mean()).empty());
  CHECK(mpu::apply_scaling(adam, 4, mpu::ScalingPolicy::sum_unscaled()).empty());
  CHECK(mpu::apply_scaling(adam, 1, mpu::ScalingPolicy::sum()).empty());
  CHECK(static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).eps() == 1e-8);
}

TEST_CASE("LBFGS, unknown optimizers and bad counts are refused with a reason", "[scaling]") {
  auto p = torch::zeros({3}, torch::requires_grad());
  torch::optim::LBFGS lbfgs({p}, torch::optim::LBFGSOptions(1));
  CHECK_THROWS_AS(mpu::apply_scaling(lbfgs, 2, mpu::ScalingPolicy::sum()), mpu::InvalidArgument);
  CHECK_THROWS_WITH(mpu::apply_scaling(lbfgs, 2, mpu::ScalingPolicy::mean()),
                    Catch::Contains("LBFGS cannot be used") && Catch::Contains("closure"));

  // A subclass of SGD is not SGD's exact type, but dynamic_cast still matches it.
  MyOptimizer mine({p}, torch::optim::SGDOptions(0.3));
  CHECK(mpu::apply_scaling(mine, 3, mpu::ScalingPolicy::sum()).size() == 1);

  CHECK_THROWS_WITH(mpu::apply_scaling(mine, 0, mpu::ScalingPolicy::sum()),
                    Catch::Contains("at least 1, got 0"));
}

namespace {
struct Unknown : torch::optim::Optimizer {
  explicit Unknown(std::vector<torch::Tensor> ps)
      : Optimizer({torch::optim::OptimizerParamGroup(std::move(ps))},
                  std::make_unique<torch::optim::SGDOptions>(0.1)) {}
  torch::Tensor step(LossClosure) override { return {}; }
  void save(torch::serialize::OutputArchive&) const override {}
  void load(torch::serialize::InputArchive&) override {}
};
}  // namespace

TEST_CASE("A user-defined optimizer needs a registered rule or an explicit opt-out", "[scaling]") {
  auto p = torch::zeros({3}, torch::requires_grad());
  Unknown opt({p});
  CHECK_THROWS_WITH(mpu::apply_scaling(opt, 2, mpu::ScalingPolicy::sum()),
                    Catch::Contains("no rescaling rule for optimizer type") &&
                        Catch::Contains("Unknown") && Catch::Contains("register_scaling_rule") &&
                        Catch::Contains("sum_unscaled"));
  CHECK_NOTHROW(mpu::apply_scaling(opt, 2, mpu::ScalingPolicy::sum_unscaled()));

  mpu::register_scaling_rule<Unknown>("Unknown", [](Unknown& o, int n) {
    auto& opts = static_cast<torch::optim::SGDOptions&>(o.param_groups()[0].options());
    double lr = opts.lr();
    auto c = mpu::scale_option(lr, 1.0 / n, "Unknown", 0, "lr");
    opts.lr(lr);
    return std::vector<mpu::ScalingChange>{c};
  });
  const auto changes = mpu::apply_scaling(opt, 2, mpu::ScalingPolicy::sum());
  REQUIRE(changes.size() == 1);
  CHECK(changes[0].after == 0.05);
  CHECK(mpu::optimizer_name(opt) == "Unknown");
}
