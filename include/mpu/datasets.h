/// \file
/// Fashion-MNIST and MNIST, read straight from their gzip idx files, and per-example
/// transforms (normalisation, random crop with padding, horizontal flip) whose randomness is
/// reproducible.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "mpu/iterator.h"

namespace mpu::datasets {

/// Which half of an MNIST-format dataset: the training files or the t10k test files.
enum class Split { Train, Test };

/// Mean and standard deviation of the pixels of Fashion-MNIST's training images, scaled to
/// [0, 1] (a test recomputes them from the files).
inline constexpr double kFashionMnistMean = 0.2860;
/// Standard deviation of the same pixels (see `kFashionMnistMean`).
inline constexpr double kFashionMnistStd = 0.3530;

/// The four files of an MNIST-format directory.
inline constexpr const char* kTrainImagesFile = "train-images-idx3-ubyte.gz";
/// Training labels.
inline constexpr const char* kTrainLabelsFile = "train-labels-idx1-ubyte.gz";
/// Test images.
inline constexpr const char* kTestImagesFile = "t10k-images-idx3-ubyte.gz";
/// Test labels.
inline constexpr const char* kTestLabelsFile = "t10k-labels-idx1-ubyte.gz";

/// The Fashion-MNIST directory: $FASHION_MNIST_DIR when set and not empty, otherwise
/// /usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist installs it.
std::string fashion_mnist_dir();

/// Reads one idx file (gzip-compressed or, through zlib's transparent mode, plain) into a tensor
/// with the file's dims and element type (uint8, int8, int16, int32, float32 or float64).
/// Throws `mpu::Error` naming the file when it is missing, unreadable, truncated, not in idx
/// format, or longer than its header says.
torch::Tensor read_idx(const std::string& path);

/// An image classification dataset in MNIST's format: images [1, H, W] as float32 in [0, 1],
/// targets int64 class indices. The raw bytes are kept (uint8) and converted per batch.
class ImageDataset final : public Dataset {
 public:
  /// `images` uint8 [N, H, W] or [N, C, H, W]; `labels` integers [N].
  ImageDataset(torch::Tensor images, torch::Tensor labels);

  std::int64_t size() const override { return images_.size(0); }
  /// The raw images, uint8 [N, C, H, W].
  const torch::Tensor& images() const noexcept { return images_; }
  /// The labels, int64 [N].
  const torch::Tensor& labels() const noexcept { return labels_; }

 protected:
  Batch do_get(std::int64_t index, std::int64_t epoch) const override;
  Batch do_get_batch(const std::vector<std::int64_t>& indices,
                     const std::vector<std::int64_t>& epochs) const override;

 private:
  torch::Tensor images_;
  torch::Tensor labels_;
};

/// Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60000 training and 10000 test images of 28x28
/// in 10 classes. Reads `dir` (empty: `fashion_mnist_dir()`). Throws `mpu::Error` naming the
/// directory and the files expected there when a file is missing, and naming the file when it
/// is corrupt or truncated.
std::shared_ptr<const ImageDataset> FashionMNIST(Split split, const std::string& dir = "");

/// MNIST, whose files have the same names and format. Reads `dir` (empty: $MNIST_DIR); no
/// Debian package ships it, so one of the two is needed.
std::shared_ptr<const ImageDataset> MNIST(Split split, const std::string& dir = "");

// ------------------------------------------------------------------------------------------------
// Transforms

/// A transform of one example's data (targets pass through). It is a value: a name, for
/// messages, and a function of (data, rng). `rng` is the example's own generator (see
/// `TransformedDataset`); draw from it with `uniform_below` so that results do not depend on
/// the standard library's distributions.
class Transform {
 public:
  /// The transform itself: new data from one example's `data` and its generator.
  using Fn = std::function<torch::Tensor(const torch::Tensor& data, Rng& rng)>;
  /// A transform called `name` (for messages) that applies `fn`, which must not be empty.
  Transform(std::string name, Fn fn);

  /// Applies the transform to one example's `data`, drawing from `rng`.
  torch::Tensor operator()(const torch::Tensor& data, Rng& rng) const { return fn_(data, rng); }
  /// The name given at construction.
  const std::string& name() const noexcept { return name_; }

 private:
  std::string name_;
  Fn fn_;
};

/// (x - mean[c]) / std[c] for each channel c of data [C, ...]. One mean and std apply to every
/// channel; otherwise there is one per channel. Every std must be positive.
class Normalize : public Transform {
 public:
  /// One `mean` and `stddev` per channel, or one of each for all channels; throws
  /// `mpu::InvalidArgument` when the sizes differ or a stddev is not positive.
  Normalize(std::vector<double> mean, std::vector<double> stddev);
  /// The same `mean` and `stddev` for every channel.
  Normalize(double mean, double stddev)
      : Normalize(std::vector<double>{mean}, std::vector<double>{stddev}) {}
};

/// Pads data [C, H, W] with `padding` zeros on every side, then cuts a `size` x `size` window
/// at a uniformly random offset. Needs size <= H + 2*padding and W + 2*padding.
class RandomCrop : public Transform {
 public:
  /// Windows of `size` x `size` (> 0) after `padding` (>= 0) zeros on every side.
  RandomCrop(std::int64_t size, std::int64_t padding = 0);
};

/// Mirrors data [..., W] along its last dim with probability `p` (drawn as an integer in
/// [0, 2^32) below p * 2^32).
class RandomHorizontalFlip : public Transform {
 public:
  /// Flips with probability `p`, in [0, 1].
  explicit RandomHorizontalFlip(double p = 0.5);
};

/// Applies `transforms` in order to the data of each example of `base`.
///
/// Reproducibility: the example at index i served in epoch e gets its own generator,
/// `Rng(derive_seed(seed, e, i))`, and the transforms draw from it in order. So the
/// augmentation of an example depends only on (seed, epoch, index): not on the batch it lands
/// in, on prefetching, on the number of shards or on the process; two runs with the same seed
/// see the same augmented data, and each epoch sees fresh augmentations. `i` is the index into
/// this dataset: put the transforms on the full dataset and shard the result, so that the keys
/// are the same for every sharding.
class TransformedDataset final : public Dataset {
 public:
  /// `base` (not null) with `transforms` applied in order; `seed` keys every example's generator.
  TransformedDataset(DatasetPtr base, std::vector<Transform> transforms, std::uint64_t seed = 0);

  std::int64_t size() const override { return base_->size(); }
  /// The untransformed dataset.
  const DatasetPtr& base() const noexcept { return base_; }

 protected:
  Batch do_get(std::int64_t index, std::int64_t epoch) const override;
  Batch do_get_batch(const std::vector<std::int64_t>& indices,
                     const std::vector<std::int64_t>& epochs) const override;

 private:
  torch::Tensor apply(torch::Tensor data, std::int64_t index, std::int64_t epoch) const;

  DatasetPtr base_;
  std::vector<Transform> transforms_;
  std::uint64_t seed_;
};

/// `std::make_shared<TransformedDataset>(base, transforms, seed)`.
DatasetPtr transform(DatasetPtr base, std::vector<Transform> transforms, std::uint64_t seed = 0);

}  // namespace mpu::datasets
