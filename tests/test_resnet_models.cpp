// The models of examples/resnet: parameter counts against torchvision's published numbers and
// against closed forms derived from the architectures, parameter names, and output shapes.
#include "catch_torch.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>

#include "models.h"

namespace {

using resnet::BlockKind;
using resnet::ModelOptions;

std::int64_t conv(std::int64_t k, std::int64_t in, std::int64_t out) {
  return k * k * in * out;
}
std::int64_t bn(std::int64_t c) {
  return 2 * c;
}  // weight and bias
std::int64_t linear(std::int64_t in, std::int64_t out) {
  return in * out + out;
}

// torchvision's ResNet, counted from its definition: stem conv + BN; per block the convs and BNs
// of the residual branch, plus a 1x1 conv + BN shortcut where the shape changes; the classifier.
std::int64_t torchvision_count(BlockKind kind, std::array<std::int64_t, 4> blocks,
                               const ModelOptions& o) {
  std::int64_t n = conv(o.small_input ? 3 : 7, o.in_channels, 64) + bn(64);
  std::int64_t in = 64;
  for (int stage = 0; stage < 4; ++stage) {
    const std::int64_t planes = std::int64_t{64} << stage;
    for (std::int64_t b = 0; b < blocks[stage]; ++b) {
      const std::int64_t stride = stage > 0 && b == 0 ? 2 : 1;
      std::int64_t out = 0;
      if (kind == BlockKind::kBasic) {
        out = planes;
        n += conv(3, in, planes) + bn(planes) + conv(3, planes, planes) + bn(planes);
      } else {
        out = 4 * planes;
        n += conv(1, in, planes) + bn(planes) + conv(3, planes, planes) + bn(planes) +
             conv(1, planes, out) + bn(out);
      }
      if (stride != 1 || in != out) n += conv(1, in, out) + bn(out);
      in = out;
    }
  }
  return n + linear(in, o.num_classes);
}

// ResNet-20: 3x3 stem to 16 channels + BN; 3 stages of 3 blocks (two 3x3 convs + BNs each) with
// 16, 32, 64 channels; option-A shortcuts have no parameters; the classifier.
std::int64_t resnet20_count(const ModelOptions& o) {
  std::int64_t n = conv(3, o.in_channels, 16) + bn(16);
  std::int64_t in = 16;
  for (std::int64_t planes : {16, 32, 64}) {
    for (int b = 0; b < 3; ++b) {
      n += conv(3, in, planes) + bn(planes) + conv(3, planes, planes) + bn(planes);
      in = planes;
    }
  }
  return n + linear(in, o.num_classes);
}

}  // namespace

TEST_CASE("resnet models: torchvision's parameter counts at 1000 classes", "[resnet]") {
  const ModelOptions imagenet;  // 1000 classes, 3 channels, ImageNet stem
  // The numbers torchvision's model cards publish.
  CHECK(resnet::count_parameters(*resnet::resnet18(imagenet)) == 11689512);
  CHECK(resnet::count_parameters(*resnet::resnet34(imagenet)) == 21797672);
  CHECK(resnet::count_parameters(*resnet::resnet50(imagenet)) == 25557032);
  // The closed form reproduces them, so it can be trusted for the other configurations.
  CHECK(torchvision_count(BlockKind::kBasic, {2, 2, 2, 2}, imagenet) == 11689512);
  CHECK(torchvision_count(BlockKind::kBasic, {3, 4, 6, 3}, imagenet) == 21797672);
  CHECK(torchvision_count(BlockKind::kBottleneck, {3, 4, 6, 3}, imagenet) == 25557032);
}

