/// \file
/// Random-access datasets, shards, and an epoch-aware iterator with Chainer's SerialIterator
/// semantics that reshuffles every epoch from (seed, epoch) and prefetches on a background thread.
///
/// Reproducibility: every random choice here (the order of an epoch, how a dataset is split into
/// shards) is a pure function of a 64-bit seed, computed with `std::mt19937_64` (whose output
/// sequence the C++ standard fixes) and this library's own Fisher-Yates shuffle, never with the
/// standard library's distributions. So the same seed gives the same batches on every platform,
/// compiler and rank.
#pragma once

#include <torch/arg.h>
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mpu/batch.h"
#include "mpu/error.h"

namespace mpu {

/// The generator behind every random choice of the data layer.
using Rng = std::mt19937_64;

/// A seed for `Rng` derived from `seed` and up to two stream keys (for example an epoch and an
/// example index), through SplitMix64 finalisers: distinct keys give unrelated streams.
std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t a, std::uint64_t b = 0) noexcept;

/// A uniform integer in [0, n) drawn from `rng` by rejection sampling, so that the result does
/// not depend on the standard library's distributions. `n` must be positive.
std::uint64_t uniform_below(Rng& rng, std::uint64_t n);

/// A uniformly random permutation of 0..n-1, drawn by Fisher-Yates from `Rng(seed)`.
std::vector<std::int64_t> random_permutation(std::int64_t n, std::uint64_t seed);

/// The visiting order of epoch `epoch` for a dataset of `n` examples: 0..n-1 when `shuffle` is
/// false, otherwise `random_permutation(n, derive_seed(seed, epoch))`. A pure function of its
/// arguments; this is what makes an `Iterator` reproducible and resumable.
std::vector<std::int64_t> epoch_order(std::int64_t n, std::uint64_t seed, std::int64_t epoch,
                                      bool shuffle);

// ------------------------------------------------------------------------------------------------
// Datasets

/// A random-access dataset of `size()` examples, each one `Batch` with unbatched `.data` and
/// `.target` (for images: data [C,H,W], target a 0-dim int64 tensor).
///
/// Contract for implementers:
/// - `do_get` and `do_get_batch` must be pure: the same (index, epoch) gives the same example.
///   Deterministic datasets ignore `epoch`; random augmentations derive their randomness from
///   it (see `datasets::TransformedDataset`). Iterators prefetch ahead and several iterators
///   share one base dataset, so this purity is what keeps batches independent of prefetching.
/// - They are called concurrently from several threads (one prefetch thread per iterator) and
///   must be thread-safe. Indices arrive already checked against `size()`.
/// - `do_get_batch` returns the examples stacked along a new dim 0. The default stacks
///   `do_get`; override it when a batch can be gathered at once (as `TensorDataset` does).
class Dataset {
 public:
  virtual ~Dataset() = default;

  /// Number of examples.
  virtual std::int64_t size() const = 0;

  /// Example `index` as served in epoch `epoch`. Throws `InvalidArgument` when `index` is not in
  /// [0, size()).
  Batch get(std::int64_t index, std::int64_t epoch = 0) const;

  /// The examples `indices`, example i as served in epoch `epochs[i]`, stacked along dim 0.
  /// `epochs` has one entry per index. Throws `InvalidArgument` for an index out of range, an
  /// empty `indices` or a size mismatch.
  Batch get_batch(const std::vector<std::int64_t>& indices,
                  const std::vector<std::int64_t>& epochs) const;
  /// The same with every example from epoch `epoch`.
  Batch get_batch(const std::vector<std::int64_t>& indices, std::int64_t epoch = 0) const;

 protected:
  /// Example `index` as served in epoch `epoch` (the epoch seeds per-example random transforms).
  /// Called by `get()` after the range check; must be thread-safe and deterministic.
  virtual Batch do_get(std::int64_t index, std::int64_t epoch) const = 0;
  /// The examples `indices` (epochs as in `get_batch()`), stacked along dim 0. The default calls
  /// `do_get()` for each and stacks; a dataset held as one tensor overrides it with one
  /// `index_select`.
  virtual Batch do_get_batch(const std::vector<std::int64_t>& indices,
                             const std::vector<std::int64_t>& epochs) const;
};

/// Datasets are shared, immutable and thread-safe, so they travel as shared pointers to const.
using DatasetPtr = std::shared_ptr<const Dataset>;

/// Examples held in two tensors: example i is (data[i], targets[i]). Batches are gathered with
/// one `index_select` per tensor. The tensors are kept as given (not copied), so do not modify
/// them while the dataset is in use.
class TensorDataset final : public Dataset {
 public:
  /// `data` and `targets` need at least one dimension and the same size of dim 0.
  TensorDataset(torch::Tensor data, torch::Tensor targets);

