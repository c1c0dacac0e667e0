#include "mpu/reporter.h"

#include <utility>

#include "mpu/error.h"

namespace mpu {
namespace {

// Per thread, so that ranks simulated by threads, or a data-loading thread that happens to call
// a loss function, never write into another thread's observation.
thread_local Observation* t_observation = nullptr;
thread_local std::string t_prefix;

std::string shape_of(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

torch::Tensor as_scalar(const std::string& what, const std::string& key, const torch::Tensor& v) {
  MPU_CHECK(v.defined(), what, ": the value of '", key, "' is an undefined tensor");
  MPU_CHECK(v.numel() == 1, what, ": '", key, "' has ", v.numel(), " elements (shape ", shape_of(v),
            "); report a scalar, such as the batch mean");
  return v.detach().reshape({});
}

}  // namespace

void report(const std::string& key, const torch::Tensor& value) {
  if (t_observation == nullptr) return;
  std::string full = t_prefix + key;
  (*t_observation)[full] = as_scalar("mpu::report", full, value);
}

void report(const std::string& key, double value) {
  if (t_observation == nullptr) return;
  (*t_observation)[t_prefix + key] = torch::tensor(value, torch::kFloat64);
}

ObservationScope::ObservationScope(Observation& observation) noexcept : previous_(t_observation) {
  t_observation = &observation;
}

ObservationScope::~ObservationScope() noexcept {
  t_observation = previous_;
}

ReportScope::ReportScope(const std::string& prefix) : previous_(t_prefix) {
  MPU_CHECK(!prefix.empty(),
            "ReportScope: the prefix is empty (it would make keys start with '/')");
  t_prefix += prefix;
  t_prefix += '/';
}

ReportScope::~ReportScope() noexcept {
  t_prefix.swap(previous_);
}

Observation* current_observation() noexcept {
  return t_observation;
}

const std::string& current_report_prefix() noexcept {
  return t_prefix;
}

torch::Tensor accuracy(const torch::Tensor& logits, const torch::Tensor& target) {
  MPU_CHECK(logits.defined() && target.defined(), "mpu::accuracy: logits or target is undefined");
  MPU_CHECK(logits.dim() == 2, "mpu::accuracy: logits must be [N, C], got shape ",
            shape_of(logits));
  MPU_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
            "mpu::accuracy: target must be [N] with N = ", logits.size(0),
            " (the rows of logits), got shape ", shape_of(target));
  MPU_CHECK(logits.size(0) > 0, "mpu::accuracy: the batch is empty");
  return logits.argmax(1).eq(target.to(logits.device())).to(torch::kFloat32).mean();
}

void Summary::add(const torch::Tensor& value, double weight) {
  MPU_CHECK(weight > 0.0, "Summary::add: weight must be positive, got ", weight);
  torch::Tensor v = as_scalar("Summary::add", "value", value).to(torch::kFloat64);
  if (weight != 1.0) v = v * weight;
  sum_ = sum_.defined() ? sum_ + v : v;
  weight_ += weight;
}

void Summary::add(double value, double weight) {
  add(torch::tensor(value, torch::kFloat64), weight);
}

Summary Summary::restore(double sum, double weight) {
  MPU_CHECK(weight >= 0.0, "Summary::restore: weight must not be negative, got ", weight);
  Summary s;
  if (weight > 0.0) {
    s.sum_ = torch::tensor(sum, torch::kFloat64);
    s.weight_ = weight;
  }
  return s;
}

double Summary::sum() const {
  return sum_.defined() ? sum_.item<double>() : 0.0;
}

double Summary::mean() const {
  MPU_CHECK(!empty(), "Summary::mean: nothing was added");
  return sum() / weight_;
}

void DictSummary::add(const Observation& observation, double weight) {
  for (const auto& [key, value] : observation) add(key, value, weight);
}

void DictSummary::add(const std::string& key, const torch::Tensor& value, double weight) {
  summaries_[key].add(value, weight);
}

std::map<std::string, double> DictSummary::mean() const {
  std::map<std::string, double> means;
  for (const auto& [key, summary] : summaries_) {
    if (!summary.empty()) means[key] = summary.mean();
  }
  return means;
}

}  // namespace mpu
