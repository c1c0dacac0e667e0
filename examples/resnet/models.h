/// \file
/// The ResNets of the example, written with torch::nn:
/// - ResNet-18, 34 and 50 with torchvision's architecture (BasicBlock and the v1.5 Bottleneck,
///   whose stride sits in the 3x3 convolution), its parameter names ("layer1.0.conv1.weight",
///   "layer2.0.downsample.0.weight", "fc.bias", ...) and its initialisation (Kaiming-normal
///   convolutions in fan-out mode, BatchNorm weight 1 and bias 0). At 1000 classes and 3 input
///   channels they have torchvision's parameter counts (11,689,512, 21,797,672 and 25,557,032).
/// - ResNet-20 of He et al. (2016), section 4.2: the CIFAR network of 3 stages of 3 BasicBlocks
///   with 16, 32 and 64 channels and parameter-free shortcuts (option A: subsample, pad the new
///   channels with zeros). About 0.27 M parameters; small enough to train on CPUs.
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace resnet {

/// What every model of this example is: images [N, C, H, W] to logits [N, num_classes].
class ClassifierImpl : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(torch::Tensor x) = 0;
};

struct ModelOptions {
  /// Classes of the final linear layer.
  std::int64_t num_classes = 1000;
  /// Channels of the input images (3 for ImageNet, 1 for Fashion-MNIST).
  std::int64_t in_channels = 3;
  /// For images of about 32x32 or less (Fashion-MNIST's 28x28): the ImageNet stem (7x7 stride-2
  /// convolution and 3x3 stride-2 max pooling, a 4x reduction) becomes one 3x3 stride-1
  /// convolution without pooling, as in CIFAR variants of these networks. ResNet-20 always has
  /// the small stem.
  bool small_input = false;
  /// Make the activations channels_last (NHWC) after the stem convolution, so that cuDNN runs
  /// every later convolution and batch norm in that format (the weights stay contiguous).
  bool channels_last = false;
};

/// torchvision's BasicBlock: 3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, plus the shortcut
/// (a 1x1 strided conv and BN when the shape changes), then ReLU.
class BasicBlockImpl : public torch::nn::Module {
 public:
  static constexpr std::int64_t kExpansion = 1;
  BasicBlockImpl(std::int64_t in_planes, std::int64_t planes, std::int64_t stride);
  torch::Tensor forward(torch::Tensor x);

 private:
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr};
  torch::nn::Sequential downsample_{nullptr};
};
TORCH_MODULE(BasicBlock);

/// torchvision's Bottleneck (ResNet v1.5): 1x1 conv - BN - ReLU - 3x3 conv (stride) - BN - ReLU
/// - 1x1 conv to 4x the width - BN, plus the shortcut, then ReLU.
class BottleneckImpl : public torch::nn::Module {
 public:
  static constexpr std::int64_t kExpansion = 4;
  BottleneckImpl(std::int64_t in_planes, std::int64_t planes, std::int64_t stride);
  torch::Tensor forward(torch::Tensor x);

 private:
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv3_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr}, bn3_{nullptr};
  torch::nn::Sequential downsample_{nullptr};
};
TORCH_MODULE(Bottleneck);

enum class BlockKind { kBasic, kBottleneck };

/// torchvision's ResNet: stem, four stages of `blocks[i]` blocks with 64, 128, 256 and 512
/// planes (strides 1, 2, 2, 2), global average pooling, and a linear classifier.
class ResNetImpl : public ClassifierImpl {
 public:
  ResNetImpl(BlockKind kind, std::array<std::int64_t, 4> blocks, const ModelOptions& options);
  torch::Tensor forward(torch::Tensor x) override;

 private:
  torch::nn::Sequential make_stage(BlockKind kind, std::int64_t planes, std::int64_t blocks,
                                   std::int64_t stride);

  std::int64_t in_planes_ = 64;
  bool small_input_;
  bool channels_last_;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  std::array<torch::nn::Sequential, 4> stages_{nullptr, nullptr, nullptr, nullptr};
  torch::nn::Linear fc_{nullptr};
};

/// The CIFAR ResNet of depth 6n+2 (He et al. 2016, section 4.2): a 3x3 conv to 16 channels, three
/// stages of n BasicBlocks with 16, 32 and 64 channels (strides 1, 2, 2) whose shortcuts are
/// parameter-free (option A), global average pooling, and a linear classifier.
class CifarResNetImpl : public ClassifierImpl {
 public:
  CifarResNetImpl(std::int64_t depth, const ModelOptions& options);
  torch::Tensor forward(torch::Tensor x) override;

  /// Blocks per stage: (depth - 2) / 6.
  std::int64_t blocks_per_stage() const { return blocks_per_stage_; }

 private:
  std::int64_t blocks_per_stage_;
  bool channels_last_;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  std::array<torch::nn::Sequential, 3> stages_{nullptr, nullptr, nullptr};
  torch::nn::Linear fc_{nullptr};
};

std::shared_ptr<ResNetImpl> resnet18(const ModelOptions& options = {});
std::shared_ptr<ResNetImpl> resnet34(const ModelOptions& options = {});
std::shared_ptr<ResNetImpl> resnet50(const ModelOptions& options = {});
std::shared_ptr<CifarResNetImpl> resnet20(const ModelOptions& options = {});

/// The names `make_model` accepts: "resnet18", "resnet34", "resnet50", "resnet20".
const std::vector<std::string>& architectures();

/// The model called `arch` (one of `architectures()`). Throws std::invalid_argument naming the
/// architecture and the valid ones otherwise.
std::shared_ptr<ClassifierImpl> make_model(const std::string& arch, const ModelOptions& options);

/// The number of scalar parameters of `module` (trainable or not; buffers excluded).
std::int64_t count_parameters(const torch::nn::Module& module);

}  // namespace resnet
