#include "models.h"

#include <stdexcept>

namespace resnet {
namespace {

namespace nn = torch::nn;

nn::Conv2d conv3x3(std::int64_t in, std::int64_t out, std::int64_t stride = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false));
}

nn::Conv2d conv1x1(std::int64_t in, std::int64_t out, std::int64_t stride = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false));
}

// torchvision's shortcut when a block changes the shape: 1x1 strided conv and BN, registered
// as "downsample.0" and "downsample.1".
nn::Sequential projection(std::int64_t in, std::int64_t out, std::int64_t stride) {
  return nn::Sequential(conv1x1(in, out, stride), nn::BatchNorm2d(out));
}

// torchvision's initialisation, also used for ResNet-20: convolutions Kaiming-normal with
// fan-out and ReLU gain, BatchNorm weight 1 and bias 0. Linear layers keep LibTorch's default
// (the same as PyTorch's).
void init_weights(nn::Module& root) {
  torch::NoGradGuard no_grad;
  for (auto& m : root.modules(/*include_self=*/false)) {
    if (auto* conv = m->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = m->as<nn::BatchNorm2d>()) {
      nn::init::ones_(bn->weight);
      nn::init::zeros_(bn->bias);
    }
  }
}

// Option A of He et al.: the identity on every second pixel, with the new channels zero.
class PadShortcutImpl : public nn::Module {
 public:
  PadShortcutImpl(std::int64_t in_planes, std::int64_t planes, std::int64_t stride)
      : extra_(planes - in_planes), stride_(stride) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = x;
    if (stride_ > 1) y = y.slice(2, 0, y.size(2), stride_).slice(3, 0, y.size(3), stride_);
    if (extra_ > 0) {
      y = torch::constant_pad_nd(y, {0, 0, 0, 0, extra_ / 2, extra_ - extra_ / 2});
    }
    return y;
  }

 private:
  std::int64_t extra_;
  std::int64_t stride_;
};
TORCH_MODULE(PadShortcut);

// ResNet-20's block: torchvision's BasicBlock with a parameter-free shortcut.
class CifarBlockImpl : public nn::Module {
 public:
  CifarBlockImpl(std::int64_t in_planes, std::int64_t planes, std::int64_t stride)
      : conv1_(register_module("conv1", conv3x3(in_planes, planes, stride))),
        bn1_(register_module("bn1", nn::BatchNorm2d(planes))),
        conv2_(register_module("conv2", conv3x3(planes, planes))),
        bn2_(register_module("bn2", nn::BatchNorm2d(planes))),
        shortcut_(in_planes, planes, stride) {}
  torch::Tensor forward(torch::Tensor x) {
    auto out = bn1_(conv1_(x)).relu_();
    out = bn2_(conv2_(out));
    out += shortcut_(x);
    return out.relu_();
  }

 private:
  nn::Conv2d conv1_;
  nn::BatchNorm2d bn1_;
  nn::Conv2d conv2_;
  nn::BatchNorm2d bn2_;
  PadShortcut shortcut_;  // no parameters: not registered
};
TORCH_MODULE(CifarBlock);

}  // namespace

BasicBlockImpl::BasicBlockImpl(std::int64_t in_planes, std::int64_t planes, std::int64_t stride) {
  conv1_ = register_module("conv1", conv3x3(in_planes, planes, stride));
  bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
  conv2_ = register_module("conv2", conv3x3(planes, planes));
  bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
  if (stride != 1 || in_planes != planes * kExpansion) {
    downsample_ = register_module("downsample", projection(in_planes, planes * kExpansion, stride));
  }
}

torch::Tensor BasicBlockImpl::forward(torch::Tensor x) {
  auto out = bn1_(conv1_(x)).relu_();
  out = bn2_(conv2_(out));
  out += downsample_ ? downsample_->forward(x) : x;
  return out.relu_();
}

BottleneckImpl::BottleneckImpl(std::int64_t in_planes, std::int64_t planes, std::int64_t stride) {
  conv1_ = register_module("conv1", conv1x1(in_planes, planes));
  bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
  conv2_ = register_module("conv2", conv3x3(planes, planes, stride));
  bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
  conv3_ = register_module("conv3", conv1x1(planes, planes * kExpansion));
  bn3_ = register_module("bn3", nn::BatchNorm2d(planes * kExpansion));
  if (stride != 1 || in_planes != planes * kExpansion) {
    downsample_ = register_module("downsample", projection(in_planes, planes * kExpansion, stride));
  }
}

torch::Tensor BottleneckImpl::forward(torch::Tensor x) {
  auto out = bn1_(conv1_(x)).relu_();
  out = bn2_(conv2_(out)).relu_();
  out = bn3_(conv3_(out));
  out += downsample_ ? downsample_->forward(x) : x;
  return out.relu_();
}

