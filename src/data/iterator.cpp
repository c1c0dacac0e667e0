#include "mpu/iterator.h"

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <functional>
#include <limits>
#include <numeric>
#include <thread>

#include "misc/log.h"
#include "mpu/device_data.h"

namespace mpu {
namespace {

// SplitMix64 (Steele, Lea, Flood 2014): one step of the generator, used as a mixing function.
std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

torch::Tensor index_tensor(const std::vector<std::int64_t>& indices, const torch::Device& device) {
  // from_blob does not copy; clone() gives the tensor its own storage before the vector can go.
  auto t = torch::from_blob(const_cast<std::int64_t*>(indices.data()),
                            {static_cast<std::int64_t>(indices.size())}, torch::kLong)
               .clone();
  return device.is_cpu() ? t : t.to(device);
}

void check_split(const char* what, const DatasetPtr& dataset, int n) {
  MPU_CHECK(dataset != nullptr, what, ": the dataset is null");
  MPU_CHECK(n >= 1, what, ": n = ", n, " shards; need at least 1");
  MPU_CHECK(n <= dataset->size(), what, ": ", n, " shards of a dataset of ", dataset->size(),
            " examples would be empty; need n <= dataset size");
}

}  // namespace

std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t a, std::uint64_t b) noexcept {
  return splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b);
}

std::uint64_t uniform_below(Rng& rng, std::uint64_t n) {
  MPU_CHECK(n > 0, "uniform_below: the range [0, n) is empty (n = 0)");
  // Reject the lowest 2^64 mod n outputs, so that the accepted ones are a multiple of n.
  const std::uint64_t threshold = (0 - n) % n;
  for (;;) {
    const std::uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

std::vector<std::int64_t> random_permutation(std::int64_t n, std::uint64_t seed) {
  MPU_CHECK(n >= 0, "random_permutation: n = ", n, " is negative");
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  Rng rng(seed);
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(uniform_below(rng, static_cast<std::uint64_t>(i + 1)));
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(j)]);
  }
  return order;
}

std::vector<std::int64_t> epoch_order(std::int64_t n, std::uint64_t seed, std::int64_t epoch,
                                      bool shuffle) {
  MPU_CHECK(epoch >= 0, "epoch_order: epoch = ", epoch, " is negative");
  if (shuffle) return random_permutation(n, derive_seed(seed, static_cast<std::uint64_t>(epoch)));
  MPU_CHECK(n >= 0, "epoch_order: n = ", n, " is negative");
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  return order;
}

// ------------------------------------------------------------------------------------------------
// Dataset

Batch Dataset::get(std::int64_t index, std::int64_t epoch) const {
  MPU_CHECK(index >= 0 && index < size(), "Dataset::get: index ", index,
            " is out of range for a dataset of ", size(), " examples");
  return do_get(index, epoch);
}

Batch Dataset::get_batch(const std::vector<std::int64_t>& indices,
                         const std::vector<std::int64_t>& epochs) const {
  MPU_CHECK(!indices.empty(), "Dataset::get_batch: no indices");
  MPU_CHECK(indices.size() == epochs.size(), "Dataset::get_batch: ", indices.size(),
            " indices but ", epochs.size(), " epochs; need one epoch per index");
  const std::int64_t n = size();
  for (std::size_t i = 0; i < indices.size(); ++i) {
    MPU_CHECK(indices[i] >= 0 && indices[i] < n, "Dataset::get_batch: indices[", i,
              "] = ", indices[i], " is out of range for a dataset of ", n, " examples");
  }
  return do_get_batch(indices, epochs);
}

Batch Dataset::get_batch(const std::vector<std::int64_t>& indices, std::int64_t epoch) const {
  return get_batch(indices, std::vector<std::int64_t>(indices.size(), epoch));
}

Batch Dataset::do_get_batch(const std::vector<std::int64_t>& indices,
                            const std::vector<std::int64_t>& epochs) const {
  std::vector<torch::Tensor> data;
  std::vector<torch::Tensor> targets;
  data.reserve(indices.size());
  targets.reserve(indices.size());
  for (std::size_t i = 0; i < indices.size(); ++i) {
    Batch example = do_get(indices[i], epochs[i]);
    data.push_back(std::move(example.data));
    targets.push_back(std::move(example.target));
  }
  return Batch{torch::stack(data), torch::stack(targets)};
}

