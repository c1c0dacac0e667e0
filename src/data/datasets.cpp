#include "mpu/datasets.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <sstream>

#include "misc/env.h"
#include "mpu/defaults.h"

namespace mpu::datasets {
namespace {

// A corrupt header must not make us allocate without bound.
constexpr std::uint64_t kMaxIdxBytes = std::uint64_t{1} << 34;

// Reads a file through zlib's inflate when it starts with the gzip magic bytes, and as it is
// otherwise. gzread is not used: when a read ends exactly where the input ends, it does not
// notice a missing gzip trailer (zlib 1.2.13), and a truncated file must not load.
class Source {
 public:
  explicit Source(const std::string& path) : file_(std::fopen(path.c_str(), "rb")) {
    if (file_ == nullptr) return;
    in_.resize(std::size_t{1} << 17);
    have_ = std::fread(in_.data(), 1, in_.size(), file_);
    gzip_ = have_ >= 2 && in_[0] == 0x1f && in_[1] == 0x8b;
    if (gzip_) {
      zs_.next_in = in_.data();
      zs_.avail_in = static_cast<uInt>(have_);
      inflating_ = inflateInit2(&zs_, 15 + 16) == Z_OK;  // 15-bit window, gzip wrapper
    }
  }
  ~Source() {
    if (inflating_) inflateEnd(&zs_);
    if (file_ != nullptr) std::fclose(file_);
  }
  Source(const Source&) = delete;
  Source& operator=(const Source&) = delete;

  bool is_open() const noexcept { return file_ != nullptr && (!gzip_ || inflating_); }

  // Reads up to `n` bytes; returns how many were read, and sets `error` when the data is
  // damaged (bad deflate data, a CRC mismatch) or cut short.
  std::uint64_t read(void* out, std::uint64_t n, std::string& error) {
    auto* dst = static_cast<unsigned char*>(out);
    return gzip_ ? inflate_into(dst, n, error) : copy_into(dst, n, error);
  }

 private:
  std::uint64_t copy_into(unsigned char* dst, std::uint64_t n, std::string& error) {
    std::uint64_t done = std::min<std::uint64_t>(n, have_ - pos_);
    std::memcpy(dst, in_.data() + pos_, done);
    pos_ += done;
    if (done < n) done += std::fread(dst + done, 1, n - done, file_);
    if (std::ferror(file_)) error = std::strerror(errno);
    return done;
  }

  bool refill(std::string& error) {
    const std::size_t got = std::fread(in_.data(), 1, in_.size(), file_);
    if (got == 0) {
      if (std::ferror(file_)) error = std::strerror(errno);
      return false;
    }
    zs_.next_in = in_.data();
    zs_.avail_in = static_cast<uInt>(got);
    return true;
  }

  std::uint64_t inflate_into(unsigned char* dst, std::uint64_t n, std::string& error) {
    std::uint64_t done = 0;
    while (done < n && !ended_) {
      if (zs_.avail_in == 0 && !refill(error)) {
        if (error.empty()) error = "unexpected end of file: the gzip stream is cut short";
        break;
      }
      const auto chunk = static_cast<uInt>(std::min<std::uint64_t>(n - done, 1u << 30));
      zs_.next_out = dst + done;
      zs_.avail_out = chunk;
      const int ret = inflate(&zs_, Z_NO_FLUSH);
      done += chunk - zs_.avail_out;
      if (ret == Z_STREAM_END) {
        // gzip allows several members, one after the other.
        if (zs_.avail_in == 0 && !refill(error)) {
          ended_ = true;
        } else {
          inflateReset(&zs_);
        }
      } else if (ret != Z_OK && ret != Z_BUF_ERROR) {
        error = zs_.msg != nullptr ? zs_.msg : detail::cat("zlib inflate error ", ret);
        break;
      }
    }
    return done;
  }

