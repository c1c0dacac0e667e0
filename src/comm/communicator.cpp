// The backend-independent part of the communicators: argument checks, sharding, the timeout
// setting, the store rendezvous of the NCCL unique id, and the factories' dispatch.
#include "mpu/communicator.h"

#include <c10/util/Exception.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "comm/communicator_detail.h"
#include "misc/env.h"
#include "mpu/error.h"

namespace mpu {

Communicator::~Communicator() = default;

// Synchronous backends: the result is there when the call returns, so deferring the join changes
// nothing. A backend that overrides none of these still orders correctly: synchronize() waits
// on the host for more than join() promises.
void Communicator::allreduce_async(torch::Tensor& t, ReduceOp op) {
  allreduce(t, op);
}

void Communicator::reduce_async(torch::Tensor& t, int root, ReduceOp op) {
  reduce(t, root, op);
}

void Communicator::join() {
  synchronize();
}

namespace {

// A uint8 tensor on `device` holding `bytes`.
torch::Tensor bytes_tensor(const std::string& bytes, const torch::Device& device) {
  torch::Tensor host = torch::empty({static_cast<std::int64_t>(bytes.size())}, torch::kByte);
  if (!bytes.empty()) std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  return host.to(device);
}

// The bytes of a uint8 tensor, copied to the host.
std::string tensor_bytes(const torch::Tensor& t) {
  const torch::Tensor host = t.to(torch::kCPU).contiguous();
  return std::string(static_cast<const char*>(host.data_ptr()),
                     static_cast<std::size_t>(host.numel()));
}

}  // namespace

std::string Communicator::broadcast_bytes(const std::string& bytes, int root) {
  detail::check_root("broadcast_bytes", root, size());
  const bool is_root = rank() == root;
  torch::Tensor length =
      torch::full({1}, is_root ? static_cast<std::int64_t>(bytes.size()) : std::int64_t{0},
                  torch::TensorOptions().dtype(torch::kLong).device(device()));
  broadcast(length, root);
  const std::int64_t count = length.cpu().item<std::int64_t>();
  MPU_CHECK(count >= 0, "broadcast_bytes: root ", root, " sent a negative length ", count);
  torch::Tensor data =
      is_root ? bytes_tensor(bytes, device())
              : torch::empty({count}, torch::TensorOptions().dtype(torch::kByte).device(device()));
  broadcast(data, root);
  return is_root ? bytes : tensor_bytes(data);
}

std::vector<std::string> Communicator::allgather_bytes(const std::string& mine) {
  const int n = size();
  const auto on_device = torch::TensorOptions().device(device());
  torch::Tensor my_length =
      torch::full({1}, static_cast<std::int64_t>(mine.size()), on_device.dtype(torch::kLong));
  torch::Tensor lengths = torch::empty({n}, on_device.dtype(torch::kLong));
  allgather(lengths, my_length);
  const torch::Tensor host_lengths = lengths.cpu();
  const auto* length_of = host_lengths.data_ptr<std::int64_t>();
  const std::int64_t longest = *std::max_element(length_of, length_of + n);
  // Every rank sends `longest` bytes, so that the shards are equal and nobody needs padding.
  std::string padded = mine;
  padded.resize(static_cast<std::size_t>(longest), '\0');
  torch::Tensor in = bytes_tensor(padded, device());
  torch::Tensor out = torch::empty({longest * n}, on_device.dtype(torch::kByte));
  allgather(out, in);
  const std::string all = tensor_bytes(out);
  std::vector<std::string> result;
  result.reserve(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) {
    MPU_CHECK(length_of[r] >= 0 && length_of[r] <= longest, "allgather_bytes: rank ", r,
              " sent a length of ", length_of[r], " bytes");
    result.push_back(
        all.substr(static_cast<std::size_t>(r * longest), static_cast<std::size_t>(length_of[r])));
  }
  return result;
}

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
  }
  return "unknown";
}

std::int64_t shard_offset(std::int64_t numel, int size, int rank) {
  MPU_CHECK(size > 0 && rank >= 0 && rank < size, "shard_offset: rank ", rank, " of ", size,
            " ranks is out of range");
  MPU_CHECK(numel >= 0, "shard_offset: negative numel ", numel);
  const std::int64_t chunk = (numel + size - 1) / size;
  return std::min(chunk * rank, numel);
}

std::int64_t shard_numel(std::int64_t numel, int size, int rank) {
  const std::int64_t offset = shard_offset(numel, size, rank);
  const std::int64_t chunk = (numel + size - 1) / size;
  return std::min(chunk, numel - offset);
}

std::int64_t Communicator::shard_offset(std::int64_t numel) const {
  return mpu::shard_offset(numel, size(), rank());
}