TensorDataset::TensorDataset(torch::Tensor data, torch::Tensor targets)
    : data_(std::move(data)), targets_(std::move(targets)) {
  MPU_CHECK(data_.defined() && targets_.defined(), "TensorDataset: data or targets is undefined");
  MPU_CHECK(data_.dim() >= 1 && targets_.dim() >= 1, "TensorDataset: data has ", data_.dim(),
            " dims and targets ", targets_.dim(), "; both need a dim 0 that counts examples");
  MPU_CHECK(data_.size(0) == targets_.size(0), "TensorDataset: data has ", data_.size(0),
            " examples (dim 0) but targets has ", targets_.size(0));
}

Batch TensorDataset::do_get(std::int64_t index, std::int64_t /*epoch*/) const {
  return Batch{data_[index], targets_[index]};
}

Batch TensorDataset::do_get_batch(const std::vector<std::int64_t>& indices,
                                  const std::vector<std::int64_t>& /*epochs*/) const {
  return Batch{data_.index_select(0, index_tensor(indices, data_.device())),
               targets_.index_select(0, index_tensor(indices, targets_.device()))};
}

SubsetDataset::SubsetDataset(DatasetPtr base, std::vector<std::int64_t> indices)
    : base_(std::move(base)), indices_(std::move(indices)) {
  MPU_CHECK(base_ != nullptr, "SubsetDataset: the base dataset is null");
  const std::int64_t n = base_->size();
  for (std::size_t i = 0; i < indices_.size(); ++i) {
    MPU_CHECK(indices_[i] >= 0 && indices_[i] < n, "SubsetDataset: indices[", i,
              "] = ", indices_[i], " is out of range for a base dataset of ", n, " examples");
  }
}

Batch SubsetDataset::do_get(std::int64_t index, std::int64_t epoch) const {
  return base_->get(indices_[static_cast<std::size_t>(index)], epoch);
}

Batch SubsetDataset::do_get_batch(const std::vector<std::int64_t>& indices,
                                  const std::vector<std::int64_t>& epochs) const {
  std::vector<std::int64_t> mapped(indices.size());
  for (std::size_t i = 0; i < indices.size(); ++i) {
    mapped[i] = indices_[static_cast<std::size_t>(indices[i])];
  }
  return base_->get_batch(mapped, epochs);
}

// ------------------------------------------------------------------------------------------------
// Shards

namespace {

std::vector<DatasetPtr> blocks_of(const DatasetPtr& dataset, int n,
                                  const std::vector<std::int64_t>& order) {
  const std::int64_t m = dataset->size() / n;
  std::vector<DatasetPtr> shards;
  shards.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    const auto begin = order.begin() + i * m;
    shards.push_back(
        std::make_shared<SubsetDataset>(dataset, std::vector<std::int64_t>(begin, begin + m)));
  }
  return shards;
}

}  // namespace

std::vector<DatasetPtr> split_dataset_n(const DatasetPtr& dataset, int n) {
  check_split("split_dataset_n", dataset, n);
  return blocks_of(dataset, n, epoch_order(dataset->size(), 0, 0, /*shuffle=*/false));
}

std::vector<DatasetPtr> split_dataset_n_random(const DatasetPtr& dataset, int n,
                                               std::uint64_t seed) {
  check_split("split_dataset_n_random", dataset, n);
  return blocks_of(dataset, n,
                   random_permutation(dataset->size(), derive_seed(seed, kSplitStream)));
}

DatasetPtr shard_dataset(const DatasetPtr& dataset, int rank, int world, std::uint64_t seed,
                         bool shuffle) {
  MPU_CHECK(rank >= 0 && rank < world, "shard_dataset: rank ", rank,
            " is not in [0, world = ", world, ")");
  auto shards =
      shuffle ? split_dataset_n_random(dataset, world, seed) : split_dataset_n(dataset, world);
  return shards[static_cast<std::size_t>(rank)];
}

// ------------------------------------------------------------------------------------------------
// Prefetcher: one thread, one job slot.

