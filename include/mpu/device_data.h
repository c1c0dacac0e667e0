/// \file
/// The device-resident data path: a dataset uploaded once to the device of the rank that uses
/// it, batches gathered there by index, augmentation (random crop with zero padding,
/// horizontal flip, normalisation) done by one kernel per batch, and the epoch orders drawn on
/// the device. No host synchronisation and no host-to-device copy on the step path.
///
/// An `Iterator` over a `DeviceDataset` keeps its semantics (epochs, positions, wrap-around,
/// `save`/`load`); what changes is where the order comes from: the order of epoch e is
/// `device_epoch_order(N, seed, e, shuffle)`, a sort by keys drawn from (seed, e) that gives
/// the same permutation on every device, CPU included. It is not `epoch_order`'s Fisher-Yates
/// permutation, so a device run and a host run of one seed see the examples in other orders.
///
/// Fork: a `DeviceImageDataset` touches its device only at its first batch, so it can be built
/// before `MultiprocessParallelUpdater` forks, one per device (see `device_split_iterators`).
#pragma once

#include <torch/arg.h>
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "mpu/iterator.h"

namespace mpu {

/// Positions [start, start + count) of the order of epoch `epoch`.
struct OrderSegment {
  std::int64_t epoch = 0;  ///< whose order
  std::int64_t start = 0;  ///< the first position taken
  std::int64_t count = 0;  ///< how many positions
};

/// The visiting order of epoch `epoch` for `n` examples, as an int64 tensor on `device`:
/// 0..n-1 when `shuffle` is false, otherwise positions sorted by the keys of
/// cuda/augment_draw.h (`order_key(derive_seed(seed, epoch, kOrderStream), i)`). Computed on
/// `device` without a host synchronisation; the same permutation on every device.
torch::Tensor device_epoch_order(std::int64_t n, std::uint64_t seed, std::int64_t epoch,
                                 bool shuffle, const torch::Device& device);

/// A dataset that forms its batches itself, on its device, from segments of its epoch orders.
/// An `Iterator` over one calls `gather_segments` instead of `get_batch`, does not prefetch
/// (the work is already asynchronous on the device) and ignores `pin_memory`.
class DeviceDataset : public Dataset {
 public:
  /// The batch made of `segments` (in order) of the orders `device_epoch_order(size(), seed,
  /// segment.epoch, shuffle)`, each example served in its segment's epoch. Thread-safe.
  virtual Batch gather_segments(const std::vector<OrderSegment>& segments, std::uint64_t seed,
                                bool shuffle) const = 0;
  /// The device the batches are on.
  virtual torch::Device device() const = 0;
};

namespace datasets {

/// The augmentation of a `DeviceImageDataset`: pixels are scaled to [0, 1], then (optionally)
/// padded with `padding` zeros on every side and cut back to H x W at a random offset,
/// (optionally) mirrored with probability 1/2, and normalised per channel. The draws of
/// example k (its index in the full dataset) in epoch e are a function of (seed, e, k) only
/// (cuda/augment_draw.h), so they do not depend on sharding, batching or the device.
struct DeviceAugment {
  /// Zero padding of the random crop; 0: no crop.
  TORCH_ARG(std::int64_t, padding) = 0;
  /// Mirror each example with probability 1/2.
  TORCH_ARG(bool, flip) = false;
  /// One mean for every channel, or one per channel (at most 4 channels).
  TORCH_ARG(std::vector<double>, mean) = std::vector<double>{0.0};
  /// One standard deviation for every channel, or one per channel; each positive.
  TORCH_ARG(std::vector<double>, stddev) = std::vector<double>{1.0};
  /// Seed of the crop and flip draws.
  TORCH_ARG(std::uint64_t, seed) = 0;
};

/// Where a `DeviceImageDataset` keeps its examples.
enum class Placement {
  kAuto,    ///< on the device when they fit (see `DeviceDataOptions::memory_fraction`), else
            ///< in host memory with one logged line
  kDevice,  ///< on the device, or an `InvalidArgument` at the first batch when they do not fit
  kHost,    ///< in host memory: the same batches, gathered on the host and copied
};

/// Options of a `DeviceImageDataset`.
struct DeviceDataOptions {
  /// Batches on `device`, every other option at its default.
  /* implicit */ DeviceDataOptions(torch::Device device) : device_(device) {}
  /// The device batches are served on (the examples are uploaded there at the first batch).
  TORCH_ARG(torch::Device, device);
  /// The augmentation applied to every batch.
  TORCH_ARG(DeviceAugment, augment);
  /// Where the examples are kept.
  TORCH_ARG(Placement, placement) = Placement::kAuto;
  /// kAuto uploads only when the examples take at most this fraction of the device's free
  /// memory at the first batch; in (0, 1].
  TORCH_ARG(double, memory_fraction) = 0.5;
};

/// The examples of an `ImageDataset` (or of a `SubsetDataset` chain over one, such as a shard)
/// kept as uint8 on a device: batches are float32 [B, C, H, W] images, augmented, and int64
/// targets, both on `device`. Immutable and thread-safe; the upload happens once, at the first
/// batch, in the process that asks for it.
class DeviceImageDataset final : public DeviceDataset {
 public:
  /// The examples of `source`, which must be an `ImageDataset` or `SubsetDataset`s over one;
  /// throws `InvalidArgument` naming what is wrong otherwise, and for options out of range.
  DeviceImageDataset(const DatasetPtr& source, DeviceDataOptions options);
  ~DeviceImageDataset() override;

  std::int64_t size() const override;
  torch::Device device() const override;
  Batch gather_segments(const std::vector<OrderSegment>& segments, std::uint64_t seed,
                        bool shuffle) const override;

  /// After the first batch: true when the examples are on the device, false when they were
  /// kept in host memory (Placement::kHost, or kAuto when they did not fit). Before: false.
  bool resident() const;
  /// Bytes the examples take where they are kept (images, targets and keys).
  std::int64_t bytes() const;
  /// The options it was built with.
  const DeviceDataOptions& options() const;

 protected:
  Batch do_get(std::int64_t index, std::int64_t epoch) const override;
  Batch do_get_batch(const std::vector<std::int64_t>& indices,
                     const std::vector<std::int64_t>& epochs) const override;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// One `DeviceImageDataset` per device over the shards of `split_dataset_n_random(dataset,
/// devices.size(), options.seed())`, with iterator i seeded `derive_seed(options.seed(), i)`:
/// the sharding of `split_iterators`, for `MultiprocessParallelUpdater`. `data` gives the
/// augmentation, placement and memory fraction; its device is replaced by each device in turn.
std::vector<IteratorPtr> device_split_iterators(const DatasetPtr& dataset,
                                                const std::vector<torch::Device>& devices,
                                                const IteratorOptions& options,
                                                const DeviceDataOptions& data);

/// The iterator of rank `rank` of `world` over its shard on `data.device()`, with the sharding
/// of `shard_iterator`, for `DistributedUpdater`.
IteratorPtr device_shard_iterator(const DatasetPtr& dataset, int rank, int world,
                                  const IteratorOptions& options, const DeviceDataOptions& data);

}  // namespace datasets
}  // namespace mpu