  std::int64_t size() const override { return data_.size(0); }
  /// The data tensor, example i at index i of dim 0.
  const torch::Tensor& data() const noexcept { return data_; }
  /// The targets tensor, example i at index i of dim 0.
  const torch::Tensor& targets() const noexcept { return targets_; }

 protected:
  Batch do_get(std::int64_t index, std::int64_t epoch) const override;
  Batch do_get_batch(const std::vector<std::int64_t>& indices,
                     const std::vector<std::int64_t>& epochs) const override;

 private:
  torch::Tensor data_;
  torch::Tensor targets_;
};

/// A view of `base`: example i is `base[indices[i]]`. Indices may repeat. Batches are forwarded
/// to the base's `get_batch`, so they keep its fast path.
class SubsetDataset final : public Dataset {
 public:
  /// Every index must be in [0, base->size()).
  SubsetDataset(DatasetPtr base, std::vector<std::int64_t> indices);

  std::int64_t size() const override { return static_cast<std::int64_t>(indices_.size()); }
  /// The dataset this view selects from.
  const DatasetPtr& base() const noexcept { return base_; }
  /// The base indices this view serves, in order.
  const std::vector<std::int64_t>& indices() const noexcept { return indices_; }

 protected:
  Batch do_get(std::int64_t index, std::int64_t epoch) const override;
  Batch do_get_batch(const std::vector<std::int64_t>& indices,
                     const std::vector<std::int64_t>& epochs) const override;

 private:
  DatasetPtr base_;
  std::vector<std::int64_t> indices_;
};

/// Adapts a LibTorch dataset, a `torch::data::datasets::Dataset<D, Example<>>` (anything with
/// `get(size_t)` returning an `Example<Tensor, Tensor>` and `size()` returning a known size).
/// LibTorch datasets are not promised to be thread-safe, so calls are serialised by a mutex.
template <typename D>
class TorchDatasetAdapter final : public Dataset {
 public:
  /// Takes `dataset` by value. Throws `mpu::InvalidArgument` when its `size()` is unknown.
  explicit TorchDatasetAdapter(D dataset) : dataset_(std::move(dataset)) {
    const auto n = dataset_.size();
    MPU_CHECK(n.has_value(),
              "mpu::make_dataset: the LibTorch dataset has no known size(); an "
              "Iterator needs a random-access dataset of known size");
    size_ = static_cast<std::int64_t>(*n);
  }

  std::int64_t size() const override { return size_; }

 protected:
  Batch do_get(std::int64_t index, std::int64_t /*epoch*/) const override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto example = dataset_.get(static_cast<std::size_t>(index));
    return Batch{std::move(example.data), std::move(example.target)};
  }

 private:
  mutable std::mutex mutex_;
  mutable D dataset_;
  std::int64_t size_ = 0;
};

/// Wraps a LibTorch random-access dataset (for example `torch::data::datasets::MNIST`) as a
/// `DatasetPtr`. See `TorchDatasetAdapter`.
template <typename D>
DatasetPtr make_dataset(D dataset) {
  using Example = decltype(std::declval<D&>().get(std::size_t{0}));
  static_assert(std::is_convertible_v<decltype(std::declval<Example&>().data), torch::Tensor> &&
                    std::is_convertible_v<decltype(std::declval<Example&>().target), torch::Tensor>,
                "mpu::make_dataset needs a dataset whose get(size_t) returns an Example with "
                "tensor .data and .target");
  return std::make_shared<TorchDatasetAdapter<D>>(std::move(dataset));
}

// ------------------------------------------------------------------------------------------------
// Shards

/// Splits `dataset` into `n` disjoint contiguous shards: shard i holds examples
/// [i*m, (i+1)*m) with m = floor(size/n). As in Chainer, all shards have the same length and
/// the last size mod n examples are dropped. Needs 1 <= n <= size.
std::vector<DatasetPtr> split_dataset_n(const DatasetPtr& dataset, int n);

/// Chainer's `split_dataset_n_random`: `n` disjoint shards of equal length m = floor(size/n),
/// shard i holding positions [i*m, (i+1)*m) of `random_permutation(size, derive_seed(seed,
/// kSplitStream))`. The size mod n examples left over are dropped (none is ever served). The
/// split is a pure function of (size, n, seed): every process that passes the same seed gets
/// the same shards. Needs 1 <= n <= size.
std::vector<DatasetPtr> split_dataset_n_random(const DatasetPtr& dataset, int n,
                                               std::uint64_t seed = 0);

/// The shard of rank `rank` among `world` ranks, for `DistributedUpdater`:
/// `split_dataset_n_random(dataset, world, seed)[rank]` when `shuffle`, otherwise
/// `split_dataset_n(dataset, world)[rank]`. Every rank must pass the same seed. The same
/// equal-length rule drops size mod world examples.
DatasetPtr shard_dataset(const DatasetPtr& dataset, int rank, int world, std::uint64_t seed = 0,
                         bool shuffle = true);