namespace detail {

struct BatchPlan {
  std::vector<OrderSegment> segments;  // of the epoch orders, in order
  std::vector<std::int64_t> indices;   // the segments' examples (empty for a DeviceDataset)
  std::vector<std::int64_t> epochs;
  // The iterator's state after this batch.
  std::int64_t epoch = 0;
  std::int64_t position = 0;
  bool is_new_epoch = false;
};

struct Prefetcher {
  enum class State { kIdle, kPosted, kBusy, kDone };

  explicit Prefetcher(std::function<Batch(const BatchPlan&)> load_fn)
      : pid(::getpid()), load(std::move(load_fn)) {
    thread = std::thread([this] { run(); });
  }

  void run() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      cv.wait(lock, [this] { return stop || state == State::kPosted; });
      if (stop) return;
      state = State::kBusy;
      lock.unlock();
      Batch batch;
      std::exception_ptr failure;
      try {
        batch = load(job);
      } catch (...) {
        failure = std::current_exception();
      }
      lock.lock();
      result = std::move(batch);
      error = failure;
      state = State::kDone;
      cv.notify_all();
    }
  }

  void post(BatchPlan plan) {
    std::lock_guard<std::mutex> lock(mutex);
    job = std::move(plan);
    state = State::kPosted;
    cv.notify_all();
  }

  bool pending() {
    std::lock_guard<std::mutex> lock(mutex);
    return state != State::kIdle;
  }

  // Waits for the posted job; returns its plan and batch, or rethrows what loading threw.
  BatchPlan take(Batch& batch) {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [this] { return state == State::kDone; });
    state = State::kIdle;
    BatchPlan plan = std::move(job);
    std::exception_ptr failure = std::exchange(error, nullptr);
    batch = std::exchange(result, Batch{});
    if (failure) std::rethrow_exception(failure);
    return plan;
  }

  // Waits until the thread is not collating; then drops any job or result.
  void drop() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [this] { return state != State::kPosted && state != State::kBusy; });
    state = State::kIdle;
    result = Batch{};
    error = nullptr;
  }

  void wait_idle() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [this] { return state != State::kPosted && state != State::kBusy; });
  }

  void shutdown() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
      cv.notify_all();
    }
    if (thread.joinable()) thread.join();
  }

  const pid_t pid;
  const std::function<Batch(const BatchPlan&)> load;
  std::mutex mutex;
  std::condition_variable cv;
  bool stop = false;
  State state = State::kIdle;
  BatchPlan job;
  Batch result;
  std::exception_ptr error;
  std::thread thread;
};

