// The NCCL communicator: NCCL called directly on the communicator's own CUDA stream, ordered
// against torch's current stream by events, watched by a thread that aborts it on a deadline.
//
// Who waits for whom, per collective (see communicator.h):
//   current stream --ready_--> comm stream: NCCL kernel --done--> current stream.
// The _async collectives leave out the second wait; join() records `joined_` on the comm stream
// and makes the current stream wait for it. The host returns once the waits are enqueued. The done
// events of the collectives in flight sit in `pending_`, oldest first. The watchdog thread wakes
// every kCommWatchdogInterval, pops the finished ones, and aborts the communicator when the oldest
// is older than the timeout or NCCL reports an asynchronous error. Every NCCL call on the
// communicator happens under `mutex_`, so an abort never races an enqueue.
//
// The communicator is non-blocking (ncclConfig_t::blocking = 0) unless MPU_NCCL_BLOCKING=1: then
// the rendezvous and a first collective whose connection setup waits for a peer return
// ncclInProgress, and the host polls them against the deadline instead of hanging in NCCL.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "comm/communicator_detail.h"
#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"
#include "comm/nccl_compat.h"

namespace mpu {
namespace {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "NCCL_UNIQUE_ID_BYTES changed");

using Clock = std::chrono::steady_clock;

// Logging from noexcept code: building the message may throw, the logging itself does not.
template <typename... Args>
void warn_noexcept(const Args&... args) noexcept {
  try {
    MPU_LOG_WARN(args...);
  } catch (...) {
  }
}

// Sole owner of an ncclComm_t. Destroying an owner that still holds a communicator aborts it,
// which never blocks; an orderly shutdown calls finalize() first.
class NcclComm {
 public:
  NcclComm() = default;
  explicit NcclComm(ncclComm_t comm) : comm_(comm) {}
  NcclComm(NcclComm&& other) noexcept : comm_(std::exchange(other.comm_, nullptr)) {}
  NcclComm& operator=(NcclComm&& other) noexcept {
    if (this != &other) {
      abort();
      comm_ = std::exchange(other.comm_, nullptr);
    }
    return *this;
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm() { abort(); }

  ncclComm_t get() const { return comm_; }
  explicit operator bool() const { return comm_ != nullptr; }

  // ncclCommAbort: releases kernels in flight and frees the communicator without waiting for
  // the peers.
  void abort() noexcept {
    if (comm_ == nullptr) return;
    const ncclResult_t result = ncclCommAbort(comm_);
    if (result != ncclSuccess) {
      warn_noexcept("ncclCommAbort returned ", ncclGetErrorString(result));
    }
    comm_ = nullptr;
  }

  // Flushes the issued work (ncclCommFinalize) and destroys the communicator. Returns false, and
  // aborts instead, when that fails or is not done by `deadline`.
  bool finalize(Clock::time_point deadline) noexcept {
    if (comm_ == nullptr) return true;
    ncclResult_t result = ncclCommFinalize(comm_);
    while (result == ncclInProgress && Clock::now() < deadline) {
      std::this_thread::sleep_for(kCommPollInterval);
      ncclResult_t state = ncclSuccess;
      result = ncclCommGetAsyncError(comm_, &state);
      if (result == ncclSuccess) result = state;
    }
    if (result != ncclSuccess) {
      warn_noexcept("ncclCommFinalize did not finish (",
                    result == ncclInProgress ? "deadline passed" : ncclGetErrorString(result),
                    "); aborting the communicator");
      abort();
      return false;
    }
    result = ncclCommDestroy(comm_);
    comm_ = nullptr;
    if (result != ncclSuccess && result != ncclInProgress) {
      warn_noexcept("ncclCommDestroy returned ", ncclGetErrorString(result));
      return false;
    }
    return true;
  }

 private:
  ncclComm_t comm_ = nullptr;
};

// Sole owner of a cudaEvent_t (created without timing, for ordering only).
class CudaEvent {
 public:
  CudaEvent() = default;
  static CudaEvent create() {
    CudaEvent event;
    MPU_CUDA_CHECK(cudaEventCreateWithFlags(&event.event_, cudaEventDisableTiming));
    return event;
  }
  CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& other) noexcept {
    if (this != &other) {
      reset();
      event_ = std::exchange(other.event_, nullptr);
    }
    return *this;
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent() { reset(); }

  cudaEvent_t get() const { return event_; }

 private:
  void reset() noexcept {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
    event_ = nullptr;
  }
  cudaEvent_t event_ = nullptr;
};

// Sole owner of a cudaStream_t.
class CudaStream {
 public:
  CudaStream() = default;
  // A non-blocking stream (no implicit sync with the legacy default stream), of the highest
  // priority when `high` (communication kernels are scheduled ahead of queued compute), else of
  // the default priority.
  static CudaStream create(bool high) {
    int least = 0;
    int greatest = 0;
    MPU_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CudaStream stream;
    MPU_CUDA_CHECK(cudaStreamCreateWithPriority(&stream.stream_, cudaStreamNonBlocking,
                                                high ? greatest : least));
    return stream;
  }
  CudaStream(CudaStream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  CudaStream& operator=(CudaStream&& other) noexcept {
    if (this != &other) {
      reset();
      stream_ = std::exchange(other.stream_, nullptr);
    }
    return *this;
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream() { reset(); }

  cudaStream_t get() const { return stream_; }

 private:
  void reset() noexcept {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }
  cudaStream_t stream_ = nullptr;
};

ncclDataType_t nccl_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
      return ncclFloat32;
    case torch::kHalf:
      return ncclFloat16;
    case torch::kBFloat16:
      return ncclBfloat16;
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
    stream_ = CudaStream::create(high_priority_requested());
    ready_ = CudaEvent::create();
    joined_ = CudaEvent::create();

    const bool blocking = blocking_requested();
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = blocking ? 1 : 0;
    ncclUniqueId unique_id;
    std::memcpy(&unique_id, id.data(), sizeof(unique_id));
    ncclComm_t raw = nullptr;
    const auto start = Clock::now();
    ncclResult_t result = ncclCommInitRankConfig(&raw, size, unique_id, rank, &config);
    comm_ = NcclComm(raw);
    bool expired = false;
    bool aborted = false;  // nobody else holds the communicator yet
    result = settle(result, start + timeout_, &expired, &aborted);
    if (expired) {
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
                  blocking ? " (blocking)" : " (non-blocking)");
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
        const auto deadline = Clock::now() + timeout_;
        comm_.finalize(deadline);
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
    MPU_CUDA_CHECK(cudaEventRecord(joined_.get(), stream_.get()));
    MPU_CUDA_CHECK(cudaStreamWaitEvent(current, joined_.get(), 0));
  }