TEST_CASE("resnet models: Fashion-MNIST configurations match the closed forms", "[resnet]") {
  ModelOptions fmnist;
  fmnist.num_classes = 10;
  fmnist.in_channels = 1;
  fmnist.small_input = true;
  CHECK(resnet::count_parameters(*resnet::resnet18(fmnist)) ==
        torchvision_count(BlockKind::kBasic, {2, 2, 2, 2}, fmnist));
  CHECK(resnet::count_parameters(*resnet::resnet34(fmnist)) ==
        torchvision_count(BlockKind::kBasic, {3, 4, 6, 3}, fmnist));
  CHECK(resnet::count_parameters(*resnet::resnet50(fmnist)) ==
        torchvision_count(BlockKind::kBottleneck, {3, 4, 6, 3}, fmnist));
  CHECK(resnet::count_parameters(*resnet::resnet20(fmnist)) == resnet20_count(fmnist));

  ModelOptions cifar;
  cifar.num_classes = 10;
  const auto n20 = resnet::count_parameters(*resnet::resnet20(cifar));
  CHECK(n20 == resnet20_count(cifar));
  // He et al. (2016), table 6: "0.27M" parameters.
  CHECK(n20 > 265000);
  CHECK(n20 < 275000);
}

TEST_CASE("resnet models: torchvision's parameter and buffer names", "[resnet]") {
  auto model = resnet::resnet50();
  std::set<std::string> names;
  for (const auto& p : model->named_parameters()) names.insert(p.key());
  for (const auto& b : model->named_buffers()) names.insert(b.key());
  for (const char* name :
       {"conv1.weight", "bn1.weight", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var", "layer2.0.downsample.1.bias",
        "layer4.2.bn3.running_mean", "fc.weight", "fc.bias"}) {
    INFO(name);
    CHECK(names.count(name) == 1);
  }
  CHECK(names.count("layer1.1.downsample.0.weight") == 0);  // only the first block projects
}

TEST_CASE("resnet models: output shapes for 28x28x1 and 224x224x3 inputs", "[resnet]") {
  torch::manual_seed(0);
  ModelOptions fmnist;
  fmnist.num_classes = 10;
  fmnist.in_channels = 1;
  fmnist.small_input = true;
  const auto grey = torch::randn({2, 1, 28, 28});
  for (const auto& arch : resnet::architectures()) {
    INFO(arch);
    auto model = resnet::make_model(arch, fmnist);
    model->eval();
    torch::NoGradGuard no_grad;
    const auto y = model->forward(grey);
    CHECK(y.sizes() == torch::IntArrayRef({2, 10}));
    CHECK(torch::isfinite(y).all().item<bool>());
  }
  for (const char* arch : {"resnet18", "resnet50"}) {
    INFO(arch);
    auto model = resnet::make_model(arch, ModelOptions{});
    model->eval();
    torch::NoGradGuard no_grad;
    const auto y = model->forward(torch::randn({1, 3, 224, 224}));
    CHECK(y.sizes() == torch::IntArrayRef({1, 1000}));
    CHECK(torch::isfinite(y).all().item<bool>());
  }
  CHECK_THROWS_WITH(resnet::make_model("resnet19", fmnist),
                    Catch::Contains("resnet19") && Catch::Contains("resnet20"));
}

TEST_CASE("resnet models: ResNet-20 trains in bfloat16", "[resnet]") {
  torch::manual_seed(0);
  ModelOptions fmnist;
  fmnist.num_classes = 10;
  fmnist.in_channels = 1;
  auto model = resnet::resnet20(fmnist);
  model->to(torch::kBFloat16);
  const auto x = torch::randn({4, 1, 28, 28}).to(torch::kBFloat16);
  const auto target = torch::tensor({0, 1, 2, 3}, torch::kLong);
  const auto loss =
      torch::nn::functional::cross_entropy(model->forward(x).to(torch::kFloat), target);
  loss.backward();
  for (const auto& p : model->parameters()) {
    REQUIRE(p.grad().defined());
    CHECK(p.grad().scalar_type() == torch::kBFloat16);
  }
  CHECK(std::isfinite(loss.item<double>()));
}
