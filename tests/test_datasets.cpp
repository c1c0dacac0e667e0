#include <zlib.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "mpu/datasets.h"
#include "mpu/defaults.h"

#include "catch_torch.h"
#include "messages.h"
#include "remove_tree.h"

namespace fs = std::filesystem;
using mpu::datasets::Split;

namespace {

const std::string kDir = mpu::kDefaultFashionMnistDir;

bool have_fashion_mnist() {
  for (const char* f : {mpu::datasets::kTrainImagesFile, mpu::datasets::kTrainLabelsFile,
                        mpu::datasets::kTestImagesFile, mpu::datasets::kTestLabelsFile}) {
    if (!fs::is_regular_file(fs::path(kDir) / f)) return false;
  }
  return true;
}

#define REQUIRE_FASHION_MNIST()                                                                   \
  do {                                                                                            \
    if (!have_fashion_mnist()) {                                                                  \
      WARN("skipped: Fashion-MNIST is not installed in " << kDir                                  \
                                                         << " (Debian's dataset-fashion-mnist)"); \
      return;                                                                                     \
    }                                                                                             \
  } while (0)

// The whole decompressed content of a gzip file, read with zlib directly (not through the code
// under test).
std::vector<unsigned char> gunzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  REQUIRE(f != nullptr);
  std::vector<unsigned char> out;
  unsigned char buf[1 << 16];
  int n = 0;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  REQUIRE(n == 0);
  gzclose(f);
  return out;
}

void write_gzip(const std::string& path, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
          static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A fresh temporary directory, removed at scope exit.
struct TempDir {
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "mpu_datasets_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() { mpu::test::remove_tree(path); }
  std::string operator/(const std::string& name) const { return (fs::path(path) / name).string(); }
  std::string path;
};

void put_be32(std::vector<unsigned char>& out, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<unsigned char>(v >> s));
}

// An idx file of uint8 with the given dims and values i % 251.
std::vector<unsigned char> make_idx_u8(const std::vector<std::uint32_t>& dims) {
  std::vector<unsigned char> out{0, 0, 0x08, static_cast<unsigned char>(dims.size())};
  std::size_t count = 1;
  for (auto d : dims) {
    put_be32(out, d);
    count *= d;
  }
  for (std::size_t i = 0; i < count; ++i) out.push_back(static_cast<unsigned char>(i % 251));
  return out;
}

using mpu::test::message_of;

}  // namespace

TEST_CASE("Fashion-MNIST: sizes, shapes, label range and the images' bytes", "[datasets]") {
  REQUIRE_FASHION_MNIST();
  const auto train = mpu::datasets::FashionMNIST(Split::Train);
  const auto test = mpu::datasets::FashionMNIST(Split::Test, kDir);
  CHECK(train->size() == 60000);
  CHECK(test->size() == 10000);

  const mpu::Batch example = train->get(0);
  CHECK(example.data.sizes() == torch::IntArrayRef{1, 28, 28});
  CHECK(example.data.scalar_type() == torch::kFloat32);
  CHECK(example.target.scalar_type() == torch::kInt64);
  CHECK(example.target.dim() == 0);

  for (const auto& data : {train, test}) {
    const auto counts = torch::bincount(data->labels());
    REQUIRE(counts.size(0) == 10);
    // Fashion-MNIST is balanced: N/10 of each class.
    CHECK(counts.min().item<std::int64_t>() == data->size() / 10);
    CHECK(counts.max().item<std::int64_t>() == data->size() / 10);
  }

  // Pixels and labels against the raw bytes, read with zlib here: 16-byte and 8-byte headers.
  const auto raw_images = gunzip(kDir + "/" + mpu::datasets::kTestImagesFile);
  const auto raw_labels = gunzip(kDir + "/" + mpu::datasets::kTestLabelsFile);
  REQUIRE(raw_images.size() == 16 + 10000u * 784u);
  REQUIRE(raw_labels.size() == 8 + 10000u);
  for (std::int64_t i : {0, 1, 4321, 9999}) {
    INFO("test example " << i);
    const auto ex = test->get(i);
    const auto* pixels = raw_images.data() + 16 + i * 784;
    const auto expected =
        torch::from_blob(const_cast<unsigned char*>(pixels), {1, 28, 28}, torch::kUInt8)
            .to(torch::kFloat32) /
        255.0;
    CHECK(torch::equal(ex.data, expected));
    CHECK(ex.target.item<std::int64_t>() == raw_labels[static_cast<std::size_t>(8 + i)]);
  }
  const auto batch = test->get_batch({9999, 0, 1});
  CHECK(torch::equal(batch.data[0], test->get(9999).data));
  CHECK(batch.target[2].item<std::int64_t>() == raw_labels[9]);
}