  void reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) override {
    detail::check_reduce_scatter(*this, out, in);
    const std::int64_t total = in.numel();
    if (total == 0) return count_empty("reduce_scatter");
    const std::int64_t chunk = (total + size_ - 1) / size_;
    const ncclDataType_t dtype = nccl_dtype(in.scalar_type());
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    if (chunk * size_ == total) {
      const void* send = in.data_ptr();
      void* recv = out.data_ptr();
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
    const std::int64_t chunk = (total + size_ - 1) / size_;
    const ncclDataType_t dtype = nccl_dtype(out.scalar_type());
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    if (chunk * size_ == total) {
      const void* send = in.data_ptr();
      void* recv = out.data_ptr();
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
      if (pending_.empty()) return;
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
  struct Pending {
    std::uint64_t seq;
    const char* op;
    CudaEvent done;
    Clock::time_point start;
  };

  std::string label(const char* op, std::uint64_t seq) const {
    return detail::cat(op, " #", seq, " (nccl, rank ", rank_, " of ", size_,
                       ", cuda:", device_index_, ")");
  }

  // Waits out ncclInProgress (non-blocking communicators) until `deadline`.
  // Gives up early, setting *aborted, when abort() is called meanwhile.
  ncclResult_t settle(ncclResult_t result, Clock::time_point deadline, bool* expired,
                      bool* aborted) {
    *expired = false;
    *aborted = false;
    const auto first_poll = Clock::now();
    while (result == ncclInProgress) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t query = ncclCommGetAsyncError(comm_.get(), &state);
      if (query != ncclSuccess) return query;
      if (state != ncclInProgress) return state;
      if (abort_requested_) {
        *aborted = true;
        return ncclInProgress;
      }
      if (Clock::now() >= deadline) {
        *expired = true;
        return ncclInProgress;
      }
      // Enqueueing usually settles within microseconds: spin first, sleep only when it lingers,
      // or every collective would pay a whole poll interval.
      if (Clock::now() - first_poll < std::chrono::milliseconds(2)) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(kCommPollInterval);
      }
    }
    return result;
  }

  void count_empty(const char* op) {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed_locked(op);
    ++seq_;
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
    enqueue(
        op, [&](ncclComm_t comm, cudaStream_t stream) { return call(x, comm, stream); }, join_now);
  }

  void reduce_on(torch::Tensor& t, int root, ReduceOp op, bool join_now) {
    in_place("reduce", t, root, join_now, [&](const InPlace& x, ncclComm_t comm, cudaStream_t s) {
      return ncclReduce(x.data, x.data, x.count, x.dtype, nccl_op(op), root, comm, s);
    });
  }

  void allreduce_on(torch::Tensor& t, ReduceOp op, bool join_now) {
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
    CudaEvent done;
    if (free_events_.empty()) {
      done = CudaEvent::create();
    } else {
      done = std::move(free_events_.back());
      free_events_.pop_back();
    }
    MPU_CUDA_CHECK(cudaEventRecord(ready_.get(), current));
    MPU_CUDA_CHECK(cudaStreamWaitEvent(stream_.get(), ready_.get(), 0));
    const auto start = Clock::now();
    bool expired = false;
    bool aborted = false;
    const ncclResult_t result =
        settle(launch(comm_.get(), stream_.get()), start + timeout_, &expired, &aborted);
    if (aborted) {
      fail_locked(detail::cat("abort() was called on rank ", rank_, " while ", label(op, seq),
                              " was being enqueued"),
                  false);
      throw_if_failed_locked(op);
    }
    if (expired) {
      record_failure_locked(op, seq, true,
                            "NCCL did not finish enqueueing it; a peer may not "
                            "have joined");
      throw_if_failed_locked(op);
    }
    if (result != ncclSuccess) {
      record_failure_locked(op, seq, false, detail::nccl_error_text(result, comm_.get()));
      throw_if_failed_locked(op);
    }
    MPU_CUDA_CHECK(cudaEventRecord(done.get(), stream_.get()));
    if (join_now) MPU_CUDA_CHECK(cudaStreamWaitEvent(current, done.get(), 0));
    pending_.push_back(Pending{seq, op, std::move(done), start});
  }

  // Pops finished collectives; records a failure on an asynchronous NCCL error, a CUDA error or
  // a collective older than the timeout. Never throws.
  void poll_locked(Clock::time_point now) noexcept {
    if (failed_ || !comm_) return;
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_.get(), &state);
    if (query != ncclSuccess) state = query;
    if (state != ncclSuccess && state != ncclInProgress) {
      const Pending* oldest = pending_.empty() ? nullptr : &pending_.front();
      record_failure_locked(
          oldest ? oldest->op : "communicator", oldest ? oldest->seq : seq_.load(), false,
          "NCCL reported an asynchronous error: " + detail::nccl_error_text(state, comm_.get()));
      return;
    }
    while (!pending_.empty()) {
      Pending& oldest = pending_.front();
      const cudaError_t status = cudaEventQuery(oldest.done.get());
      if (status == cudaSuccess) {
        free_events_.push_back(std::move(oldest.done));
        pending_.pop_front();
        continue;
      }
      if (status != cudaErrorNotReady) {
        (void)cudaGetLastError();
        record_failure_locked(oldest.op, oldest.seq, false,
                              detail::cat("CUDA error ", cudaGetErrorName(status), " (",
                                          cudaGetErrorString(status), ")"));
      } else if (now - oldest.start > timeout_) {
        record_failure_locked(oldest.op, oldest.seq, true,
                              "it did not finish; a peer may have stopped calling collectives");
      }
      return;
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
  // Declared before comm_: destroyed after it.
  CudaStream stream_;
  CudaEvent ready_;
  CudaEvent joined_;
  std::vector<CudaEvent> free_events_;
  std::deque<Pending> pending_;
  NcclComm comm_;
  torch::Tensor barrier_buffer_;
  std::atomic<std::uint64_t> seq_{0};

  std::mutex mutex_;  // every NCCL call on comm_, pending_, free_events_ and the error state
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
