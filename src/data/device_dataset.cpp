#include <ATen/Parallel.h>

#include <algorithm>
#include <iomanip>
#include <mutex>
#include <sstream>
#include <tuple>

#include "cuda/augment_draw.h"
#include "data/device_dataset_impl.h"
#include "misc/log.h"
#include "mpu/datasets.h"
#include "mpu/device_data.h"

namespace mpu {
namespace detail {

void fill_order_keys(torch::Tensor& out, std::uint64_t base) {
#if MPU_HAS_CUDA
  if (out.is_cuda()) {
    fill_order_keys_cuda(out, base);
    return;
  }
#endif
  std::int64_t* p = out.data_ptr<std::int64_t>();
  const std::int64_t n = out.numel();
  for (std::int64_t i = 0; i < n; ++i) p[i] = kernels::order_key(base, i);
}

void augment_into(const AugmentSpec& spec, const torch::Tensor& images,
                  const torch::Tensor& indices, const torch::Tensor& epochs,
                  const torch::Tensor& keys, torch::Tensor& out) {
#if MPU_HAS_CUDA
  if (out.is_cuda()) {
    augment_into_cuda(spec, images, indices, epochs, keys, out);
    return;
  }
#endif
  const std::uint8_t* src = images.data_ptr<std::uint8_t>();
  const std::int64_t* idx = indices.data_ptr<std::int64_t>();
  const std::int64_t* ep = epochs.data_ptr<std::int64_t>();
  const std::int64_t* key = keys.data_ptr<std::int64_t>();
  float* dst = out.data_ptr<float>();
  const std::int64_t h = spec.height;
  const std::int64_t w = spec.width;
  const std::int64_t plane = h * w;
  const std::int64_t per_image = plane * spec.channels;
  at::parallel_for(0, out.size(0), 1, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t b = first; b < last; ++b) {
      const std::int64_t row = idx[b];
      const kernels::AugmentDraw d = kernels::augment_draw(
          kernels::derive_from_mix(spec.seed_mix, static_cast<std::uint64_t>(ep[b]),
                                   static_cast<std::uint64_t>(key[row])),
          spec.padding, spec.flip);
      for (std::int64_t c = 0; c < spec.channels; ++c) {
        for (std::int64_t y = 0; y < h; ++y) {
          for (std::int64_t x = 0; x < w; ++x) {
            const std::int64_t sy = y + d.dy - spec.padding;
            const std::int64_t sx = (d.flip ? w - 1 - x : x) + d.dx - spec.padding;
            float v = 0.0f;
            if (sy >= 0 && sy < h && sx >= 0 && sx < w) {
              v = static_cast<float>(src[row * per_image + c * plane + sy * w + sx]) / 255.0f;
            }
            dst[b * per_image + c * plane + y * w + x] = (v - spec.mean[c]) / spec.stddev[c];
          }
        }
      }
    }
  });
}

}  // namespace detail

torch::Tensor device_epoch_order(std::int64_t n, std::uint64_t seed, std::int64_t epoch,
                                 bool shuffle, const torch::Device& device) {
  MPU_CHECK(n >= 0, "device_epoch_order: n = ", n, " is negative");
  MPU_CHECK(epoch >= 0, "device_epoch_order: epoch = ", epoch, " is negative");
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
  if (!shuffle) return torch::arange(n, opts);
  torch::Tensor keys = torch::empty({n}, opts);
  detail::fill_order_keys(
      keys, derive_seed(seed, static_cast<std::uint64_t>(epoch), kernels::kOrderStream));
  return std::get<1>(keys.sort());
}

namespace datasets {
namespace {

constexpr const char* kWho = "DeviceImageDataset";

[[maybe_unused]] std::string gib(std::int64_t bytes) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(2) << static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0)
    << " GiB";
  return s.str();
}