TEST_CASE("Fashion-MNIST: the mean/std constants match the training images", "[datasets]") {
  REQUIRE_FASHION_MNIST();
  const auto raw = gunzip(kDir + "/" + mpu::datasets::kTrainImagesFile);
  REQUIRE(raw.size() == 16 + 60000u * 784u);
  double sum = 0;
  double sum_sq = 0;
  for (std::size_t i = 16; i < raw.size(); ++i) {
    sum += raw[i];
    sum_sq += double(raw[i]) * raw[i];
  }
  const double n = static_cast<double>(raw.size() - 16);
  const double mean = sum / n / 255.0;
  const double stddev = std::sqrt(sum_sq / n / (255.0 * 255.0) - mean * mean);

  const auto train = mpu::datasets::FashionMNIST(Split::Train);
  const auto all = train->images().to(torch::kFloat64).div(255.0);
  CHECK(all.mean().item<double>() == Approx(mean).epsilon(1e-12));
  // The constants are rounded to 4 decimals.
  CHECK(std::abs(mpu::datasets::kFashionMnistMean - mean) <= 5e-5);
  CHECK(std::abs(mpu::datasets::kFashionMnistStd - stddev) <= 5e-5);

  // An iterator over the whole set in float32 sees the same mean.
  mpu::Iterator it(train, mpu::IteratorOptions(7000).repeat(false).seed(1));
  double total = 0;
  while (!it.finished()) total += it.next().data.to(torch::kFloat64).sum().item<double>();
  CHECK(total / n == Approx(mean).epsilon(1e-6));  // float32 rounding of x / 255
}

TEST_CASE("Fashion-MNIST: missing files name the directory and the files expected", "[datasets]") {
  TempDir tmp;
  const std::string missing = tmp / "nowhere";
  const std::string msg = message_of([&] { mpu::datasets::FashionMNIST(Split::Train, missing); });
  CHECK_THAT(msg, Catch::Matchers::Contains("Fashion-MNIST: " + missing + " does not exist"));
  CHECK_THAT(msg, Catch::Matchers::Contains("expected train-images-idx3-ubyte.gz, "
                                            "train-labels-idx1-ubyte.gz in that directory"));
  CHECK_THAT(msg, Catch::Matchers::Contains("dataset-fashion-mnist"));
  CHECK_THAT(msg, Catch::Matchers::Contains("FASHION_MNIST_DIR"));
  CHECK_THROWS_AS(mpu::datasets::FashionMNIST(Split::Train, missing), mpu::Error);

  // Only the images present: the error names the labels file.
  write_gzip(tmp / mpu::datasets::kTestImagesFile, make_idx_u8({2, 3, 3}));
  CHECK_THROWS_WITH(mpu::datasets::FashionMNIST(Split::Test, tmp.path),
                    Catch::Matchers::Contains("Fashion-MNIST: " + tmp.path +
                                              " has no t10k-labels-idx1-ubyte.gz; expected "
                                              "t10k-images-idx3-ubyte.gz, "
                                              "t10k-labels-idx1-ubyte.gz in that directory"));

  SECTION("the directory comes from FASHION_MNIST_DIR when set") {
    REQUIRE(::setenv(mpu::kEnvFashionMnistDir, missing.c_str(), 1) == 0);
    CHECK(mpu::datasets::fashion_mnist_dir() == missing);
    CHECK_THROWS_WITH(mpu::datasets::FashionMNIST(Split::Test),
                      Catch::Matchers::Contains(missing + " does not exist"));
    REQUIRE(::setenv(mpu::kEnvFashionMnistDir, "", 1) == 0);
    CHECK(mpu::datasets::fashion_mnist_dir() == mpu::kDefaultFashionMnistDir);
    REQUIRE(::unsetenv(mpu::kEnvFashionMnistDir) == 0);
    CHECK(mpu::datasets::fashion_mnist_dir() == mpu::kDefaultFashionMnistDir);
  }
  SECTION("MNIST needs a directory") {
    REQUIRE(::unsetenv(mpu::kEnvMnistDir) == 0);
    CHECK_THROWS_WITH(mpu::datasets::MNIST(Split::Train),
                      Catch::Matchers::Contains("MNIST_DIR is not set"));
    CHECK_THROWS_WITH(mpu::datasets::MNIST(Split::Train, missing),
                      Catch::Matchers::Contains("MNIST: " + missing + " does not exist"));
  }
}

