// Sole owners of the NCCL and CUDA handles the NCCL communicator holds, and the wait for
// ncclInProgress that every call on a non-blocking communicator may need.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>

#include "comm/nccl_compat.h"
#include "misc/log.h"

namespace mpu::detail {

using Clock = std::chrono::steady_clock;

/// Logging from noexcept code: building the message may throw, the logging itself does not.
template <typename... Args>
void warn_noexcept(const Args&... args) noexcept {
  try {
    MPU_LOG_WARN(args...);
  } catch (...) {
  }
}

/// How a wait for ncclInProgress ended, when it did not end in a result.
enum class Settle {
  kDone,     ///< NCCL gave a result (success or an error).
  kExpired,  ///< The deadline passed while NCCL was still in progress.
  kAborted,  ///< abort() was requested while NCCL was still in progress.
};

/// Waits out `result` == ncclInProgress on `comm`: polls ncclCommGetAsyncError until it reports
/// something other than ncclInProgress, `deadline` passes, or `abort_requested` becomes true.
/// Only a non-blocking communicator may answer ncclInProgress; from a blocking one (`blocking`)
/// it is an error and is returned as it is. `*how` says how the wait ended; the result is
/// ncclInProgress unless it is kDone.
ncclResult_t settle(ncclComm_t comm, ncclResult_t result, bool blocking, Clock::time_point deadline,
                    const std::atomic<bool>& abort_requested, Settle* how);

/// Sole owner of an ncclComm_t. Destroying an owner that still holds a communicator aborts it,
/// which never blocks; an orderly shutdown calls finalize() first.
class NcclComm {
 public:
  NcclComm() = default;
  explicit NcclComm(ncclComm_t comm) : comm_(comm) {}
  NcclComm(NcclComm&& other) noexcept;
  NcclComm& operator=(NcclComm&& other) noexcept;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm() { abort(); }

  ncclComm_t get() const { return comm_; }
  explicit operator bool() const { return comm_ != nullptr; }

  /// ncclCommAbort: releases kernels in flight and frees the communicator without waiting for
  /// the peers. Logs a failure, never throws.
  void abort() noexcept;

  /// Flushes the issued work (ncclCommFinalize, polled while it is in progress) and destroys the
  /// communicator. Returns false, and aborts instead, when that fails or is not done by
  /// `deadline`. Logs, never throws.
  bool finalize(Clock::time_point deadline) noexcept;

 private:
  ncclComm_t comm_ = nullptr;
};

/// Sole owner of a cudaEvent_t, created without timing (for ordering only).
class CudaEvent {
 public:
  CudaEvent() = default;
  /// A new event. Throws `mpu::Error` when CUDA fails.
  static CudaEvent create();
  CudaEvent(CudaEvent&& other) noexcept;
  CudaEvent& operator=(CudaEvent&& other) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent() { reset(); }

  cudaEvent_t get() const { return event_; }

 private:
  void reset() noexcept;
  cudaEvent_t event_ = nullptr;
};

}  // namespace mpu::detail