// The ImageDataset under `source` and the index into it of each of source's examples (empty:
// all of them, in order).
std::pair<const ImageDataset*, std::vector<std::int64_t>> unwrap(const DatasetPtr& source) {
  MPU_CHECK(source != nullptr, kWho, ": the source dataset is null");
  const Dataset* d = source.get();
  std::vector<std::int64_t> map;
  bool mapped = false;
  while (const auto* subset = dynamic_cast<const SubsetDataset*>(d)) {
    const auto& inner = subset->indices();
    if (!mapped) {
      map = inner;
      mapped = true;
    } else {
      for (auto& i : map) i = inner[static_cast<std::size_t>(i)];
    }
    d = subset->base().get();
  }
  const auto* images = dynamic_cast<const ImageDataset*>(d);
  MPU_CHECK(images != nullptr, kWho,
            ": the source must be an ImageDataset (such as datasets::FashionMNIST) or "
            "SubsetDatasets over one (shards); got a ",
            dynamic_cast<const TransformedDataset*>(d) != nullptr
                ? "TransformedDataset: give the untransformed dataset and put the augmentation "
                  "in DeviceDataOptions::augment"
                : "dataset of another kind");
  if (!mapped) map.clear();
  return {images, std::move(map)};
}

std::vector<double> per_channel(const std::vector<double>& v, std::int64_t channels,
                                const char* name) {
  MPU_CHECK(v.size() == 1 || static_cast<std::int64_t>(v.size()) == channels, kWho,
            ": DeviceAugment::", name, " has ", v.size(), " values for images of ", channels,
            " channel(s); give one, or one per channel");
  return v.size() == 1 ? std::vector<double>(static_cast<std::size_t>(channels), v[0]) : v;
}

}  // namespace

struct DeviceImageDataset::State {
  explicit State(DeviceDataOptions o) : options(std::move(o)) {}

  DeviceDataOptions options;
  detail::AugmentSpec spec;
  torch::Tensor host_images;  // uint8 [N, C, H, W]
  torch::Tensor host_labels;  // int64 [N]
  torch::Tensor host_keys;    // int64 [N]: index in the full dataset

  std::mutex mutex;
  bool ready = false;
  bool resident = false;
  torch::Tensor images, labels, keys;  // where the examples are kept
  // The two most recent orders: (seed, shuffle, epoch) -> order where the examples are kept.
  std::vector<std::tuple<std::uint64_t, bool, std::int64_t, torch::Tensor>> orders;

  std::int64_t bytes() const {
    return host_images.numel() + (host_labels.numel() + host_keys.numel()) * 8;
  }

  torch::Device where() const { return resident ? options.device() : torch::Device(torch::kCPU); }

  // At the first batch, in the process that serves it: upload, or keep in host memory.
  void ensure() {
    if (ready) return;
    const torch::Device device = options.device();
    resident = device.is_cpu();
    if (device.is_cuda() && options.placement() != Placement::kHost) {
#if MPU_HAS_CUDA
      const std::int64_t free = detail::free_device_bytes(device);
      const bool fits =
          static_cast<double>(bytes()) <= options.memory_fraction() * static_cast<double>(free);
      MPU_CHECK(fits || options.placement() != Placement::kDevice, kWho, ": the ",
                host_images.size(0), " examples take ", gib(bytes()), ", more than ",
                options.memory_fraction(), " (DeviceDataOptions::memory_fraction) of the ",
                gib(free), " free on ", device,
                " (Placement::kDevice); raise memory_fraction, shard the dataset over more "
                "devices, or use Placement::kAuto to fall back to host memory");
      if (fits) {
        images = host_images.to(device);
        labels = host_labels.to(device);
        keys = host_keys.to(device);
        resident = true;
      } else {
        MPU_LOG_WARN(kWho, ": the ", host_images.size(0), " examples take ", gib(bytes()),
                     ", more than ", options.memory_fraction(), " of the ", gib(free), " free on ",
                     device,
                     "; batches are gathered and augmented in host memory instead and copied "
                     "(Placement::kDevice makes this an error)");
      }
#endif
    }
    if (!resident || device.is_cpu()) {
      images = host_images;
      labels = host_labels;
      keys = host_keys;
    }
    ready = true;
  }

  const torch::Tensor& order(std::uint64_t seed, bool shuffle, std::int64_t epoch) {
    for (const auto& [s, sh, e, t] : orders) {
      if (s == seed && sh == shuffle && e == epoch) return t;
    }
    if (orders.size() >= 2) orders.erase(orders.begin());
    orders.emplace_back(seed, shuffle, epoch,
                        device_epoch_order(host_images.size(0), seed, epoch, shuffle, where()));
    return std::get<3>(orders.back());
  }