TEST_CASE("Fashion-MNIST: corrupt and truncated files give a clear error", "[datasets]") {
  REQUIRE_FASHION_MNIST();
  TempDir tmp;
  const std::string images = tmp / mpu::datasets::kTestImagesFile;
  const std::string labels = tmp / mpu::datasets::kTestLabelsFile;
  const auto good_images = read_file(kDir + "/" + mpu::datasets::kTestImagesFile);
  const auto good_labels = read_file(kDir + "/" + mpu::datasets::kTestLabelsFile);
  write_file(labels, good_labels);
  auto load = [&] { mpu::datasets::FashionMNIST(Split::Test, tmp.path); };
  auto corrupt_error = [&](const std::string& file) {
    return Catch::Matchers::Contains("Fashion-MNIST: " + file + " is corrupt or truncated");
  };

  SECTION("an intact copy loads") {
    write_file(images, good_images);
    CHECK(mpu::datasets::FashionMNIST(Split::Test, tmp.path)->size() == 10000);
  }
  SECTION("not gzip and not idx") {
    write_file(images, std::vector<char>(1000, 'x'));
    CHECK_THROWS_WITH(load(), corrupt_error(images));
    CHECK_THROWS_WITH(load(), Catch::Matchers::Contains("magic number"));
  }
  SECTION("an empty file") {
    write_file(images, {});
    CHECK_THROWS_WITH(load(), corrupt_error(images));
  }
  SECTION("gzip cut in half") {
    write_file(images, std::vector<char>(good_images.begin(),
                                         good_images.begin() + good_images.size() / 2));
    CHECK_THROWS_WITH(load(), corrupt_error(images));
  }
  SECTION("gzip without its 8-byte trailer (CRC and length)") {
    write_file(images, std::vector<char>(good_images.begin(), good_images.end() - 8));
    CHECK_THROWS_WITH(load(), corrupt_error(images));
  }
  SECTION("one byte of the compressed stream flipped") {
    auto bad = good_images;
    bad[bad.size() / 2] = static_cast<char>(bad[bad.size() / 2] ^ 0x5a);
    write_file(images, bad);
    CHECK_THROWS_WITH(load(), corrupt_error(images));
  }
  SECTION("a valid idx file with more data than its header says") {
    auto bytes = make_idx_u8({10000, 28, 28});
    bytes.push_back(0);
    write_gzip(images, bytes);
    CHECK_THROWS_WITH(load(), Catch::Matchers::Contains(
                                  "beyond the " + std::to_string(10000 * 28 * 28) + " bytes"));
  }
  SECTION("images and labels disagree on the count") {
    write_gzip(images, make_idx_u8({9999, 28, 28}));
    CHECK_THROWS_WITH(load(), corrupt_error(labels));
    CHECK_THROWS_WITH(load(), Catch::Matchers::Contains("10000 labels for the 9999 images"));
  }
  SECTION("the labels file in place of the images") {
    write_file(images, good_labels);
    CHECK_THROWS_WITH(load(), Catch::Matchers::Contains("images are uint8 [N, H, W]"));
  }
  SECTION("a label out of range") {
    write_file(images, good_images);
    auto raw = gunzip(kDir + "/" + mpu::datasets::kTestLabelsFile);
    raw[8 + 17] = 10;
    write_gzip(labels, raw);
    CHECK_THROWS_WITH(load(), Catch::Matchers::Contains("it has label 10"));
  }
}