void PrefetcherDeleter::operator()(Prefetcher* prefetcher) const noexcept {
  if (prefetcher == nullptr) return;
  if (prefetcher->pid != ::getpid()) {
    // A forked child: the thread exists only in the parent, and its mutex may have been held at
    // the fork. Joining, locking or destroying any of it is undefined, so it is left alone; the
    // leak is the size of one batch at most.
    return;
  }
  prefetcher->shutdown();
  delete prefetcher;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// Iterator

Iterator::Iterator(DatasetPtr dataset, IteratorOptions options)
    : dataset_(std::move(dataset)), options_(std::move(options)) {
  MPU_CHECK(dataset_ != nullptr, "Iterator: the dataset is null");
  MPU_CHECK(options_.batch_size() >= 1, "Iterator: batch_size = ", options_.batch_size(),
            "; need at least 1");
  size_ = dataset_->size();
  MPU_CHECK(size_ >= 1, "Iterator: the dataset is empty (size ", size_, ")");
  device_ = dynamic_cast<const DeviceDataset*>(dataset_.get());
}

Iterator::~Iterator() noexcept = default;
Iterator::Iterator(Iterator&&) noexcept = default;
Iterator& Iterator::operator=(Iterator&&) noexcept = default;

double Iterator::epoch_detail() const noexcept {
  return static_cast<double>(epoch_) + static_cast<double>(position_) / static_cast<double>(size_);
}

const std::vector<std::int64_t>& Iterator::order_of(std::int64_t epoch) {
  for (const auto& entry : orders_) {
    if (entry.first == epoch) return entry.second;
  }
  // A plan touches at most the current and the next epoch, except when a batch is larger than
  // the dataset; two entries cover the common case, and eviction of the oldest keeps it correct.
  if (orders_.size() >= 2) {
    orders_.erase(std::min_element(orders_.begin(), orders_.end(),
                                   [](const auto& a, const auto& b) { return a.first < b.first; }));
  }
  orders_.emplace_back(epoch, epoch_order(size_, options_.seed(), epoch, options_.shuffle()));
  return orders_.back().second;
}

detail::BatchPlan Iterator::plan_next() {
  // A DeviceDataset takes the segments; other datasets need their examples' indices.
  const bool with_indices = device_ == nullptr;
  detail::BatchPlan plan;
  const std::int64_t batch = options_.batch_size();
  if (with_indices) {
    plan.indices.reserve(static_cast<std::size_t>(batch));
    plan.epochs.reserve(static_cast<std::size_t>(batch));
  }
  std::int64_t epoch = epoch_;
  std::int64_t position = position_;
  std::int64_t need = batch;
  while (need > 0) {
    const std::int64_t take = std::min(need, size_ - position);
    plan.segments.push_back(OrderSegment{epoch, position, take});
    if (with_indices) {
      const auto& order = order_of(epoch);
      plan.indices.insert(plan.indices.end(), order.begin() + position,
                          order.begin() + position + take);
      plan.epochs.insert(plan.epochs.end(), static_cast<std::size_t>(take), epoch);
    }
    position += take;
    need -= take;
    if (position == size_) {
      ++epoch;
      position = 0;
      plan.is_new_epoch = true;
      if (!options_.repeat()) break;
    }
  }
  plan.epoch = epoch;
  plan.position = position;
  return plan;
}

void Iterator::commit(const detail::BatchPlan& plan) {
  epoch_ = plan.epoch;
  position_ = plan.position;
  is_new_epoch_ = plan.is_new_epoch;
  ++iteration_;
}

detail::Prefetcher* Iterator::live_prefetcher() noexcept {
  if (prefetcher_ && prefetcher_->pid != ::getpid()) {
    // Forked child: the deleter leaves the parent's state alone.
    prefetcher_.reset();
  }
  return prefetcher_.get();
}

namespace {

Batch load_batch(const DatasetPtr& dataset, bool pin, const detail::BatchPlan& plan) {
  Batch batch = dataset->get_batch(plan.indices, plan.epochs);
  if (pin) {
    batch.data = batch.data.pin_memory();
    batch.target = batch.target.pin_memory();
  }
  return batch;
}

}  // namespace

Batch Iterator::next() {
  if (finished()) {
    MPU_THROW(StopIteration, "Iterator::next: a non-repeating iterator has served its epoch of ",
              size_, " examples; call reset() to start again, or check finished()");
  }
  if (device_ != nullptr) {
    // The dataset forms the batch on its device; the position moves only once it did.
    const detail::BatchPlan plan = plan_next();
    Batch batch = device_->gather_segments(plan.segments, options_.seed(), options_.shuffle());
    commit(plan);
    return batch;
  }
  detail::Prefetcher* prefetcher = live_prefetcher();
  Batch batch;
  detail::BatchPlan plan;
  if (prefetcher != nullptr && prefetcher->pending()) {
    plan = prefetcher->take(batch);
  } else {
    plan = plan_next();
    batch = load_batch(dataset_, options_.pin_memory(), plan);
  }
  commit(plan);
  if (options_.prefetch() && !finished()) {
    if (prefetcher == nullptr) {
      prefetcher_.reset(new detail::Prefetcher(
          [dataset = dataset_, pin = options_.pin_memory()](const detail::BatchPlan& p) {
            return load_batch(dataset, pin, p);
          }));
      prefetcher = prefetcher_.get();
    }
    prefetcher->post(plan_next());
  }
  return batch;
}

void Iterator::discard_prefetch() {
  if (detail::Prefetcher* prefetcher = live_prefetcher()) prefetcher->drop();
}

void Iterator::wait_idle() {
  if (detail::Prefetcher* prefetcher = live_prefetcher()) prefetcher->wait_idle();
}

void Iterator::reset() {
  discard_prefetch();
  epoch_ = 0;
  position_ = 0;
  iteration_ = 0;
  is_new_epoch_ = false;
}

void Iterator::save(torch::serialize::OutputArchive& archive) const {
  archive.write("epoch", c10::IValue(epoch_));
  archive.write("position", c10::IValue(position_));
  archive.write("iteration", c10::IValue(iteration_));
  archive.write("is_new_epoch", c10::IValue(is_new_epoch_));
  archive.write("dataset_size", c10::IValue(size_));
  archive.write("seed", c10::IValue(static_cast<std::int64_t>(options_.seed())));
  archive.write("shuffle", c10::IValue(options_.shuffle()));
}

void Iterator::load(torch::serialize::InputArchive& archive) {
  auto read = [&archive](const char* key) {
    c10::IValue value;
    MPU_CHECK(archive.try_read(key, value), "Iterator::load: the archive has no \"", key,
              "\"; was it written by Iterator::save?");
    return value;
  };
  const std::int64_t saved_size = read("dataset_size").toInt();
  const auto saved_seed = static_cast<std::uint64_t>(read("seed").toInt());
  const bool saved_shuffle = read("shuffle").toBool();
  MPU_CHECK(saved_size == size_, "Iterator::load: saved for a dataset of ", saved_size,
            " examples, but this one has ", size_);
  MPU_CHECK(saved_shuffle == options_.shuffle(),
            "Iterator::load: saved with shuffle = ", saved_shuffle,
            ", but this iterator has shuffle = ", options_.shuffle());
  MPU_CHECK(!saved_shuffle || saved_seed == options_.seed(), "Iterator::load: saved with seed ",
            saved_seed, ", but this iterator has seed ", options_.seed(),
            "; the epoch orders would differ");
  const std::int64_t epoch = read("epoch").toInt();
  const std::int64_t position = read("position").toInt();
  const std::int64_t iteration = read("iteration").toInt();
  const bool is_new_epoch = read("is_new_epoch").toBool();
  MPU_CHECK(epoch >= 0 && position >= 0 && position < size_ && iteration >= 0,
            "Iterator::load: inconsistent state epoch = ", epoch, ", position = ", position,
            ", iteration = ", iteration, " for a dataset of ", size_, " examples");
  discard_prefetch();
  epoch_ = epoch;
  position_ = position;
  iteration_ = iteration;
  is_new_epoch_ = is_new_epoch;
}

// ------------------------------------------------------------------------------------------------
// Iterators over shards

std::vector<IteratorPtr> split_iterators(const DatasetPtr& dataset, int n,
                                         const IteratorOptions& options) {
  auto shards = split_dataset_n_random(dataset, n, options.seed());
  std::vector<IteratorPtr> iterators;
  iterators.reserve(shards.size());
  for (int i = 0; i < n; ++i) {
    IteratorOptions shard_options = options;
    shard_options.seed(derive_seed(options.seed(), static_cast<std::uint64_t>(i)));
    iterators.push_back(
        std::make_shared<Iterator>(shards[static_cast<std::size_t>(i)], shard_options));
  }
  return iterators;
}

std::vector<IteratorPtr> split_iterators(const DatasetPtr& dataset, int n, std::int64_t batch_size,
                                         bool shuffle, std::uint64_t seed) {
  return split_iterators(dataset, n, IteratorOptions(batch_size).shuffle(shuffle).seed(seed));
}

IteratorPtr shard_iterator(const DatasetPtr& dataset, int rank, int world,
                           const IteratorOptions& options) {
  MPU_CHECK(rank >= 0 && rank < world, "shard_iterator: rank ", rank,
            " is not in [0, world = ", world, ")");
  IteratorOptions shard_options = options;
  shard_options.seed(derive_seed(options.seed(), static_cast<std::uint64_t>(rank)));
  return std::make_shared<Iterator>(shard_dataset(dataset, rank, world, options.seed(), true),
                                    shard_options);
}

IteratorPtr shard_iterator(const DatasetPtr& dataset, int rank, int world, std::int64_t batch_size,
                           bool shuffle, std::uint64_t seed) {
  return shard_iterator(dataset, rank, world,
                        IteratorOptions(batch_size).shuffle(shuffle).seed(seed));
}

}  // namespace mpu
