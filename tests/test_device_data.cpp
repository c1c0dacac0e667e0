// The device-resident data path (mpu/device_data.h): epoch orders, the augmentation against a
// closed form, the iterator's epoch semantics over it, sharding, resumption, bad input; on a
// GPU ("[cuda]"): the kernels against the CPU loops bit for bit, placement and the memory
// check, and no host synchronisation on the step path.
#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "mpu/config.h"
#include "mpu/datasets.h"
#include "mpu/device_data.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"

#if MPU_HAS_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "catch_torch.h"
#include "messages.h"

using mpu::Batch;
using mpu::OrderSegment;
using mpu::datasets::DeviceAugment;
using mpu::datasets::DeviceDataOptions;
using mpu::datasets::DeviceImageDataset;
using mpu::datasets::ImageDataset;
using mpu::datasets::Placement;
using mpu::test::message_of;

namespace {

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// N random uint8 images [N, C, H, W] whose label is their index (so a batch's targets name its
// examples).
std::shared_ptr<const ImageDataset> numbered_images(std::int64_t n, std::int64_t c, std::int64_t h,
                                                    std::int64_t w, std::uint64_t seed = 7) {
  auto gen = torch::make_generator<at::CPUGeneratorImpl>(seed);
  auto images = torch::randint(256, {n, c, h, w}, gen, torch::kLong).to(torch::kByte);
  return std::make_shared<ImageDataset>(images, torch::arange(n, torch::kLong));
}

// The documented augmentation (mpu/device_data.h, cuda/augment_draw.h), written out again.
torch::Tensor reference(const ImageDataset& base, std::int64_t key, std::int64_t epoch,
                        const DeviceAugment& a) {
  const auto img = base.images()[key];
  const std::int64_t c = img.size(0), h = img.size(1), w = img.size(2);
  const std::uint64_t r = mpu::derive_seed(a.seed(), static_cast<std::uint64_t>(epoch),
                                           static_cast<std::uint64_t>(key));
  const std::uint64_t span = 2 * static_cast<std::uint64_t>(a.padding()) + 1;
  const std::int64_t dy = static_cast<std::int64_t>((r & 0xffff) % span);
  const std::int64_t dx = static_cast<std::int64_t>(((r >> 16) & 0xffff) % span);
  const bool flip = a.flip() && ((r >> 32) & 1) != 0;
  auto out = torch::empty({c, h, w}, torch::kFloat);
  auto acc = out.accessor<float, 3>();
  auto src = img.accessor<std::uint8_t, 3>();
  for (std::int64_t k = 0; k < c; ++k) {
    const float mean = static_cast<float>(a.mean().size() == 1 ? a.mean()[0] : a.mean()[k]);
    const float sd = static_cast<float>(a.stddev().size() == 1 ? a.stddev()[0] : a.stddev()[k]);
    for (std::int64_t y = 0; y < h; ++y) {
      for (std::int64_t x = 0; x < w; ++x) {
        const std::int64_t sy = y + dy - a.padding();
        const std::int64_t sx = (flip ? w - 1 - x : x) + dx - a.padding();
        const float v = sy >= 0 && sy < h && sx >= 0 && sx < w
                            ? static_cast<float>(src[k][sy][sx]) / 255.0f
                            : 0.0f;
        acc[k][y][x] = (v - mean) / sd;
      }
    }
  }
  return out;
}

DeviceAugment some_augment() {
  return DeviceAugment().padding(2).flip(true).mean({0.25, 0.5}).stddev({0.5, 2.0}).seed(11);
}

std::vector<std::int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU).contiguous();
  return std::vector<std::int64_t>(c.data_ptr<std::int64_t>(),
                                   c.data_ptr<std::int64_t>() + c.numel());
}

}  // namespace

