#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "mpu/error.h"
#include "mpu/extensions.h"

#include "misc/torch_compat.h"

namespace mpu {

IteratorBatchSource::IteratorBatchSource(std::shared_ptr<Iterator> iterator)
    : iterator_(std::move(iterator)) {
  MPU_CHECK(iterator_ != nullptr, "IteratorBatchSource: the iterator is null");
  MPU_CHECK(!iterator_->options().repeat(),
            "IteratorBatchSource: the iterator repeats, so one pass would never end; build it "
            "with IteratorOptions(batch).repeat(false).shuffle(false)");
}

void IteratorBatchSource::reset() {
  iterator_->reset();
}

std::optional<Batch> IteratorBatchSource::next() {
  if (iterator_->finished()) return std::nullopt;
  return iterator_->next();
}

namespace {

// Restores the model's training mode however the pass ends.
class EvalMode {
 public:
  explicit EvalMode(torch::nn::Module& model) : model_(model), was_training_(model.is_training()) {
    model_.eval();
  }
  ~EvalMode() noexcept { model_.train(was_training_); }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;

 private:
  torch::nn::Module& model_;
  bool was_training_;
};

// FNV-1a over the sorted keys, cut to 40 bits so that a sum over up to 2^13 ranks stays exact
// in a double.
double keys_fingerprint(const std::vector<std::string>& keys) {
  std::uint64_t h = 1469598103934665603ull;
  for (const auto& key : keys) {
    for (unsigned char c : key + '\0') {
      h ^= c;
      h *= 1099511628211ull;
    }
  }
  return static_cast<double>(h & ((std::uint64_t{1} << 40) - 1));
}

std::string joined(const std::vector<std::string>& keys) {
  std::string s;
  for (const auto& k : keys) s += (s.empty() ? "" : ", ") + k;
  return s.empty() ? "none" : s;
}

torch::Tensor to_device(const torch::Tensor& t, const torch::Device& device) {
  return t.defined() ? t.to(device) : t;
}

}  // namespace

Evaluator::Evaluator(std::shared_ptr<BatchSource> source, LossFn loss_fn, std::string name)
    : source_(std::move(source)), loss_fn_(std::move(loss_fn)), name_(std::move(name)) {
  MPU_CHECK(source_ != nullptr, "Evaluator '", name_, "': the batch source is null");
  MPU_CHECK(static_cast<bool>(loss_fn_), "Evaluator '", name_, "': the loss function is empty");
  MPU_CHECK(!name_.empty(), "Evaluator: the name is empty (it prefixes the reported keys)");
}

void Evaluator::operator()(Trainer& trainer) {
  for (const auto& [key, mean] : evaluate(trainer.updater())) {
    trainer.observation()[key] = torch::tensor(mean, torch::kFloat64);
  }
}

std::map<std::string, double> Evaluator::evaluate(Updater& updater) {
  const torch::Device device = updater.device();
  DictSummary sums;
  {
    EvalMode eval_mode(updater.model());
    torch::NoGradGuard no_grad;
    const std::string scope = name_ + "/main";
    source_->reset();
    while (auto batch = source_->next()) {
      Batch on_device{to_device(batch->data, device), to_device(batch->target, device)};
      const double weight = on_device.data.defined() && on_device.data.dim() > 0
                                ? static_cast<double>(on_device.data.size(0))
                                : 1.0;
      if (weight == 0.0) continue;
      Observation observation;
      {
        ObservationScope observe(observation);
        ReportScope prefix(scope);
        const Precision policy = updater.precision();
        detail::AutocastScope autocast(updater.device().type(), compute_dtype(policy),
                                       uses_autocast(policy));
        loss_fn_(on_device);
      }
      sums.add(observation, weight);
    }
  }

  std::vector<std::string> keys;
  for (const auto& [key, summary] : sums.summaries()) keys.push_back(key);
  const auto k = static_cast<std::int64_t>(keys.size());
  // First a fixed-size collective that every rank can join whatever it reported, so that ranks
  // with different keys fail with a message instead of a mismatched collective.
  const double local[2] = {static_cast<double>(k), keys_fingerprint(keys)};
  torch::Tensor check = torch::tensor({local[0], local[1]}, torch::kFloat64).to(device);
  if (!updater.allreduce_sum(check)) return sums.mean();

  const auto total = check.cpu();
  const double world = updater.world_size();
  MPU_CHECK(
      total[0].item<double>() == local[0] * world && total[1].item<double>() == local[1] * world,
      "Evaluator '", name_, "': the ranks reported different keys (rank ", updater.rank(),
      " reported ", joined(keys),
      "); every rank must run the same loss function on at least "
      "one batch");
  if (k == 0) return {};
  std::vector<torch::Tensor> sum_tensors;
  std::vector<double> weights;
  for (const auto& key : keys) {
    const Summary& s = sums.summaries().at(key);
    sum_tensors.push_back(s.sum_tensor().to(device));
    weights.push_back(s.weight());
  }
  torch::Tensor packed =
      torch::cat({torch::stack(sum_tensors), torch::tensor(weights, torch::kFloat64).to(device)});
  updater.allreduce_sum(packed);
  const auto host = packed.cpu();
  const double* p = host.data_ptr<double>();
  std::map<std::string, double> means;
  for (std::int64_t i = 0; i < k; ++i) means[keys[static_cast<std::size_t>(i)]] = p[i] / p[k + i];
  return means;
}

}  // namespace mpu