  // The batch of rows `indices` served in `epochs` (int64 tensors where the examples are).
  Batch make(const torch::Tensor& indices, const torch::Tensor& epochs) const {
    const auto sizes = host_images.sizes();
    torch::Tensor out = torch::empty({indices.numel(), sizes[1], sizes[2], sizes[3]},
                                     torch::TensorOptions().dtype(torch::kFloat).device(where()));
    detail::augment_into(spec, images, indices, epochs, keys, out);
    torch::Tensor target = labels.index_select(0, indices);
    if (!resident) {
      // Host memory, for a CUDA device: pinned, so that the copies do not wait for the device.
      out = out.pin_memory().to(options.device(), /*non_blocking=*/true);
      target = target.pin_memory().to(options.device(), /*non_blocking=*/true);
    }
    return Batch{out, target};
  }
};

DeviceImageDataset::DeviceImageDataset(const DatasetPtr& source, DeviceDataOptions options)
    : state_(std::make_unique<State>(std::move(options))) {
  State& s = *state_;
  const DeviceDataOptions& o = s.options;
  MPU_CHECK(o.device().is_cpu() || o.device().is_cuda(), kWho, ": device ", o.device(),
            " is neither a CPU nor a CUDA device");
  MPU_CHECK(o.device().is_cpu() || MPU_HAS_CUDA, kWho, ": device ", o.device(),
            " asked for, but torch-mpu was built without CUDA");
  MPU_CHECK(o.memory_fraction() > 0.0 && o.memory_fraction() <= 1.0, kWho,
            ": DeviceDataOptions::memory_fraction = ", o.memory_fraction(), " is not in (0, 1]");
  auto [base, map] = unwrap(source);
  const torch::Tensor& all = base->images();
  MPU_CHECK(all.dim() == 4 && all.scalar_type() == torch::kByte, kWho,
            ": the images must be uint8 [N, C, H, W], got ", all.scalar_type(), " ", all.sizes());
  const std::int64_t c = all.size(1);
  const std::int64_t h = all.size(2);
  const std::int64_t w = all.size(3);
  MPU_CHECK(c >= 1 && c <= kernels::kAugmentMaxChannels, kWho, ": images of ", c,
            " channels; the augmentation handles 1 to ", kernels::kAugmentMaxChannels);
  const DeviceAugment& a = o.augment();
  MPU_CHECK(a.padding() >= 0 && a.padding() <= 0x7fff, kWho,
            ": DeviceAugment::padding = ", a.padding(), " is not in [0, 32767]");
  const auto mean = per_channel(a.mean(), c, "mean");
  const auto stddev = per_channel(a.stddev(), c, "stddev");
  for (std::size_t k = 0; k < stddev.size(); ++k) {
    MPU_CHECK(stddev[k] > 0.0, kWho, ": DeviceAugment::stddev[", k, "] = ", stddev[k],
              " is not positive");
  }
  s.spec.channels = static_cast<std::int32_t>(c);
  s.spec.height = static_cast<std::int32_t>(h);
  s.spec.width = static_cast<std::int32_t>(w);
  s.spec.padding = static_cast<std::int32_t>(a.padding());
  s.spec.flip = a.flip();
  s.spec.seed_mix = kernels::mix64(a.seed());
  for (std::int64_t k = 0; k < c; ++k) {
    s.spec.mean[k] = static_cast<float>(mean[static_cast<std::size_t>(k)]);
    s.spec.stddev[k] = static_cast<float>(stddev[static_cast<std::size_t>(k)]);
  }
  if (map.empty()) {
    s.host_images = all.contiguous();
    s.host_labels = base->labels().contiguous();
    s.host_keys = torch::arange(all.size(0), torch::kLong);
  } else {
    s.host_keys =
        torch::from_blob(map.data(), {static_cast<std::int64_t>(map.size())}, torch::kLong).clone();
    s.host_images = all.index_select(0, s.host_keys).contiguous();
    s.host_labels = base->labels().index_select(0, s.host_keys).contiguous();
  }
  MPU_CHECK(s.host_images.size(0) > 0, kWho, ": the source dataset is empty");
}