  std::FILE* file_;
  std::vector<unsigned char> in_;
  std::size_t have_ = 0;  // bytes in in_ from the first read
  std::size_t pos_ = 0;   // next byte of in_ to copy, for plain files
  bool gzip_ = false;
  bool inflating_ = false;
  bool ended_ = false;
  z_stream zs_{};
};

struct IdxType {
  torch::ScalarType dtype;
  int bytes;
};

bool idx_type(unsigned char code, IdxType& type) {
  switch (code) {
    case 0x08:
      type = {torch::kUInt8, 1};
      return true;
    case 0x09:
      type = {torch::kInt8, 1};
      return true;
    case 0x0B:
      type = {torch::kInt16, 2};
      return true;
    case 0x0C:
      type = {torch::kInt32, 4};
      return true;
    case 0x0D:
      type = {torch::kFloat32, 4};
      return true;
    case 0x0E:
      type = {torch::kFloat64, 8};
      return true;
    default:
      return false;
  }
}

// The error says which file and what was wrong with it; `context` names the caller.
[[noreturn]] void corrupt(const std::string& context, const std::string& path,
                          const std::string& detail, const std::string& hint) {
  MPU_THROW(Error, context, ": ", path, " is corrupt or truncated: ", detail,
            hint.empty() ? "" : " (", hint, hint.empty() ? "" : ")");
}

torch::Tensor read_idx_file(const std::string& path, const std::string& context,
                            const std::string& hint) {
  Source source(path);
  if (!source.is_open()) {
    MPU_THROW(Error, context, ": cannot open ", path, ": ", std::strerror(errno),
              hint.empty() ? "" : " (", hint, hint.empty() ? "" : ")");
  }
  std::string error;
  std::array<unsigned char, 4> magic{};
  if (source.read(magic.data(), magic.size(), error) != magic.size()) {
    corrupt(context, path, error.empty() ? "it ends before the 4-byte idx magic number" : error,
            hint);
  }
  IdxType type{};
  if (magic[0] != 0 || magic[1] != 0 || !idx_type(magic[2], type) || magic[3] == 0) {
    std::ostringstream os;
    os << "its magic number is " << std::hex << std::showbase << static_cast<int>(magic[0]) << ' '
       << static_cast<int>(magic[1]) << ' ' << static_cast<int>(magic[2]) << ' '
       << static_cast<int>(magic[3])
       << "; an idx file starts with 0 0, a type code (0x8 for uint8) and its number of dims";
    corrupt(context, path, os.str(), hint);
  }
  const int ndims = magic[3];
  std::vector<unsigned char> header(static_cast<std::size_t>(4 * ndims));
  if (source.read(header.data(), header.size(), error) != header.size()) {
    corrupt(context, path,
            error.empty() ? detail::cat("it ends inside the header of ", ndims, " dims") : error,
            hint);
  }
  std::vector<std::int64_t> dims(static_cast<std::size_t>(ndims));
  std::uint64_t count = 1;
  for (int d = 0; d < ndims; ++d) {
    const unsigned char* p = header.data() + 4 * d;
    const std::uint64_t dim = (std::uint64_t{p[0]} << 24) | (std::uint64_t{p[1]} << 16) |
                              (std::uint64_t{p[2]} << 8) | std::uint64_t{p[3]};
    dims[static_cast<std::size_t>(d)] = static_cast<std::int64_t>(dim);
    if (dim != 0 && count > kMaxIdxBytes / dim)
      count = kMaxIdxBytes + 1;  // no overflow
    else
      count *= dim;
    if (count * static_cast<std::uint64_t>(type.bytes) > kMaxIdxBytes) {
      corrupt(context, path,
              detail::cat("its header gives an implausible size (dim ", d, " = ", dim, ")"), hint);
    }
  }
  const std::uint64_t nbytes = count * static_cast<std::uint64_t>(type.bytes);
  torch::Tensor out = torch::empty(dims, torch::TensorOptions().dtype(type.dtype));
  auto* bytes = static_cast<unsigned char*>(out.data_ptr());
  const std::uint64_t got = source.read(bytes, nbytes, error);
  if (got != nbytes) {
    corrupt(context, path,
            detail::cat(error.empty() ? "" : error + ": ", "got ", got, " of the ", nbytes,
                        " data bytes its header announces"),
            hint);
  }
  // One more read finds trailing data, and makes zlib check the gzip trailer (CRC and length).
  unsigned char extra = 0;
  if (source.read(&extra, 1, error) != 0 || !error.empty()) {
    corrupt(context, path,
            error.empty()
                ? detail::cat("it has data beyond the ", nbytes, " bytes its header announces")
                : error,
            hint);
  }
  if (type.bytes > 1) {
    // idx stores multi-byte values big-endian.
    for (std::uint64_t i = 0; i < count; ++i) {
      std::reverse(bytes + i * type.bytes, bytes + (i + 1) * type.bytes);
    }
  }
  return out;
}

std::string env_or(const char* name, const std::string& fallback) {
  return detail::env_text(name).value_or(fallback);
}

struct Format {
  const char* name;  // for messages
  const char* hint;  // how to get the files
};

std::shared_ptr<const ImageDataset> load_mnist_format(const Format& format, Split split,
                                                      const std::string& dir) {
  namespace fs = std::filesystem;
  const char* images_file = split == Split::Train ? kTrainImagesFile : kTestImagesFile;
  const char* labels_file = split == Split::Train ? kTrainLabelsFile : kTestLabelsFile;
  for (const char* file : {images_file, labels_file}) {
    std::error_code ec;
    if (!fs::is_regular_file(fs::path(dir) / file, ec)) {
      const bool no_dir = !fs::is_directory(dir, ec);
      MPU_THROW(Error, format.name, ": ", dir, no_dir ? " does not exist" : " has no ",
                no_dir ? "" : file, "; expected ", images_file, ", ", labels_file,
                " in that directory (", format.hint, ")");
    }
  }
  const std::string images_path = (fs::path(dir) / images_file).string();
  const std::string labels_path = (fs::path(dir) / labels_file).string();
  torch::Tensor images = read_idx_file(images_path, format.name, format.hint);
  torch::Tensor labels = read_idx_file(labels_path, format.name, format.hint);
  if (images.scalar_type() != torch::kUInt8 || images.dim() != 3) {
    corrupt(format.name, images_path,
            detail::cat("it holds ", images.scalar_type(), " of ", images.dim(),
                        " dims; images are uint8 [N, H, W]"),
            format.hint);
  }
  if (labels.scalar_type() != torch::kUInt8 || labels.dim() != 1) {
    corrupt(format.name, labels_path,
            detail::cat("it holds ", labels.scalar_type(), " of ", labels.dim(),
                        " dims; labels are uint8 [N]"),
            format.hint);
  }
  if (images.size(0) != labels.size(0)) {
    corrupt(format.name, labels_path,
            detail::cat("it has ", labels.size(0), " labels for the ", images.size(0),
                        " images of ", images_path),
            format.hint);
  }
  constexpr int kClasses = 10;
  const int max_label = labels.numel() > 0 ? labels.max().item<int>() : 0;
  if (max_label >= kClasses) {
    corrupt(format.name, labels_path,
            detail::cat("it has label ", max_label, "; the ", kClasses, " classes are 0..",
                        kClasses - 1),
            format.hint);
  }
  return std::make_shared<ImageDataset>(std::move(images), std::move(labels));
}

}  // namespace

std::string fashion_mnist_dir() {
  return env_or(kEnvFashionMnistDir, kDefaultFashionMnistDir);
}

torch::Tensor read_idx(const std::string& path) {
  return read_idx_file(path, "read_idx", "");
}

std::shared_ptr<const ImageDataset> FashionMNIST(Split split, const std::string& dir) {
  static const std::string hint =
      detail::cat("install Debian's dataset-fashion-mnist or set ", kEnvFashionMnistDir);
  return load_mnist_format({"Fashion-MNIST", hint.c_str()}, split,
                           dir.empty() ? fashion_mnist_dir() : dir);
}

std::shared_ptr<const ImageDataset> MNIST(Split split, const std::string& dir) {
  static const std::string hint =
      detail::cat("download MNIST into it, or pass another directory or set ", kEnvMnistDir);
  const std::string where = dir.empty() ? env_or(kEnvMnistDir, "") : dir;
  MPU_CHECK(!where.empty(), "MNIST: no directory given and ", kEnvMnistDir,
            " is not set; pass the directory that holds ", kTrainImagesFile,
            " and the other "
            "idx files, or set ",
            kEnvMnistDir);
  return load_mnist_format({"MNIST", hint.c_str()}, split, where);
}

// ------------------------------------------------------------------------------------------------
// ImageDataset

ImageDataset::ImageDataset(torch::Tensor images, torch::Tensor labels) {
  MPU_CHECK(images.defined() && labels.defined(), "ImageDataset: images or labels is undefined");
  MPU_CHECK(images.scalar_type() == torch::kUInt8, "ImageDataset: images have dtype ",
            images.scalar_type(), "; need uint8");
  MPU_CHECK(images.dim() == 3 || images.dim() == 4, "ImageDataset: images have ", images.dim(),
            " dims; need [N, H, W] or [N, C, H, W]");
  MPU_CHECK(labels.dim() == 1 && labels.size(0) == images.size(0), "ImageDataset: labels have ",
            "shape ", labels.sizes(), " for ", images.size(0), " images; need [N]");
  images_ = (images.dim() == 3 ? images.unsqueeze(1) : images).contiguous();
  labels_ = labels.to(torch::kInt64).contiguous();
}

Batch ImageDataset::do_get(std::int64_t index, std::int64_t /*epoch*/) const {
  return Batch{images_[index].to(torch::kFloat32).div_(255.0), labels_[index]};
}

Batch ImageDataset::do_get_batch(const std::vector<std::int64_t>& indices,
                                 const std::vector<std::int64_t>& /*epochs*/) const {
  auto index = torch::tensor(indices, torch::kInt64);
  return Batch{images_.index_select(0, index).to(torch::kFloat32).div_(255.0),
               labels_.index_select(0, index)};
}

// ------------------------------------------------------------------------------------------------
// Transforms

Transform::Transform(std::string name, Fn fn) : name_(std::move(name)), fn_(std::move(fn)) {
  MPU_CHECK(static_cast<bool>(fn_), "Transform \"", name_, "\": the function is empty");
}

namespace {

std::string join(const std::vector<double>& values) {
  std::ostringstream os;
  for (std::size_t i = 0; i < values.size(); ++i) os << (i ? ", " : "") << values[i];
  return os.str();
}

}  // namespace

Normalize::Normalize(std::vector<double> mean, std::vector<double> stddev)
    : Transform(
          "Normalize({" + join(mean) + "}, {" + join(stddev) + "})",
          [mean, stddev](const torch::Tensor& data, Rng& /*rng*/) {
            MPU_CHECK(data.is_floating_point(), "Normalize: data has dtype ", data.scalar_type(),
                      "; needs a floating type (images from mpu::datasets are float in [0, 1])");
            if (mean.size() == 1) return (data - mean[0]) / stddev[0];
            MPU_CHECK(data.dim() >= 1 && data.size(0) == static_cast<std::int64_t>(mean.size()),
                      "Normalize: data of shape ", data.sizes(), " has ",
                      data.dim() >= 1 ? data.size(0) : 0, " channels (dim 0), but ", mean.size(),
                      " means and stds were given");
            std::vector<std::int64_t> shape(static_cast<std::size_t>(data.dim()), 1);
            shape[0] = data.size(0);
            const auto options = torch::TensorOptions().dtype(data.scalar_type());
            auto m = torch::tensor(mean, torch::kFloat64).to(options).view(shape);
            auto s = torch::tensor(stddev, torch::kFloat64).to(options).view(shape);
            return (data - m) / s;
          }) {
  MPU_CHECK(!mean.empty() && mean.size() == stddev.size(), "Normalize: ", mean.size(),
            " means and ", stddev.size(), " stds; need the same non-zero number");
  for (std::size_t c = 0; c < stddev.size(); ++c) {
    MPU_CHECK(stddev[c] > 0, "Normalize: std[", c, "] = ", stddev[c], "; needs to be positive");
  }
}

RandomCrop::RandomCrop(std::int64_t size, std::int64_t padding)
    : Transform(
          detail::cat("RandomCrop(", size, ", padding ", padding, ")"),
          [size, padding](const torch::Tensor& data, Rng& rng) {
            MPU_CHECK(data.dim() >= 2, "RandomCrop: data of shape ", data.sizes(),
                      " has no [H, W]");
            const std::int64_t h = data.size(-2) + 2 * padding;
            const std::int64_t w = data.size(-1) + 2 * padding;
            MPU_CHECK(size <= h && size <= w, "RandomCrop: a ", size, "x", size,
                      " window does not fit data of shape ", data.sizes(), " padded by ", padding);
            const auto top = static_cast<std::int64_t>(
                uniform_below(rng, static_cast<std::uint64_t>(h - size + 1)));
            const auto left = static_cast<std::int64_t>(
                uniform_below(rng, static_cast<std::uint64_t>(w - size + 1)));
            const torch::Tensor padded =
                padding > 0 ? torch::constant_pad_nd(data, {padding, padding, padding, padding}, 0)
                            : data;
            return padded.narrow(-2, top, size).narrow(-1, left, size);
          }) {
  MPU_CHECK(size >= 1 && padding >= 0, "RandomCrop: size ", size, " and padding ", padding,
            "; need size >= 1 and padding >= 0");
}

RandomHorizontalFlip::RandomHorizontalFlip(double p)
    : Transform(detail::cat("RandomHorizontalFlip(", p, ")"),
                [threshold = static_cast<std::uint64_t>(p * 4294967296.0)](
                    const torch::Tensor& data, Rng& rng) {
                  MPU_CHECK(data.dim() >= 1, "RandomHorizontalFlip: data is a scalar");
                  const std::uint64_t draw = rng() >> 32;
                  return draw < threshold ? data.flip({-1}) : data;
                }) {
  MPU_CHECK(p >= 0 && p <= 1, "RandomHorizontalFlip: p = ", p, "; needs to be in [0, 1]");
}

TransformedDataset::TransformedDataset(DatasetPtr base, std::vector<Transform> transforms,
                                       std::uint64_t seed)
    : base_(std::move(base)), transforms_(std::move(transforms)), seed_(seed) {
  MPU_CHECK(base_ != nullptr, "TransformedDataset: the base dataset is null");
}

torch::Tensor TransformedDataset::apply(torch::Tensor data, std::int64_t index,
                                        std::int64_t epoch) const {
  Rng rng(derive_seed(seed_, static_cast<std::uint64_t>(epoch), static_cast<std::uint64_t>(index)));
  for (const Transform& t : transforms_) data = t(data, rng);
  return data;
}

Batch TransformedDataset::do_get(std::int64_t index, std::int64_t epoch) const {
  Batch example = base_->get(index, epoch);
  example.data = apply(std::move(example.data), index, epoch);
  return example;
}

Batch TransformedDataset::do_get_batch(const std::vector<std::int64_t>& indices,
                                       const std::vector<std::int64_t>& epochs) const {
  Batch batch = base_->get_batch(indices, epochs);
  if (transforms_.empty()) return batch;
  std::vector<torch::Tensor> data;
  data.reserve(indices.size());
  for (std::size_t i = 0; i < indices.size(); ++i) {
    data.push_back(apply(batch.data[static_cast<std::int64_t>(i)], indices[i], epochs[i]));
  }
  batch.data = torch::stack(data);
  return batch;
}

DatasetPtr transform(DatasetPtr base, std::vector<Transform> transforms, std::uint64_t seed) {
  return std::make_shared<TransformedDataset>(std::move(base), std::move(transforms), seed);
}

}  // namespace mpu::datasets
