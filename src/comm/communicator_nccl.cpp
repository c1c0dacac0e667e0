// The NCCL communicator: NCCL called directly on the communicator's own CUDA stream, ordered
// against torch's current stream by events, watched by a thread that aborts it on a deadline.
//
// Who waits for whom, per collective (see communicator.h):
//   current stream --ready_--> comm stream: NCCL kernel --done--> current stream.
// The _async collectives leave out the second wait; join() records `joined_` on the comm stream
// and makes the current stream wait for it. The host returns once the waits are enqueued. The done
// events of the collectives in flight sit in `in_flight_`, oldest first. The watchdog thread wakes
// every kCommWatchdogInterval, pops the finished ones, and aborts the communicator when the oldest
// is older than the timeout or NCCL reports an asynchronous error. Every NCCL call on the
// communicator happens under `mutex_`, so an abort never races an enqueue.
//
// The communicator is non-blocking (ncclConfig_t::blocking = 0) unless MPU_NCCL_BLOCKING=1: then
// the rendezvous and a first collective whose connection setup waits for a peer return
// ncclInProgress, and the host polls them against the deadline instead of hanging in NCCL. From
// a blocking communicator ncclInProgress is an error.
//
// The comm stream comes from c10's stream pool rather than being created here: every tensor a
// collective uses is marked with record_stream() for the caching allocator, which records an
// event on that stream whenever such a tensor is freed, possibly after this communicator is
// gone. A pool stream lives as long as the process.
//
// The RAII owners of the handles live in nccl_handles.h, the bookkeeping of the collectives in
// flight in nccl_in_flight.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "comm/communicator_detail.h"
#include "comm/nccl_compat.h"
#include "comm/nccl_handles.h"
#include "comm/nccl_in_flight.h"
#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"

namespace mpu {
namespace {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "NCCL_UNIQUE_ID_BYTES changed");

using detail::Clock;
using detail::CudaEvent;
using detail::NcclComm;
using detail::Settle;
using detail::warn_noexcept;

ncclDataType_t nccl_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
      return ncclFloat32;
    case torch::kHalf:
      return ncclFloat16;
    case torch::kBFloat16:
      return ncclBfloat16;
    case torch::kDouble:
      return ncclFloat64;
    case torch::kInt:
      return ncclInt32;
    case torch::kLong:
      return ncclInt64;
    case torch::kByte:
      return ncclUint8;
    default:
      MPU_THROW(InvalidArgument, "NCCL communicator: unsupported dtype ",
                detail::dtype_name(dtype));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  return op == ReduceOp::kAvg ? ncclAvg : ncclSum;
}

