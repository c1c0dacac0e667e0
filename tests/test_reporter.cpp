#include "catch_torch.h"

#include <thread>

#include "mpu/error.h"
#include "mpu/reporter.h"

TEST_CASE("report records into the current observation under the open scopes", "[reporter]") {
  mpu::report("ignored", 1.0);  // no observation is current: nothing happens, nothing throws
  CHECK(mpu::current_observation() == nullptr);

  mpu::Observation outer;
  mpu::Observation inner;
  {
    mpu::ObservationScope scope(outer);
    CHECK(mpu::current_observation() == &outer);
    mpu::report("plain", 2.0);
    {
      mpu::ReportScope validation("validation");
      mpu::ReportScope main("main");
      CHECK(mpu::current_report_prefix() == "validation/main/");
      mpu::report("loss", torch::tensor(0.25f));
      {
        mpu::ObservationScope nested(inner);
        mpu::report("loss", torch::tensor(0.75f));
      }
      CHECK(mpu::current_observation() == &outer);
    }
    CHECK(mpu::current_report_prefix().empty());
    mpu::ReportScope main("main");
    mpu::report("loss", torch::tensor(1.5f));
    mpu::report("loss", torch::tensor(3.5f));  // the last value of a key wins
  }
  CHECK(mpu::current_observation() == nullptr);

  REQUIRE(outer.size() == 3);
  CHECK(outer.at("plain").item<double>() == 2.0);
  CHECK(outer.at("plain").scalar_type() == torch::kFloat64);
  CHECK(outer.at("validation/main/loss").item<float>() == 0.25f);
  CHECK(outer.at("main/loss").item<float>() == 3.5f);
  REQUIRE(inner.size() == 1);
  CHECK(inner.at("validation/main/loss").item<float>() == 0.75f);
}

TEST_CASE("report stores the tensor detached, as a 0-dim view, without copying it", "[reporter]") {
  auto w = torch::full({1}, 3.0f, torch::requires_grad());
  auto loss = (w * w).sum().reshape({1, 1});
  mpu::Observation obs;
  {
    mpu::ObservationScope scope(obs);
    mpu::report("loss", loss);
  }
  const auto& stored = obs.at("loss");
  CHECK_FALSE(stored.requires_grad());
  CHECK(stored.dim() == 0);
  CHECK(stored.data_ptr() == loss.data_ptr());  // same storage: no host round trip
  CHECK(stored.item<float>() == 9.0f);
}

TEST_CASE("report rejects a tensor with more than one element, naming key and shape",
          "[reporter]") {
  mpu::Observation obs;
  mpu::ObservationScope scope(obs);
  mpu::ReportScope main("main");
  CHECK_THROWS_AS(mpu::report("loss", torch::ones({2, 3})), mpu::InvalidArgument);
  CHECK_THROWS_WITH(mpu::report("loss", torch::ones({2, 3})),
                    Catch::Contains("'main/loss' has 6 elements (shape [2, 3])"));
  CHECK_THROWS_AS(mpu::report("x", torch::Tensor()), mpu::InvalidArgument);
  CHECK_THROWS_AS(mpu::ReportScope(""), mpu::InvalidArgument);
  CHECK(obs.empty());
}

TEST_CASE("the current observation and prefix are per thread", "[reporter]") {
  mpu::Observation mine;
  mpu::ObservationScope scope(mine);
  mpu::ReportScope main("main");
  bool other_saw_none = false;
  std::string other_prefix = "unset";
  std::thread other([&] {
    other_saw_none = mpu::current_observation() == nullptr;
    other_prefix = mpu::current_report_prefix();
    mpu::report("from_other_thread", 1.0);
  });
  other.join();
  CHECK(other_saw_none);
  CHECK(other_prefix.empty());
  CHECK(mine.empty());
}

TEST_CASE("accuracy is the fraction of rows whose argmax is the target", "[reporter]") {
  // Row r has its maximum in column r % 3.
  const int64_t n = 7;
  auto logits = torch::zeros({n, 3});
  for (int64_t r = 0; r < n; ++r) logits[r][r % 3] = 1.0;
  auto target = torch::zeros({n}, torch::kLong);
  int64_t hits = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = (r % 2 == 0) ? r % 3 : (r + 1) % 3;
    target[r] = t;
    hits += (t == r % 3);
  }
  auto acc = mpu::accuracy(logits, target);
  CHECK(acc.dim() == 0);
  CHECK(acc.item<float>() == static_cast<float>(hits) / static_cast<float>(n));
  CHECK_THROWS_AS(mpu::accuracy(torch::zeros({4}), torch::zeros({4}, torch::kLong)),
                  mpu::InvalidArgument);
  CHECK_THROWS_AS(mpu::accuracy(logits, torch::zeros({n + 1}, torch::kLong)), mpu::InvalidArgument);
}

TEST_CASE("Summary and DictSummary give weighted means, accumulated in float64", "[reporter]") {
  const std::vector<float> values = {0.1f, 0.7f, 1.3f, 2.9f};
  const std::vector<double> weights = {4, 4, 3, 1};
  mpu::Summary s;
  CHECK(s.empty());
  CHECK_THROWS_AS(s.mean(), mpu::InvalidArgument);
  double sum = 0;
  double weight = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    s.add(torch::tensor(values[i]), weights[i]);
    sum += static_cast<double>(values[i]) * weights[i];
    weight += weights[i];
  }
  CHECK(s.sum_tensor().scalar_type() == torch::kFloat64);
  CHECK(s.weight() == weight);
  CHECK(s.sum() == sum);
  CHECK(s.mean() == sum / weight);
  CHECK_THROWS_AS(s.add(1.0, 0.0), mpu::InvalidArgument);

  auto r = mpu::Summary::restore(s.sum(), s.weight());
  r.add(torch::tensor(5.0f), 2.0);
  CHECK(r.mean() == (sum + 10.0) / (weight + 2.0));

  mpu::DictSummary d;
  d.add(mpu::Observation{{"a", torch::tensor(1.0f)}, {"b", torch::tensor(2.0)}});
  d.add(mpu::Observation{{"a", torch::tensor(4.0f)}});
  const auto means = d.mean();
  REQUIRE(means.size() == 2);
  CHECK(means.at("a") == 2.5);
  CHECK(means.at("b") == 2.0);
  d.clear();
  CHECK(d.empty());
}