ResNetImpl::ResNetImpl(BlockKind kind, std::array<std::int64_t, 4> blocks,
                       const ModelOptions& options)
    : small_input_(options.small_input), channels_last_(options.channels_last) {
  conv1_ = register_module(
      "conv1", small_input_ ? conv3x3(options.in_channels, in_planes_)
                            : nn::Conv2d(nn::Conv2dOptions(options.in_channels, in_planes_, 7)
                                             .stride(2)
                                             .padding(3)
                                             .bias(false)));
  bn1_ = register_module("bn1", nn::BatchNorm2d(in_planes_));
  const std::array<std::int64_t, 4> planes{64, 128, 256, 512};
  for (std::size_t i = 0; i < 4; ++i) {
    stages_[i] = register_module("layer" + std::to_string(i + 1),
                                 make_stage(kind, planes[i], blocks[i], i == 0 ? 1 : 2));
  }
  fc_ = register_module("fc", nn::Linear(in_planes_, options.num_classes));
  init_weights(*this);
}

nn::Sequential ResNetImpl::make_stage(BlockKind kind, std::int64_t planes, std::int64_t blocks,
                                      std::int64_t stride) {
  nn::Sequential stage;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t s = b == 0 ? stride : 1;
    if (kind == BlockKind::kBasic) {
      stage->push_back(BasicBlock(in_planes_, planes, s));
      in_planes_ = planes * BasicBlockImpl::kExpansion;
    } else {
      stage->push_back(Bottleneck(in_planes_, planes, s));
      in_planes_ = planes * BottleneckImpl::kExpansion;
    }
  }
  return stage;
}

torch::Tensor ResNetImpl::forward(torch::Tensor x) {
  x = conv1_(x);
  if (channels_last_) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  x = bn1_(x).relu_();
  if (!small_input_) x = torch::max_pool2d(x, 3, 2, 1);
  for (auto& stage : stages_) x = stage->forward(x);
  x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  return fc_(x);
}

CifarResNetImpl::CifarResNetImpl(std::int64_t depth, const ModelOptions& options)
    : blocks_per_stage_((depth - 2) / 6), channels_last_(options.channels_last) {
  if (depth < 8 || (depth - 2) % 6 != 0) {
    throw std::invalid_argument("CifarResNet: depth " + std::to_string(depth) +
                                " is not 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)");
  }
  conv1_ = register_module("conv1", conv3x3(options.in_channels, 16));
  bn1_ = register_module("bn1", nn::BatchNorm2d(16));
  std::int64_t in_planes = 16;
  const std::array<std::int64_t, 3> planes{16, 32, 64};
  for (std::size_t i = 0; i < 3; ++i) {
    nn::Sequential stage;
    for (std::int64_t b = 0; b < blocks_per_stage_; ++b) {
      stage->push_back(CifarBlock(in_planes, planes[i], i > 0 && b == 0 ? 2 : 1));
      in_planes = planes[i];
    }
    stages_[i] = register_module("layer" + std::to_string(i + 1), stage);
  }
  fc_ = register_module("fc", nn::Linear(in_planes, options.num_classes));
  init_weights(*this);
}

torch::Tensor CifarResNetImpl::forward(torch::Tensor x) {
  x = conv1_(x);
  if (channels_last_) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  x = bn1_(x).relu_();
  for (auto& stage : stages_) x = stage->forward(x);
  x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  return fc_(x);
}

std::shared_ptr<ResNetImpl> resnet18(const ModelOptions& options) {
  return std::make_shared<ResNetImpl>(BlockKind::kBasic, std::array<std::int64_t, 4>{2, 2, 2, 2},
                                      options);
}

std::shared_ptr<ResNetImpl> resnet34(const ModelOptions& options) {
  return std::make_shared<ResNetImpl>(BlockKind::kBasic, std::array<std::int64_t, 4>{3, 4, 6, 3},
                                      options);
}

std::shared_ptr<ResNetImpl> resnet50(const ModelOptions& options) {
  return std::make_shared<ResNetImpl>(BlockKind::kBottleneck,
                                      std::array<std::int64_t, 4>{3, 4, 6, 3}, options);
}

std::shared_ptr<CifarResNetImpl> resnet20(const ModelOptions& options) {
  return std::make_shared<CifarResNetImpl>(20, options);
}

const std::vector<std::string>& architectures() {
  static const std::vector<std::string> names{"resnet18", "resnet34", "resnet50", "resnet20"};
  return names;
}

std::shared_ptr<ClassifierImpl> make_model(const std::string& arch, const ModelOptions& options) {
  if (arch == "resnet18") return resnet18(options);
  if (arch == "resnet34") return resnet34(options);
  if (arch == "resnet50") return resnet50(options);
  if (arch == "resnet20") return resnet20(options);
  std::string valid;
  for (const auto& name : architectures()) valid += (valid.empty() ? "" : ", ") + name;
  throw std::invalid_argument("unknown architecture '" + arch + "'; valid: " + valid);
}

std::int64_t count_parameters(const torch::nn::Module& module) {
  std::int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

}  // namespace resnet