std::int64_t Communicator::shard_numel(std::int64_t numel) const {
  return mpu::shard_numel(numel, size(), rank());
}

std::chrono::milliseconds comm_timeout() {
  return detail::env_seconds(kEnvCommTimeout).value_or(kDefaultCommTimeout);
}

std::shared_ptr<Communicator> make_communicator(const torch::Device& device, const StorePtr& store,
                                                int rank, int size,
                                                std::chrono::milliseconds timeout) {
  if (device.is_cuda()) {
    MPU_CHECK(device.has_index(), "make_communicator: CUDA device ", device.str(),
              " has no index; pass cuda:<n>");
    return make_nccl_communicator(store, rank, size, device.index(), timeout);
  }
  MPU_CHECK(device.is_cpu(), "make_communicator: no backend for device ", device.str(),
            "; NCCL serves CUDA devices and Gloo the CPU");
  return make_gloo_communicator(store, rank, size, timeout);
}

std::shared_ptr<Communicator> make_nccl_communicator(const StorePtr& store, int rank, int size,
                                                     int device_index,
                                                     std::chrono::milliseconds timeout) {
#if MPU_HAS_NCCL
  MPU_CHECK(store, "make_nccl_communicator: the store is null");
  MPU_CHECK(size > 0 && rank >= 0 && rank < size, "make_nccl_communicator: rank ", rank, " of ",
            size, " ranks is out of range");
  const std::string key = detail::next_comm_prefix() + "nccl_unique_id";
  NcclUniqueId id{};
  try {
    if (rank == 0) {
      id = nccl_unique_id();
      store->set(key, std::vector<std::uint8_t>(id.begin(), id.end()));
    } else {
      store->wait({key}, timeout);
      const std::vector<std::uint8_t> bytes = store->get(key);
      MPU_CHECK(bytes.size() == id.size(), "make_nccl_communicator: the store holds ", bytes.size(),
                " bytes under \"", key, "\", expected an NCCL unique id of ", id.size());
      std::copy(bytes.begin(), bytes.end(), id.begin());
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    MPU_THROW(Timeout, "make_nccl_communicator: rank ", rank, " of ", size,
              " could not share the NCCL unique id through the store (key \"", key, "\") within ",
              detail::seconds_text(timeout), ": ", detail::exception_text(e));
  }
  return make_nccl_communicator(id, rank, size, device_index, timeout);
#else
  (void)store;
  (void)rank;
  (void)size;
  (void)device_index;
  (void)timeout;
  MPU_THROW(InvalidArgument,
            "make_nccl_communicator: this build of torch-mpu has no NCCL (configured with a "
            "CPU-only LibTorch or MPU_WITH_NCCL=OFF); use a CPU device and Gloo");
#endif
}

#if !MPU_HAS_NCCL
NcclUniqueId nccl_unique_id() {
  MPU_THROW(InvalidArgument, "nccl_unique_id: this build of torch-mpu has no NCCL");
}

std::shared_ptr<Communicator> make_nccl_communicator(const NcclUniqueId&, int, int, int,
                                                     std::chrono::milliseconds) {
  MPU_THROW(InvalidArgument,
            "make_nccl_communicator: this build of torch-mpu has no NCCL (configured with a "
            "CPU-only LibTorch or MPU_WITH_NCCL=OFF); use a CPU device and Gloo");
}
#endif

#if !MPU_HAS_GLOO
std::shared_ptr<Communicator> make_gloo_communicator(const StorePtr&, int, int,
                                                     std::chrono::milliseconds) {
  MPU_THROW(InvalidArgument,
            "make_gloo_communicator: this build of torch-mpu has no Gloo (the gloo headers "
            "were not found at configure time; install libgloo-dev)");
}
#endif

namespace detail {

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
      return "float32";
    case torch::kHalf:
      return "float16";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kDouble:
      return "float64";
    case torch::kInt:
      return "int32";
    case torch::kLong:
      return "int64";
    case torch::kByte:
      return "uint8";
    default:
      return c10::toString(dtype);
  }
}

bool is_collective_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
    case torch::kHalf:
    case torch::kBFloat16:
    case torch::kDouble:
    case torch::kInt:
    case torch::kLong:
    case torch::kByte:
      return true;
    default:
      return false;
  }
}

std::string describe(const torch::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream os;
  os << dtype_name(t.scalar_type()) << t.sizes() << " on " << t.device().str();
  return os.str();
}

std::string seconds_text(std::chrono::milliseconds d) {
  std::ostringstream os;
  os << static_cast<double>(d.count()) / 1000.0 << " s";
  return os.str();
}