/// The stream key that separates the split permutation from the epoch orders of the same seed.
inline constexpr std::uint64_t kSplitStream = 0x73706c6974ULL;  // "split"

// ------------------------------------------------------------------------------------------------
// Iterator

/// Options of an `Iterator`. Implicitly constructible from a batch size:
/// `Iterator(dataset, 128)`, `Iterator(dataset,
/// IteratorOptions(512).shuffle(false).repeat(false))`.
struct IteratorOptions {
  /// Options with `batch_size` examples per batch and every other option at its default.
  /* implicit */ IteratorOptions(std::int64_t batch_size) : batch_size_(batch_size) {}

  /// Examples per batch; at least 1.
  TORCH_ARG(std::int64_t, batch_size);
  /// Visit each epoch in a fresh random order (from (seed, epoch)); otherwise in index order.
  TORCH_ARG(bool, shuffle) = true;
  /// Run forever, batches wrapping around epoch ends; otherwise stop after one epoch.
  TORCH_ARG(bool, repeat) = true;
  /// Seed of the epoch orders.
  TORCH_ARG(std::uint64_t, seed) = 0;
  /// Collate the next batch on a background thread while the current one is in use.
  TORCH_ARG(bool, prefetch) = true;
  /// Return batches in pinned (page-locked) host memory, for asynchronous copies to a GPU.
  /// Pinning initialises CUDA: only set it in the process that will use the GPU, after any
  /// fork. Fails on a build of LibTorch without CUDA.
  TORCH_ARG(bool, pin_memory) = false;
};

/// Thrown by `Iterator::next()` on a non-repeating iterator that has served its epoch.
class StopIteration : public Error {
 public:
  using Error::Error;
};

class DeviceDataset;

namespace detail {
struct BatchPlan;
struct Prefetcher;
/// Stops and joins the prefetch thread; in a forked child, where that thread does not exist,
/// abandons its state untouched instead.
struct PrefetcherDeleter {
  void operator()(Prefetcher* prefetcher) const noexcept;
};
}  // namespace detail

/// An epoch-aware iterator over a `Dataset`, with the semantics of Chainer's `SerialIterator`.
///
/// Let N = dataset size, B = batch size, and `order(e)` = `epoch_order(N, seed, e, shuffle)`.
/// The iterator keeps (epoch, position): batch k is the next B entries of `order(epoch)` from
/// `position`.
/// - repeat = true (training): when a batch reaches the end of an epoch it continues at the
///   start of the next epoch's order, so every batch has exactly B examples; each epoch end
///   crossed adds 1 to `epoch()`, and `is_new_epoch()` is true after such a batch. Then
///   `epoch_detail()` = examples served / N. Each example in a batch is served "in" the epoch
///   whose order it came from (that epoch is passed to `Dataset::get_batch`).
/// - repeat = false (evaluation): one pass; the last batch holds the N mod B leftovers (when
///   not 0), after which `epoch()` is 1, `is_new_epoch()` is true and `finished()` is true;
///   `next()` then throws `StopIteration` until `reset()`.
/// - `epoch_detail()` = epoch + position / N in both modes.
///
/// The order of epoch e depends only on (seed, e), so a run is reproducible, `save()`/`load()`
/// resume exactly, and prefetching never changes a batch.
///
/// Threads and fork(): the constructor starts no thread. With `prefetch`, the first `next()`
/// starts one background thread, which from then on collates batch k+1 while batch k is in use.
/// When `next()` finds itself in a forked child of the process that started the thread (the
/// thread did not survive the fork), it abandons that thread's state without touching it and
/// starts afresh; the batches are the same. A fork while the thread is collating can still
/// inherit locks held inside the dataset or LibTorch, so fork before the first `next()`, or call
/// `wait_idle()` first. The destructor joins the thread.
///
/// Over a `DeviceDataset` (mpu/device_data.h), the semantics are the same except for two
/// things: `order(e)` is `device_epoch_order(N, seed, e, shuffle)`, drawn on the dataset's device,
/// and the batch is formed there by `DeviceDataset::gather_segments`, without prefetching or
/// pinning.
///
/// An Iterator is used by one thread at a time. It is movable, not copyable.
class Iterator {
 public:
  /// Iterates over `dataset` (not null, not empty) with `options`; starts no thread. Throws
  /// `mpu::InvalidArgument` naming the problem otherwise.
  Iterator(DatasetPtr dataset, IteratorOptions options);
  ~Iterator() noexcept;
  /// Takes over the position and any prefetch thread.
  Iterator(Iterator&&) noexcept;
  /// Releases this iterator's state as the destructor does, then takes over the other's.
  Iterator& operator=(Iterator&&) noexcept;
  Iterator(const Iterator&) = delete;
  Iterator& operator=(const Iterator&) = delete;