bool blocking_requested() {
  const char* value = std::getenv(kEnvNcclBlocking);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// MPU_NCCL_STREAM_PRIORITY: true for "high" or unset, false for "normal"; anything else is refused.
bool high_priority_requested() {
  const char* value = std::getenv(kEnvNcclStreamPriority);
  if (value == nullptr || *value == '\0' || std::strcmp(value, "high") == 0) return true;
  MPU_CHECK(std::strcmp(value, "normal") == 0, kEnvNcclStreamPriority, "=\"", value,
            "\" is not a stream priority; use \"high\" (the default) or \"normal\"");
  return false;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const NcclUniqueId& id, int rank, int size, int device_index,
                   std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), device_index_(device_index), timeout_(timeout) {
    MPU_CHECK(size > 0 && rank >= 0 && rank < size, "make_nccl_communicator: rank ", rank, " of ",
              size, " ranks is out of range");
    MPU_CHECK(timeout.count() > 0, "make_nccl_communicator: timeout must be positive, got ",
              timeout.count(), " ms");
    int devices = 0;
    MPU_CUDA_CHECK(cudaGetDeviceCount(&devices));
    MPU_CHECK(device_index >= 0 && device_index < devices, "make_nccl_communicator: device index ",
              device_index, " is not one of the ", devices, " visible CUDA devices");
    detail::ignore_sigpipe();  // NCCL's bootstrap and proxy talk over sockets too
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    stream_ = c10::cuda::getStreamFromPool(high_priority_requested(),
                                           static_cast<c10::DeviceIndex>(device_index_));
    ready_ = CudaEvent::create();
    joined_ = CudaEvent::create();

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = blocking_ ? 1 : 0;
    ncclUniqueId unique_id;
    std::memcpy(&unique_id, id.data(), sizeof(unique_id));
    ncclComm_t raw = nullptr;
    const auto start = Clock::now();
    ncclResult_t result = ncclCommInitRankConfig(&raw, size, unique_id, rank, &config);
    comm_ = NcclComm(raw);
    Settle how = Settle::kDone;  // nobody else holds the communicator yet: no abort to expect
    result =
        detail::settle(comm_.get(), result, blocking_, start + timeout_, abort_requested_, &how);
    if (how != Settle::kDone) {
      comm_.abort();
      MPU_THROW(Timeout, "make_nccl_communicator: rank ", rank, " of ", size, " on ",
                device().str(), " did not finish ncclCommInitRankConfig within ",
                detail::seconds_text(timeout_),
                "; did every rank create its communicator with the same unique id?");
    }
    if (result != ncclSuccess) {
      const std::string text = detail::nccl_error_text(result, comm_.get());
      comm_.abort();
      MPU_THROW(CommError, "make_nccl_communicator: rank ", rank, " of ", size, " on ",
                device().str(), ": ncclCommInitRankConfig failed: ", text);
    }
    barrier_buffer_ =
        torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat).device(device()));
    watchdog_ = std::thread([this] { watch(); });
    MPU_LOG_DEBUG("NCCL communicator: rank ", rank, " of ", size, " on ", device().str(),
                  blocking_ ? " (blocking)" : " (non-blocking)");
  }

  ~NcclCommunicator() override {
    // Destroyed while an exception unwinds the stack: this rank is failing, and the peers may be
    // blocked in a collective that waits for it. ncclCommFinalize would wait for them (up to the
    // timeout) and keep this process from exiting, which is what its peers' watches wait for.
    const bool failing = std::uncaught_exceptions() > unwinding_at_construction_;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    try {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
      std::lock_guard<std::mutex> lock(mutex_);
      if (comm_ && !failed_ && !failing) {
        // Bounded: a peer that has stopped would otherwise hold this process for the whole
        // collective timeout (minutes), in the wait below or inside ncclCommFinalize.
        const auto bound = std::min<std::chrono::milliseconds>(timeout_, kNcclFinalizeTimeout);
        const auto deadline = Clock::now() + bound;
        // A blocking communicator's ncclCommFinalize waits for the work in flight on the host,
        // with no deadline: let it find the work done, or do not call it.
        if (drain_locked(deadline)) {
          comm_.finalize(deadline);
        } else if (comm_) {
          warn_noexcept("NCCL communicator: rank ", rank_, " of ", size_,
                        ": collectives still in flight at shutdown after ",
                        detail::seconds_text(bound), "; aborting the communicator");
        }
      }
      comm_.abort();
    } catch (const std::exception& e) {
      warn_noexcept("NCCL communicator: shutdown of rank ", rank_, " failed: ", e.what());
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  torch::Device device() const override {
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_index_));
  }
  std::string backend() const override { return "nccl"; }
  std::uint64_t sequence_number() const override { return seq_.load(); }

  void reduce(torch::Tensor& t, int root, ReduceOp op) override { reduce_on(t, root, op, true); }
  void reduce_async(torch::Tensor& t, int root, ReduceOp op) override {
    reduce_on(t, root, op, false);
  }

  void broadcast(torch::Tensor& t, int root) override {
    in_place("broadcast", t, root, true, [&](const InPlace& x, ncclComm_t comm, cudaStream_t s) {
      return ncclBroadcast(x.data, x.data, x.count, x.dtype, root, comm, s);
    });
  }

  void allreduce(torch::Tensor& t, ReduceOp op) override { allreduce_on(t, op, true); }
  void allreduce_async(torch::Tensor& t, ReduceOp op) override { allreduce_on(t, op, false); }

  void join() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    const cudaStream_t current =
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index_)).stream();
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed_locked("join");
    // The comm stream runs its collectives in order: an event after the last one covers them all.
    MPU_CUDA_CHECK(cudaEventRecord(joined_.get(), stream_->stream()));
    MPU_CUDA_CHECK(cudaStreamWaitEvent(current, joined_.get(), 0));
  }

  void reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) override {
    detail::check_reduce_scatter(*this, out, in, op);
    const std::int64_t total = in.numel();
    if (total == 0) return count_empty("reduce_scatter");
    if (size_ == 1) return copy_alone("reduce_scatter", out, in);
    const std::int64_t chunk = (total + size_ - 1) / size_;
    const ncclDataType_t dtype = nccl_dtype(in.scalar_type());
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    if (chunk * size_ == total) {
      const void* send = in.data_ptr();
      void* recv = out.data_ptr();
      record_on_comm_stream(in);
      record_on_comm_stream(out);
      enqueue("reduce_scatter", [&](ncclComm_t comm, cudaStream_t stream) {
        return ncclReduceScatter(send, recv, static_cast<std::size_t>(chunk), dtype, nccl_op(op),
                                 comm, stream);
      });
      return;
    }
    // size does not divide N: NCCL scatters equal chunks, so pad `in` with zeros and copy this
    // rank's part out afterwards. The temporaries come from torch's current stream, which waits
    // for the collective before it can reuse their memory.
    torch::Tensor padded = torch::empty({chunk * size_}, in.options());
    padded.narrow(0, 0, total).copy_(in.view({-1}));
    padded.narrow(0, total, chunk * size_ - total).zero_();
    torch::Tensor shard = torch::empty({chunk}, in.options());
    const void* send = padded.data_ptr();
    void* recv = shard.data_ptr();
    enqueue("reduce_scatter", [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclReduceScatter(send, recv, static_cast<std::size_t>(chunk), dtype, nccl_op(op),
                               comm, stream);
    });
    if (out.numel() > 0) out.view({-1}).copy_(shard.narrow(0, 0, out.numel()));
  }

  void allgather(torch::Tensor& out, const torch::Tensor& in) override {
    detail::check_allgather(*this, out, in);
    const std::int64_t total = out.numel();
    if (total == 0) return count_empty("allgather");
    if (size_ == 1) return copy_alone("allgather", out, in);
    const std::int64_t chunk = (total + size_ - 1) / size_;
    const ncclDataType_t dtype = nccl_dtype(out.scalar_type());
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    if (chunk * size_ == total) {
      const void* send = in.data_ptr();
      void* recv = out.data_ptr();
      record_on_comm_stream(in);
      record_on_comm_stream(out);
      enqueue("allgather", [&](ncclComm_t comm, cudaStream_t stream) {
        return ncclAllGather(send, recv, static_cast<std::size_t>(chunk), dtype, comm, stream);
      });
      return;
    }
    torch::Tensor padded = torch::zeros({chunk}, out.options());
    if (in.numel() > 0) padded.narrow(0, 0, in.numel()).copy_(in.view({-1}));
    torch::Tensor gathered = torch::empty({chunk * size_}, out.options());
    const void* send = padded.data_ptr();
    void* recv = gathered.data_ptr();
    enqueue("allgather", [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclAllGather(send, recv, static_cast<std::size_t>(chunk), dtype, comm, stream);
    });
    out.view({-1}).copy_(gathered.narrow(0, 0, total));
  }

  void barrier() override {
    void* data = barrier_buffer_.data_ptr();
    enqueue("barrier", [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclAllReduce(data, data, 1, ncclFloat32, ncclSum, comm, stream);
    });
    synchronize();
  }

  void synchronize() override {
    const auto first_poll = Clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      throw_if_failed_locked("synchronize");
      poll_locked(Clock::now());
      if (failed_) continue;
      if (in_flight_.empty()) return;
      lock.unlock();
      // Spin briefly for short collectives, then sleep.
      if (Clock::now() - first_poll < std::chrono::milliseconds(2)) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(kCommPollInterval);
      }
      lock.lock();
    }
  }

  void abort() noexcept override {
    // A collective being enqueued holds the mutex while it waits out ncclInProgress (up to the
    // timeout): the flag makes it give up at once, so that the lock below is not held for long.
    abort_requested_ = true;
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      fail_locked(
          detail::cat("abort() was called on rank ", rank_, " after ", seq_.load(), " collectives"),
          false);
    } catch (...) {
      failed_ = true;
    }
  }

 private:
  std::string label(const char* op, std::uint64_t seq) const {
    return detail::cat(op, " #", seq, " (nccl, rank ", rank_, " of ", size_,
                       ", cuda:", device_index_, ")");
  }

  // Waits for the collectives in flight until `deadline`; false when some are left or one has
  // failed. Never throws.
  bool drain_locked(Clock::time_point deadline) noexcept {
    while (true) {
      poll_locked(Clock::now());
      if (failed_) return false;
      if (in_flight_.empty()) return true;
      if (Clock::now() >= deadline) return false;
      std::this_thread::sleep_for(kCommPollInterval);
    }
  }

  // Tells the caching allocator that the comm stream uses `t`, so that its memory is not handed
  // out again, once `t` is freed, before the collective is done with it. The joined collectives
  // need it too: the current stream waits for them, but a tensor freed and reallocated on
  // another stream would not.
  void record_on_comm_stream(const torch::Tensor& t) { t.record_stream(*stream_); }

  void count_empty(const char* op) {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed_locked(op);
    ++seq_;
  }

  // One rank: reduce_scatter and allgather are a copy (sum, avg, min and max of one value are
  // that value), done on torch's current stream. NCCL 2.28 also leaves the last element of an
  // odd-length float64 ncclAvg reduce-scatter unwritten at one rank (H100, out of place).
  void copy_alone(const char* op, torch::Tensor& out, const torch::Tensor& in) {
    count_empty(op);
    if (out.data_ptr() != in.data_ptr()) out.view({-1}).copy_(in.reshape({-1}));
  }

  // The buffer of an in-place collective, as NCCL takes it.
  struct InPlace {
    void* data;
    std::size_t count;
    ncclDataType_t dtype;
  };

  // One in-place collective on `t`: the argument checks (`root` where the op has one), the
  // empty no-op, then `call(buffer, comm, stream)` enqueued on the comm stream.
  template <typename Call>
  void in_place(const char* op, torch::Tensor& t, std::optional<int> root, bool join_now,
                Call&& call) {
    detail::check_tensor(op, "t", t, device());
    if (root) detail::check_root(op, *root, size_);
    if (t.numel() == 0) return count_empty(op);
    const InPlace x{t.data_ptr(), static_cast<std::size_t>(t.numel()), nccl_dtype(t.scalar_type())};
    record_on_comm_stream(t);
    enqueue(
        op, [&](ncclComm_t comm, cudaStream_t stream) { return call(x, comm, stream); }, join_now);
  }

  void reduce_on(torch::Tensor& t, int root, ReduceOp op, bool join_now) {
    detail::check_reduce_op("reduce", op, t);
    in_place("reduce", t, root, join_now, [&](const InPlace& x, ncclComm_t comm, cudaStream_t s) {
      return ncclReduce(x.data, x.data, x.count, x.dtype, nccl_op(op), root, comm, s);
    });
  }

  void allreduce_on(torch::Tensor& t, ReduceOp op, bool join_now) {
    detail::check_reduce_op("allreduce", op, t);
    in_place("allreduce", t, std::nullopt, join_now,
             [&](const InPlace& x, ncclComm_t comm, cudaStream_t s) {
               return ncclAllReduce(x.data, x.data, x.count, x.dtype, nccl_op(op), comm, s);
             });
  }

  // Orders `launch` (one NCCL call on the comm stream) after torch's current stream, and, when
  // `join_now`, the current stream after it; registers its completion with the watchdog.
  template <typename Launch>
  void enqueue(const char* op, Launch&& launch, bool join_now = true) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    const cudaStream_t current =
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index_)).stream();
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed_locked(op);
    const std::uint64_t seq = ++seq_;
    CudaEvent done = in_flight_.take_event();
    MPU_CUDA_CHECK(cudaEventRecord(ready_.get(), current));
    MPU_CUDA_CHECK(cudaStreamWaitEvent(stream_->stream(), ready_.get(), 0));
    const auto start = Clock::now();
    Settle how = Settle::kDone;
    const ncclResult_t result = detail::settle(comm_.get(), launch(comm_.get(), stream_->stream()),
                                               blocking_, start + timeout_, abort_requested_, &how);
    if (how == Settle::kAborted) {
      fail_locked(detail::cat("abort() was called on rank ", rank_, " while ", label(op, seq),
                              " was being enqueued"),
                  false);
      throw_if_failed_locked(op);
    }
    if (how == Settle::kExpired) {
      record_failure_locked(op, seq, true,
                            "NCCL did not finish enqueueing it; a peer may not "
                            "have joined");
      throw_if_failed_locked(op);
    }
    if (result != ncclSuccess) {
      record_failure_locked(op, seq, false, detail::nccl_error_text(result, comm_.get()));
      throw_if_failed_locked(op);
    }
    MPU_CUDA_CHECK(cudaEventRecord(done.get(), stream_->stream()));
    if (join_now) MPU_CUDA_CHECK(cudaStreamWaitEvent(current, done.get(), 0));
    in_flight_.push(seq, op, std::move(done), start);
  }

  // Pops finished collectives; records a failure on an asynchronous NCCL error, a CUDA error or
  // a collective older than the timeout. Never throws.
  void poll_locked(Clock::time_point now) noexcept {
    if (failed_ || !comm_) return;
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_.get(), &state);
    if (query != ncclSuccess) state = query;
    // ncclInProgress is a non-blocking communicator's "still working"; a blocking one never
    // reports it, so from one it is an error like the others.
    if (state != ncclSuccess && (blocking_ || state != ncclInProgress)) {
      const auto oldest = in_flight_.oldest();
      record_failure_locked(
          oldest ? oldest->first : "communicator", oldest ? oldest->second : seq_.load(), false,
          "NCCL reported an asynchronous error: " + detail::nccl_error_text(state, comm_.get()));
      return;
    }
    if (auto failure = in_flight_.poll(now, timeout_)) {
      record_failure_locked(failure->op, failure->seq, failure->timed_out, failure->why);
    }
  }

  // Records the first failure of collective `op` #`seq` and aborts the NCCL communicator.
  // Never throws.
  void record_failure_locked(const char* op, std::uint64_t seq, bool timed_out,
                             const std::string& why) noexcept {
    if (failed_) return;
    std::string message;
    try {
      message = timed_out ? detail::cat(label(op, seq), " timed out after ",
                                        detail::seconds_text(timeout_), ": ", why)
                          : detail::cat(label(op, seq), " failed: ", why);
    } catch (...) {
    }
    fail_locked(std::move(message), timed_out);
  }

  // Records the first failure and aborts the NCCL communicator. Never throws.
  void fail_locked(std::string message, bool timed_out) noexcept {
    if (failed_) return;
    error_ = std::move(message);
    timed_out_ = timed_out;
    failed_ = true;
    try {
      MPU_LOG_ERROR(error_, "; aborting the communicator");
    } catch (...) {
    }
    comm_.abort();
  }

  void throw_if_failed_locked(const char* op) const {
    if (!failed_) return;
    const std::string message = detail::cat(op, " (nccl, rank ", rank_, " of ", size_,
                                            "): the communicator was aborted: ", error_);
    if (timed_out_) MPU_THROW(Timeout, message);
    MPU_THROW(CommError, message);
  }

  void watch() noexcept {
    (void)cudaSetDevice(device_index_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_) {
      cv_.wait_for(lock, kCommWatchdogInterval);
      if (stop_) break;
      poll_locked(Clock::now());
    }
  }

  const int rank_;
  const int size_;
  const int device_index_;
  const std::chrono::milliseconds timeout_;
  const int unwinding_at_construction_ = std::uncaught_exceptions();
  const bool blocking_ = blocking_requested();
  // A pool stream, never destroyed (see the file comment); set once the device index is checked.
  std::optional<c10::cuda::CUDAStream> stream_;
  // Declared before comm_: destroyed after it.
  CudaEvent ready_;
  CudaEvent joined_;
  detail::InFlight in_flight_;
  NcclComm comm_;
  torch::Tensor barrier_buffer_;
  std::atomic<std::uint64_t> seq_{0};

  std::mutex mutex_;  // every NCCL call on comm_, in_flight_ and the error state
  std::condition_variable cv_;
  bool stop_ = false;
  std::atomic<bool> failed_{false};
  std::atomic<bool> abort_requested_{false};
  bool timed_out_ = false;
  std::string error_;
  std::thread watchdog_;
};

}  // namespace

NcclUniqueId nccl_unique_id() {
  ncclUniqueId id;
  MPU_NCCL_CHECK(ncclGetUniqueId(&id));
  NcclUniqueId bytes{};
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

std::shared_ptr<Communicator> make_nccl_communicator(const NcclUniqueId& id, int rank, int size,
                                                     int device_index,
                                                     std::chrono::milliseconds timeout) {
  return std::make_shared<NcclCommunicator>(id, rank, size, device_index, timeout);
}

}  // namespace mpu