DeviceImageDataset::~DeviceImageDataset() = default;

std::int64_t DeviceImageDataset::size() const {
  return state_->host_images.size(0);
}

torch::Device DeviceImageDataset::device() const {
  return state_->options.device();
}

bool DeviceImageDataset::resident() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->ready && state_->resident;
}

std::int64_t DeviceImageDataset::bytes() const {
  return state_->bytes();
}

const DeviceDataOptions& DeviceImageDataset::options() const {
  return state_->options;
}

Batch DeviceImageDataset::gather_segments(const std::vector<OrderSegment>& segments,
                                          std::uint64_t seed, bool shuffle) const {
  State& s = *state_;
  MPU_CHECK(!segments.empty(), kWho, "::gather_segments: no segment");
  const std::int64_t n = size();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.ensure();
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(s.where());
  std::vector<torch::Tensor> indices;
  std::vector<torch::Tensor> epochs;
  for (const OrderSegment& seg : segments) {
    MPU_CHECK(seg.count > 0 && seg.start >= 0 && seg.start + seg.count <= n && seg.epoch >= 0, kWho,
              "::gather_segments: segment (epoch ", seg.epoch, ", start ", seg.start, ", count ",
              seg.count, ") is not within an epoch of ", n, " examples");
    indices.push_back(s.order(seed, shuffle, seg.epoch).narrow(0, seg.start, seg.count));
    epochs.push_back(torch::full({seg.count}, seg.epoch, opts));
  }
  return s.make(indices.size() == 1 ? indices[0] : torch::cat(indices),
                epochs.size() == 1 ? epochs[0] : torch::cat(epochs));
}

Batch DeviceImageDataset::do_get_batch(const std::vector<std::int64_t>& indices,
                                       const std::vector<std::int64_t>& epochs) const {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.ensure();
  auto host = [&](const std::vector<std::int64_t>& v) {
    torch::Tensor t = torch::from_blob(const_cast<std::int64_t*>(v.data()),
                                       {static_cast<std::int64_t>(v.size())}, torch::kLong)
                          .clone();
    return s.where().is_cpu() ? t : t.pin_memory().to(s.where(), /*non_blocking=*/true);
  };
  return s.make(host(indices), host(epochs));
}

Batch DeviceImageDataset::do_get(std::int64_t index, std::int64_t epoch) const {
  Batch b = do_get_batch({index}, {epoch});
  return Batch{b.data[0], b.target[0]};
}

std::vector<IteratorPtr> device_split_iterators(const DatasetPtr& dataset,
                                                const std::vector<torch::Device>& devices,
                                                const IteratorOptions& options,
                                                const DeviceDataOptions& data) {
  MPU_CHECK(!devices.empty(), "device_split_iterators: no device");
  const int n = static_cast<int>(devices.size());
  auto shards = split_dataset_n_random(dataset, n, options.seed());
  std::vector<IteratorPtr> iterators;
  iterators.reserve(shards.size());
  for (int i = 0; i < n; ++i) {
    DeviceDataOptions mine = data;
    mine.device(devices[static_cast<std::size_t>(i)]);
    IteratorOptions shard_options = options;
    shard_options.seed(derive_seed(options.seed(), static_cast<std::uint64_t>(i)));
    iterators.push_back(std::make_shared<Iterator>(
        std::make_shared<DeviceImageDataset>(shards[static_cast<std::size_t>(i)], mine),
        shard_options));
  }
  return iterators;
}

IteratorPtr device_shard_iterator(const DatasetPtr& dataset, int rank, int world,
                                  const IteratorOptions& options, const DeviceDataOptions& data) {
  IteratorOptions mine = options;
  mine.seed(derive_seed(options.seed(), static_cast<std::uint64_t>(rank)));
  return std::make_shared<Iterator>(std::make_shared<DeviceImageDataset>(
                                        shard_dataset(dataset, rank, world, options.seed()), data),
                                    mine);
}

}  // namespace datasets
}  // namespace mpu