void check_tensor(const char* op, const char* arg, const torch::Tensor& t,
                  const torch::Device& device) {
  MPU_CHECK(t.defined(), op, ": argument `", arg, "` is an undefined tensor");
  const auto dtype = t.scalar_type();
  MPU_CHECK(is_collective_dtype(dtype), op, ": argument `", arg, "` is ", describe(t),
            "; the communicator takes float32, float16, bfloat16, float64, int32, int64 or uint8");
  MPU_CHECK(t.device() == device, op, ": argument `", arg, "` is ", describe(t),
            ", but the communicator's device is ", device.str());
  MPU_CHECK(t.is_contiguous(), op, ": argument `", arg, "` is ", describe(t), " with strides ",
            t.strides(), "; it must be contiguous (call .contiguous() and copy the result back)");
}

void check_reduce_op(const char* op, ReduceOp reduce_op, const torch::Tensor& t) {
  // An undefined tensor is left to check_tensor's message.
  MPU_CHECK(reduce_op != ReduceOp::kAvg || !t.defined() || c10::isFloatingType(t.scalar_type()), op,
            ": argument `op` is avg, but the tensor is ", describe(t),
            "; avg takes floating dtypes only (float32, float16, bfloat16, float64), since an "
            "integer average would round; use sum");
}

void check_root(const char* op, int root, int size) {
  MPU_CHECK(root >= 0 && root < size, op, ": root ", root, " is not a rank of this ", size,
            "-rank communicator");
}

bool overlaps(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  const auto* a1 = a0 + a.numel() * a.element_size();
  const auto* b1 = b0 + b.numel() * b.element_size();
  return a0 < b1 && b0 < a1;
}

namespace {

// True when `part` starts exactly at element `offset` of `whole`.
bool is_shard_of(const torch::Tensor& part, const torch::Tensor& whole, std::int64_t offset) {
  return static_cast<const char*>(part.data_ptr()) ==
         static_cast<const char*>(whole.data_ptr()) + offset * whole.element_size();
}

}  // namespace

void check_reduce_scatter(const Communicator& comm, const torch::Tensor& out,
                          const torch::Tensor& in, ReduceOp reduce_op) {
  check_tensor("reduce_scatter", "in", in, comm.device());
  check_tensor("reduce_scatter", "out", out, comm.device());
  MPU_CHECK(out.scalar_type() == in.scalar_type(), "reduce_scatter: `out` is ", describe(out),
            " but `in` is ", describe(in), "; their dtypes must match");
  check_reduce_op("reduce_scatter", reduce_op, in);
  const std::int64_t expected = comm.shard_numel(in.numel());
  MPU_CHECK(out.numel() == expected, "reduce_scatter: `out` has ", out.numel(),
            " elements, but rank ", comm.rank(), " of ", comm.size(), " owns ", expected,
            " of the ", in.numel(), " elements of `in` (see shard_numel)");
  MPU_CHECK(!overlaps(out, in) || is_shard_of(out, in, comm.shard_offset(in.numel())),
            "reduce_scatter: `out` overlaps `in` without being exactly rank ", comm.rank(),
            "'s shard of it (element offset ", comm.shard_offset(in.numel()), ")");
}

void check_allgather(const Communicator& comm, const torch::Tensor& out, const torch::Tensor& in) {
  check_tensor("allgather", "in", in, comm.device());
  check_tensor("allgather", "out", out, comm.device());
  MPU_CHECK(out.scalar_type() == in.scalar_type(), "allgather: `out` is ", describe(out),
            " but `in` is ", describe(in), "; their dtypes must match");
  const std::int64_t expected = comm.shard_numel(out.numel());
  MPU_CHECK(in.numel() == expected, "allgather: `in` has ", in.numel(), " elements, but rank ",
            comm.rank(), " of ", comm.size(), " owns ", expected, " of the ", out.numel(),
            " elements of `out` (see shard_numel)");
  MPU_CHECK(!overlaps(out, in) || is_shard_of(in, out, comm.shard_offset(out.numel())),
            "allgather: `in` overlaps `out` without being exactly rank ", comm.rank(),
            "'s shard of it (element offset ", comm.shard_offset(out.numel()), ")");
}

std::string next_comm_prefix() {
  static std::atomic<std::uint64_t> counter{0};
  return cat("mpu/comm/", counter.fetch_add(1), "/");
}

void ignore_sigpipe() {
  struct sigaction current {};
  if (::sigaction(SIGPIPE, nullptr, &current) != 0) return;
  if (current.sa_handler == SIG_DFL && (current.sa_flags & SA_SIGINFO) == 0) {
    ::signal(SIGPIPE, SIG_IGN);
  }
}

std::string exception_text(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

std::string current_exception_text() {
  try {
    throw;
  } catch (const std::exception& e) {
    return exception_text(e);
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

}  // namespace detail
}  // namespace mpu