TEST_CASE("read_idx reads every idx type, big-endian, gzip or plain", "[datasets]") {
  TempDir tmp;
  // int32 values that use all four bytes, and negatives.
  std::vector<std::int32_t> values;
  for (std::int32_t i = 0; i < 12; ++i) values.push_back((i - 6) * 19088743);  // 0x01234567
  std::vector<unsigned char> bytes{0, 0, 0x0C, 2};
  put_be32(bytes, 3);
  put_be32(bytes, 4);
  for (auto v : values) put_be32(bytes, static_cast<std::uint32_t>(v));
  write_gzip(tmp / "a.gz", bytes);
  const auto t = mpu::datasets::read_idx(tmp / "a.gz");
  CHECK(t.scalar_type() == torch::kInt32);
  CHECK(t.sizes() == torch::IntArrayRef{3, 4});
  CHECK(torch::equal(t.flatten(), torch::tensor(values, torch::kInt32)));

  // Plain (uncompressed) idx reads the same through zlib's transparent mode.
  write_file(tmp / "a", std::vector<char>(bytes.begin(), bytes.end()));
  CHECK(torch::equal(mpu::datasets::read_idx(tmp / "a"), t));

  // gzip members one after the other form one stream; bytes after the stream are an error.
  write_gzip(tmp / "head.gz", std::vector<unsigned char>(bytes.begin(), bytes.begin() + 21));
  write_gzip(tmp / "tail.gz", std::vector<unsigned char>(bytes.begin() + 21, bytes.end()));
  auto two = read_file(tmp / "head.gz");
  const auto tail = read_file(tmp / "tail.gz");
  two.insert(two.end(), tail.begin(), tail.end());
  write_file(tmp / "two.gz", two);
  CHECK(torch::equal(mpu::datasets::read_idx(tmp / "two.gz"), t));
  two.insert(two.end(), {'j', 'u', 'n', 'k'});
  write_file(tmp / "junk.gz", two);
  CHECK_THROWS_WITH(mpu::datasets::read_idx(tmp / "junk.gz"),
                    Catch::Matchers::Contains("is corrupt or truncated"));

  // float64: 1.5 is 0x3FF8000000000000.
  std::vector<unsigned char> f{0, 0, 0x0E, 1, 0, 0, 0, 1, 0x3F, 0xF8, 0, 0, 0, 0, 0, 0};
  write_gzip(tmp / "f.gz", f);
  CHECK(mpu::datasets::read_idx(tmp / "f.gz").item<double>() == 1.5);

  CHECK_THROWS_WITH(mpu::datasets::read_idx(tmp / "none.gz"),
                    Catch::Matchers::Contains("cannot open " + tmp / "none.gz"));
  std::vector<unsigned char> bad_type{0, 0, 0x07, 1, 0, 0, 0, 1, 0};
  write_gzip(tmp / "t.gz", bad_type);
  CHECK_THROWS_WITH(mpu::datasets::read_idx(tmp / "t.gz"),
                    Catch::Matchers::Contains("magic number is 0 0 0x7 0x1"));
  std::vector<unsigned char> huge{0, 0, 0x08, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  write_gzip(tmp / "h.gz", huge);
  CHECK_THROWS_WITH(mpu::datasets::read_idx(tmp / "h.gz"),
                    Catch::Matchers::Contains("implausible size"));
}

TEST_CASE("ImageDataset scales bytes to [0, 1] - get_batch matches get", "[datasets]") {
  auto images =
      torch::arange(2 * 3 * 3, torch::kInt64).remainder(256).to(torch::kUInt8).view({2, 3, 3});
  auto data = std::make_shared<mpu::datasets::ImageDataset>(images, torch::tensor({3, 7}));
  CHECK(data->images().sizes() == torch::IntArrayRef{2, 1, 3, 3});
  const auto one = data->get(1);
  CHECK(torch::allclose(one.data, images[1].unsqueeze(0).to(torch::kFloat32) / 255.0));
  CHECK(one.target.item<std::int64_t>() == 7);
  const auto batch = data->get_batch({1, 0});
  CHECK(torch::equal(batch.data[0], one.data));
  CHECK(torch::equal(batch.target, torch::tensor({7, 3}, torch::kInt64)));
  CHECK_THROWS_WITH(mpu::datasets::ImageDataset(images.to(torch::kFloat32), torch::tensor({1, 2})),
                    Catch::Matchers::Contains("need uint8"));
}

TEST_CASE("Normalize subtracts the mean and divides by the std per channel", "[datasets]") {
  mpu::Rng rng(0);
  const auto x = torch::rand({3, 4, 5});
  const mpu::datasets::Normalize one(0.25, 0.5);
  CHECK(torch::allclose(one(x, rng), (x - 0.25) / 0.5));
  const mpu::datasets::Normalize per_channel({0.1, 0.2, 0.3}, {1.0, 2.0, 4.0});
  const auto y = per_channel(x, rng);
  for (int c = 0; c < 3; ++c) {
    const double m = 0.1 * (c + 1);
    const double s = std::pow(2.0, c);
    CHECK(torch::allclose(y[c], (x[c] - m) / s));
  }
  CHECK_THROWS_WITH(per_channel(torch::rand({2, 4, 5}), rng),
                    Catch::Matchers::Contains("has 2 channels (dim 0), but 3 means"));
  CHECK_THROWS_WITH(one(torch::ones({1, 2, 2}, torch::kUInt8), rng),
                    Catch::Matchers::Contains("needs a floating type"));
  CHECK_THROWS_WITH(mpu::datasets::Normalize(0.5, 0.0), Catch::Matchers::Contains("std[0] = 0"));
  CHECK_THROWS_AS(mpu::datasets::Normalize({0.1, 0.2}, {1.0}), mpu::InvalidArgument);
}

TEST_CASE("RandomCrop cuts a window of the padded image - RandomHorizontalFlip mirrors",
          "[datasets]") {
  const auto x = torch::arange(1, 2 * 5 * 6 + 1, torch::kFloat32).view({2, 5, 6});
  const std::int64_t pad = 2;
  const auto padded = torch::zeros({2, 5 + 2 * pad, 6 + 2 * pad});
  padded.narrow(1, pad, 5).narrow(2, pad, 6).copy_(x);
  const mpu::datasets::RandomCrop crop(4, pad);
  std::set<std::pair<std::int64_t, std::int64_t>> offsets;
  for (std::uint64_t s = 0; s < 400; ++s) {
    mpu::Rng rng(s);
    const auto y = crop(x, rng);
    REQUIRE(y.sizes() == torch::IntArrayRef{2, 4, 4});
    // Find the offset by brute force; each must be a window of the padded image.
    bool found = false;
    for (std::int64_t top = 0; top <= 5 + 2 * pad - 4 && !found; ++top) {
      for (std::int64_t left = 0; left <= 6 + 2 * pad - 4 && !found; ++left) {
        if (torch::equal(y, padded.narrow(1, top, 4).narrow(2, left, 4))) {
          offsets.insert({top, left});
          found = true;
        }
      }
    }
    REQUIRE(found);
  }
  // (9-4+1) x (10-4+1) = 42 offsets, and 400 draws reach them all.
  CHECK(offsets.size() == 42);
  mpu::Rng rng(1);
  CHECK(torch::equal(mpu::datasets::RandomCrop(5, 0)(x.narrow(2, 0, 5), rng), x.narrow(2, 0, 5)));
  CHECK_THROWS_WITH(mpu::datasets::RandomCrop(10, 2)(x, rng),
                    Catch::Matchers::Contains("does not fit"));

  const mpu::datasets::RandomHorizontalFlip never(0.0);
  const mpu::datasets::RandomHorizontalFlip always(1.0);
  const mpu::datasets::RandomHorizontalFlip half;
  int flipped = 0;
  for (int i = 0; i < 1000; ++i) {
    REQUIRE(torch::equal(never(x, rng), x));
    REQUIRE(torch::equal(always(x, rng), x.flip({-1})));
    const auto y = half(x, rng);
    if (!torch::equal(y, x)) {
      REQUIRE(torch::equal(y, x.flip({-1})));
      ++flipped;
    }
  }
  CHECK(flipped > 400);
  CHECK(flipped < 600);
  CHECK_THROWS_AS(mpu::datasets::RandomHorizontalFlip(1.5), mpu::InvalidArgument);
}

TEST_CASE("TransformedDataset: augmentations depend only on (seed, epoch, index)", "[datasets]") {
  const std::int64_t n = 40;
  auto images = torch::randint(0, 256, {n, 1, 8, 8}, torch::kUInt8);
  mpu::DatasetPtr base =
      std::make_shared<mpu::datasets::ImageDataset>(images, torch::arange(n) % 10);
  auto augment = [&](std::uint64_t seed) {
    return mpu::datasets::transform(
        base,
        {mpu::datasets::RandomCrop(8, 3), mpu::datasets::RandomHorizontalFlip(),
         mpu::datasets::Normalize(mpu::datasets::kFashionMnistMean,
                                  mpu::datasets::kFashionMnistStd)},
        seed);
  };
  const auto a = augment(5);
  const auto b = augment(5);
  const auto c = augment(6);
  int differ_by_epoch = 0;
  int differ_by_seed = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    REQUIRE(torch::equal(a->get(i, 3).data, b->get(i, 3).data));  // two runs agree
    REQUIRE(torch::equal(a->get(i, 3).target, base->get(i).target));
    if (!torch::equal(a->get(i, 3).data, a->get(i, 4).data)) ++differ_by_epoch;
    if (!torch::equal(a->get(i, 3).data, c->get(i, 3).data)) ++differ_by_seed;
  }
  CHECK(differ_by_epoch > n / 2);
  CHECK(differ_by_seed > n / 2);

  // A batch is the stack of its examples, each with its own epoch.
  const auto batch = a->get_batch({7, 2, 7}, std::vector<std::int64_t>{0, 1, 1});
  CHECK(torch::equal(batch.data[0], a->get(7, 0).data));
  CHECK(torch::equal(batch.data[1], a->get(2, 1).data));
  CHECK(torch::equal(batch.data[2], a->get(7, 1).data));

  // Sharding after the transform keeps each example's augmentation.
  const auto shards = mpu::split_dataset_n_random(a, 3, 8);
  for (const auto& shard : shards) {
    const auto& indices = dynamic_cast<const mpu::SubsetDataset&>(*shard).indices();
    for (std::int64_t k = 0; k < shard->size(); ++k) {
      REQUIRE(torch::equal(shard->get(k, 2).data, a->get(indices[k], 2).data));
    }
  }

  // Without transforms the base batch passes through.
  const auto plain = mpu::datasets::transform(base, {}, 1);
  CHECK(torch::equal(plain->get_batch({3, 4}).data, base->get_batch({3, 4}).data));
}