TEST_CASE("device_epoch_order: a sort by the documented keys, new each epoch, reproducible",
          "[device_data]") {
  const std::int64_t n = 1000;
  const auto order = to_vector(mpu::device_epoch_order(n, 5, 3, true, torch::kCPU));
  // The closed form: positions sorted by mix64(derive_seed(5, 3, "order") ^ i).
  const std::uint64_t base = mpu::derive_seed(5, 3, 0x6f72646572ULL);
  auto splitmix = [](std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  std::vector<std::int64_t> expected(n);
  for (std::int64_t i = 0; i < n; ++i) expected[i] = i;
  std::sort(expected.begin(), expected.end(), [&](std::int64_t a, std::int64_t b) {
    return static_cast<std::int64_t>(splitmix(base ^ static_cast<std::uint64_t>(a))) <
           static_cast<std::int64_t>(splitmix(base ^ static_cast<std::uint64_t>(b)));
  });
  REQUIRE(order == expected);
  REQUIRE(to_vector(mpu::device_epoch_order(n, 5, 3, true, torch::kCPU)) == order);
  REQUIRE(to_vector(mpu::device_epoch_order(n, 5, 4, true, torch::kCPU)) != order);
  REQUIRE(to_vector(mpu::device_epoch_order(n, 6, 3, true, torch::kCPU)) != order);
  const auto plain = to_vector(mpu::device_epoch_order(n, 5, 3, false, torch::kCPU));
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(plain[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("DeviceImageDataset: crop, flip and normalisation as documented, per example",
          "[device_data]") {
  auto base = numbered_images(12, 2, 7, 5);
  DeviceImageDataset ds(base, DeviceDataOptions(torch::kCPU).augment(some_augment()));
  REQUIRE(ds.size() == 12);
  const Batch b = ds.gather_segments({OrderSegment{0, 3, 5}, OrderSegment{1, 0, 4}}, 9, true);
  REQUIRE(b.data.sizes() == torch::IntArrayRef({9, 2, 7, 5}));
  REQUIRE(b.data.scalar_type() == torch::kFloat);
  const auto o0 = to_vector(mpu::device_epoch_order(12, 9, 0, true, torch::kCPU));
  const auto o1 = to_vector(mpu::device_epoch_order(12, 9, 1, true, torch::kCPU));
  std::vector<std::pair<std::int64_t, std::int64_t>> served;  // (example, epoch)
  for (int i = 3; i < 8; ++i) served.emplace_back(o0[i], 0);
  for (int i = 0; i < 4; ++i) served.emplace_back(o1[i], 1);
  int flipped = 0, shifted = 0;
  for (std::size_t i = 0; i < served.size(); ++i) {
    const auto [k, e] = served[i];
    REQUIRE(b.target[static_cast<std::int64_t>(i)].item<std::int64_t>() == k);
    const auto want = reference(*base, k, e, some_augment());
    REQUIRE(torch::equal(b.data[static_cast<std::int64_t>(i)], want));
    // The draws do something: the example differs from its plain normalisation.
    const auto plain = reference(*base, k, e, DeviceAugment().mean({0.25, 0.5}).stddev({0.5, 2.0}));
    if (!torch::equal(want, plain)) ++shifted;
    const std::uint64_t r =
        mpu::derive_seed(11, static_cast<std::uint64_t>(e), static_cast<std::uint64_t>(k));
    flipped += ((r >> 32) & 1) != 0;
  }
  REQUIRE(shifted > 0);
  REQUIRE(flipped > 0);
  REQUIRE(flipped < static_cast<int>(served.size()));
  // The same example in another epoch gets other draws; in the same epoch the same ones.
  REQUIRE(torch::equal(ds.get(4, 2).data, reference(*base, 4, 2, some_augment())));
  REQUIRE(torch::equal(ds.get(4, 2).data, ds.get(4, 2).data));
  REQUIRE(ds.get(4, 2).target.item<std::int64_t>() == 4);
}

TEST_CASE("Iterator over a DeviceImageDataset: epochs, wrap-around, resumption", "[device_data]") {
  auto base = numbered_images(10, 1, 4, 4);
  auto ds = std::make_shared<DeviceImageDataset>(base, DeviceDataOptions(torch::kCPU));
  mpu::Iterator it(ds, mpu::IteratorOptions(4).seed(3));
  std::vector<std::int64_t> seen;
  for (int i = 0; i < 5; ++i) {
    const Batch b = it.next();
    REQUIRE(b.data.size(0) == 4);
    const auto t = to_vector(b.target);
    seen.insert(seen.end(), t.begin(), t.end());
    REQUIRE(it.is_new_epoch() == (i == 2 || i == 4));
  }
  REQUIRE(it.epoch() == 2);
  REQUIRE(it.position() == 0);
  // Each epoch is its order, every example once.
  const auto o0 = to_vector(mpu::device_epoch_order(10, 3, 0, true, torch::kCPU));
  const auto o1 = to_vector(mpu::device_epoch_order(10, 3, 1, true, torch::kCPU));
  REQUIRE(std::vector<std::int64_t>(seen.begin(), seen.begin() + 10) == o0);
  REQUIRE(std::vector<std::int64_t>(seen.begin() + 10, seen.end()) == o1);
  REQUIRE(o0 != o1);

  // save/load: the resumed iterator serves what the original serves next.
  mpu::Iterator a(ds, mpu::IteratorOptions(4).seed(3));
  for (int i = 0; i < 3; ++i) a.next();
  torch::serialize::OutputArchive out;
  a.save(out);
  std::ostringstream bytes;
  out.save_to(bytes);
  mpu::Iterator b(ds, mpu::IteratorOptions(4).seed(3));
  torch::serialize::InputArchive in;
  std::istringstream read(bytes.str());
  in.load_from(read);
  b.load(in);
  for (int i = 0; i < 4; ++i) {
    const Batch x = a.next();
    const Batch y = b.next();
    REQUIRE(torch::equal(x.data, y.data));
    REQUIRE(torch::equal(x.target, y.target));
  }

  // One pass: the last batch holds the leftovers, in index order without shuffling.
  mpu::Iterator pass(ds, mpu::IteratorOptions(4).shuffle(false).repeat(false));
  std::vector<std::int64_t> sizes;
  std::vector<std::int64_t> all;
  while (!pass.finished()) {
    const auto t = to_vector(pass.next().target);
    sizes.push_back(static_cast<std::int64_t>(t.size()));
    all.insert(all.end(), t.begin(), t.end());
  }
  REQUIRE(sizes == std::vector<std::int64_t>{4, 4, 2});
  for (std::int64_t i = 0; i < 10; ++i) REQUIRE(all[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("device_split_iterators: equal shards of the split, keys of the full dataset",
          "[device_data]") {
  auto base = numbered_images(11, 1, 6, 6);
  const auto augment = DeviceAugment().padding(1).flip(true).seed(4);
  const std::vector<torch::Device> devices{torch::kCPU, torch::kCPU, torch::kCPU};
  auto its = mpu::datasets::device_split_iterators(base, devices, mpu::IteratorOptions(3).seed(8),
                                                   DeviceDataOptions(torch::kCPU).augment(augment));
  REQUIRE(its.size() == 3);
  // The shards of split_iterators: the same examples per shard.
  auto host = mpu::split_iterators(base, 3, mpu::IteratorOptions(3).seed(8));
  std::set<std::int64_t> everyone;
  for (std::size_t i = 0; i < its.size(); ++i) {
    REQUIRE(its[i]->dataset_size() == 3);  // 11 / 3, the rest dropped
    REQUIRE(its[i]->options().seed() == host[i]->options().seed());
    const Batch b = its[i]->next();
    const auto mine = to_vector(b.target);
    const auto theirs = to_vector(host[i]->next().target);
    REQUIRE(std::set<std::int64_t>(mine.begin(), mine.end()) ==
            std::set<std::int64_t>(theirs.begin(), theirs.end()));
    for (std::size_t j = 0; j < mine.size(); ++j) {
      everyone.insert(mine[j]);
      // Augmented as example `mine[j]` of the full dataset in epoch 0, whatever the shard.
      REQUIRE(torch::equal(b.data[static_cast<std::int64_t>(j)],
                           reference(*base, mine[j], 0, augment)));
    }
  }
  REQUIRE(everyone.size() == 9);
}

TEST_CASE("DeviceImageDataset: bad input names the argument and the value", "[device_data]") {
  auto base = numbered_images(4, 2, 3, 3);
  auto transformed = mpu::datasets::transform(base, {mpu::datasets::Normalize(0.5, 0.5)});
  REQUIRE(
      contains(message_of([&] { DeviceImageDataset(transformed, DeviceDataOptions(torch::kCPU)); }),
               "TransformedDataset"));
  REQUIRE(contains(
      message_of([&] {
        DeviceImageDataset(
            base, DeviceDataOptions(torch::kCPU).augment(DeviceAugment().stddev({1.0, 0.0})));
      }),
      "stddev[1] = 0"));
  REQUIRE(contains(
      message_of([&] {
        DeviceImageDataset(
            base, DeviceDataOptions(torch::kCPU).augment(DeviceAugment().mean({0.1, 0.2, 0.3})));
      }),
      "mean has 3 values for images of 2 channel(s)"));
  REQUIRE(contains(message_of([&] {
                     DeviceImageDataset(base, DeviceDataOptions(torch::kCPU).memory_fraction(0));
                   }),
                   "memory_fraction = 0"));
  REQUIRE(contains(message_of([&] {
                     DeviceImageDataset(
                         base, DeviceDataOptions(torch::kCPU).augment(DeviceAugment().padding(-1)));
                   }),
                   "padding = -1"));
  if (!MPU_HAS_CUDA) {
    REQUIRE(contains(message_of([&] { DeviceImageDataset(base, torch::Device(torch::kCUDA, 0)); }),
                     "built without CUDA"));
  }
  DeviceImageDataset ds(base, DeviceDataOptions(torch::kCPU));
  REQUIRE(contains(message_of([&] {
                     ds.gather_segments({OrderSegment{0, 2, 3}}, 0, true);
                   }),
                   "start 2, count 3) is not within an epoch of 4 examples"));
}

// --- CUDA ---------------------------------------------------------------------------------------

TEST_CASE("DeviceImageDataset on a GPU: the same bits as the CPU loops, placement, memory check",
          "[device_data][cuda]") {
  if (mpu::test::skip_without_cuda()) return;
  const torch::Device cuda(torch::kCUDA, 0);
  auto base = numbered_images(300, 2, 9, 7);
  const std::vector<OrderSegment> segs{OrderSegment{2, 250, 50}, OrderSegment{3, 0, 78}};
  DeviceImageDataset cpu(base, DeviceDataOptions(torch::kCPU).augment(some_augment()));
  DeviceImageDataset gpu(
      base, DeviceDataOptions(cuda).augment(some_augment()).placement(Placement::kDevice));
  REQUIRE_FALSE(gpu.resident());
  const Batch want = cpu.gather_segments(segs, 21, true);
  const Batch got = gpu.gather_segments(segs, 21, true);
  REQUIRE(gpu.resident());
  REQUIRE(got.data.device() == cuda);
  REQUIRE(torch::equal(got.data.cpu(), want.data));
  REQUIRE(torch::equal(got.target.cpu(), want.target));
  REQUIRE(torch::equal(mpu::device_epoch_order(300, 21, 2, true, cuda).cpu(),
                       mpu::device_epoch_order(300, 21, 2, true, torch::kCPU)));

  // Does not fit: kDevice is an error at the first batch, kAuto falls back to host memory with
  // the same batches, on the GPU.
  DeviceImageDataset forced(base, DeviceDataOptions(cuda)
                                      .augment(some_augment())
                                      .placement(Placement::kDevice)
                                      .memory_fraction(1e-12));
  const std::string msg = message_of([&] { forced.gather_segments(segs, 21, true); });
  REQUIRE(contains(msg, "memory_fraction"));
  REQUIRE(contains(msg, "free on cuda:0"));
  DeviceImageDataset fallback(
      base, DeviceDataOptions(cuda).augment(some_augment()).memory_fraction(1e-12));
  const Batch host = fallback.gather_segments(segs, 21, true);
  REQUIRE_FALSE(fallback.resident());
  REQUIRE(host.data.device() == cuda);
  REQUIRE(torch::equal(host.data.cpu(), want.data));
  DeviceImageDataset kept(
      base, DeviceDataOptions(cuda).augment(some_augment()).placement(Placement::kHost));
  REQUIRE(torch::equal(kept.gather_segments(segs, 21, true).target.cpu(), want.target));
  REQUIRE_FALSE(kept.resident());
}

TEST_CASE("StandardUpdater over device-resident data: no host synchronisation on the step path",
          "[device_data][cuda]") {
  if (mpu::test::skip_without_cuda()) return;
#if MPU_HAS_CUDA
  const torch::Device cuda(torch::kCUDA, 0);
  for (const auto precision :
       {mpu::Precision::kFp32, mpu::Precision::kBf16Mixed, mpu::Precision::kBf16Autocast}) {
    DYNAMIC_SECTION("precision " << mpu::to_string(precision)) {
      torch::manual_seed(0);
      auto base = numbered_images(512, 1, 12, 12);
      auto ds = std::make_shared<DeviceImageDataset>(
          base, DeviceDataOptions(cuda).augment(DeviceAugment().padding(2).flip(true)));
      auto it = std::make_shared<mpu::Iterator>(ds, mpu::IteratorOptions(64).seed(1));
      auto model =
          torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)),
                                torch::nn::BatchNorm2d(8), torch::nn::ReLU(), torch::nn::Flatten(),
                                torch::nn::Linear(8 * 12 * 12, 512));
      model->to(cuda);
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
      auto loss_fn = [model](const Batch& b) mutable {
        auto logits =
            model->forward(b.data.to(model->parameters()[0].scalar_type())).to(torch::kFloat);
        auto loss = torch::nn::functional::cross_entropy(logits, b.target);
        mpu::report("loss", loss);
        return loss;
      };
      mpu::UpdaterOptions uo;
      uo.precision = precision;
      mpu::StandardUpdater updater(model.ptr(), opt, it, loss_fn, cuda, uo);
      for (int i = 0; i < 3; ++i) updater.update();  // warm-up: uploads, cuDNN, the flat buffer
      torch::cuda::synchronize();
      const auto before = model->parameters()[0].detach().clone();
      // Any synchronising call (item(), a blocking copy, a stream synchronisation) throws now.
      c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
      const std::string msg = message_of([&] {
        for (int i = 0; i < 10; ++i) updater.update();
      });
      c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
      INFO(msg);
      REQUIRE(msg.empty());
      REQUIRE_FALSE(torch::equal(model->parameters()[0].detach(), before));
    }
  }
#endif
}