  /// The next batch (stacked examples). Throws `StopIteration` when `finished()`, and rethrows
  /// what the dataset threw (the position then stays where it was).
  Batch next();

  /// Completed epochs (epoch ends crossed).
  std::int64_t epoch() const noexcept { return epoch_; }
  /// True when the last `next()` crossed an epoch end.
  bool is_new_epoch() const noexcept { return is_new_epoch_; }
  /// epoch + position / N.
  double epoch_detail() const noexcept;
  /// Batches served since construction or `reset()`.
  std::int64_t iteration() const noexcept { return iteration_; }
  /// Examples of the current epoch's order already served.
  std::int64_t position() const noexcept { return position_; }
  /// True when a non-repeating iterator has served its epoch.
  bool finished() const noexcept { return !options_.repeat() && epoch_ > 0; }

  /// Back to epoch 0, position 0, iteration 0. The order of epoch 0 is the same as at
  /// construction.
  void reset();

  /// Examples per batch (`IteratorOptions::batch_size`).
  std::int64_t batch_size() const noexcept { return options_.batch_size(); }
  /// Number of examples in the dataset: N.
  std::int64_t dataset_size() const noexcept { return size_; }
  /// The options it was built with.
  const IteratorOptions& options() const noexcept { return options_; }
  /// The dataset it iterates over.
  const DatasetPtr& dataset() const noexcept { return dataset_; }

  /// Writes the keys "epoch", "position", "iteration", "is_new_epoch", "dataset_size", "seed"
  /// and "shuffle". Give the iterator its own (nested) archive.
  void save(torch::serialize::OutputArchive& archive) const;
  /// Restores what `save()` wrote, so that the next batch is the one that would have followed.
  /// Throws `InvalidArgument` when the dataset size, seed or shuffle differ from the saved ones
  /// (the orders would differ) or when a key is missing. A pending prefetch is discarded.
  void load(torch::serialize::InputArchive& archive);

  /// Blocks until the background thread (if any) is idle: not collating and holding no lock.
  void wait_idle();

 private:
  detail::BatchPlan plan_next();
  const std::vector<std::int64_t>& order_of(std::int64_t epoch);
  void commit(const detail::BatchPlan& plan);
  detail::Prefetcher* live_prefetcher() noexcept;
  void discard_prefetch();

  DatasetPtr dataset_;
  const DeviceDataset* device_ = nullptr;  // dataset_ when it forms its own batches
  IteratorOptions options_;
  std::int64_t size_ = 0;
  std::int64_t epoch_ = 0;
  std::int64_t position_ = 0;
  std::int64_t iteration_ = 0;
  bool is_new_epoch_ = false;
  // Orders of the two epochs a plan can touch, cached: (epoch, order).
  std::vector<std::pair<std::int64_t, std::vector<std::int64_t>>> orders_;
  std::unique_ptr<detail::Prefetcher, detail::PrefetcherDeleter> prefetcher_;
};

/// Iterators are shared between the updater, the Trainer and the user: they travel as shared
/// pointers.
using IteratorPtr = std::shared_ptr<Iterator>;

/// Chainer's recipe for MultiprocessParallelUpdater: `split_dataset_n_random(dataset, n, seed)`
/// and one iterator per shard. Iterator i shuffles with seed `derive_seed(seed, i)`, so that
/// `split_iterators(d, n, o)[i]` serves the same batches as `shard_iterator(d, i, n, o)`.
std::vector<IteratorPtr> split_iterators(const DatasetPtr& dataset, int n,
                                         const IteratorOptions& options);
/// The same with `IteratorOptions(batch_size).shuffle(shuffle).seed(seed)`.
std::vector<IteratorPtr> split_iterators(const DatasetPtr& dataset, int n, std::int64_t batch_size,
                                         bool shuffle = true, std::uint64_t seed = 0);

/// The iterator of rank `rank` of `world`, for `DistributedUpdater`: over
/// `split_dataset_n_random(dataset, world, options.seed())[rank]`, shuffling with
/// `derive_seed(options.seed(), rank)`. Every rank must pass the same options.
IteratorPtr shard_iterator(const DatasetPtr& dataset, int rank, int world,
                           const IteratorOptions& options);
/// The same with `IteratorOptions(batch_size).shuffle(shuffle).seed(seed)`.
IteratorPtr shard_iterator(const DatasetPtr& dataset, int rank, int world, std::int64_t batch_size,
                           bool shuffle = true, std::uint64_t seed = 0);

}  // namespace mpu
