// The RAII owners of NCCL and CUDA handles, and the wait for ncclInProgress (nccl_handles.h).
#include "comm/nccl_handles.h"

#include <thread>
#include <utility>

#include "mpu/defaults.h"
#include "mpu/error.h"

namespace mpu::detail {

ncclResult_t settle(ncclComm_t comm, ncclResult_t result, bool blocking, Clock::time_point deadline,
                    const std::atomic<bool>& abort_requested, Settle* how) {
  *how = Settle::kDone;
  // A blocking communicator has nothing to poll: ncclInProgress from it is an error the caller
  // reports like any other.
  if (blocking) return result;
  const auto first_poll = Clock::now();
  while (result == ncclInProgress) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm, &state);
    if (query != ncclSuccess) return query;
    if (state != ncclInProgress) return state;
    if (abort_requested.load()) {
      *how = Settle::kAborted;
      return ncclInProgress;
    }
    if (Clock::now() >= deadline) {
      *how = Settle::kExpired;
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

NcclComm::NcclComm(NcclComm&& other) noexcept : comm_(std::exchange(other.comm_, nullptr)) {}

NcclComm& NcclComm::operator=(NcclComm&& other) noexcept {
  if (this != &other) {
    abort();
    comm_ = std::exchange(other.comm_, nullptr);
  }
  return *this;
}

void NcclComm::abort() noexcept {
  if (comm_ == nullptr) return;
  const ncclResult_t result = ncclCommAbort(comm_);
  if (result != ncclSuccess) warn_noexcept("ncclCommAbort returned ", ncclGetErrorString(result));
  comm_ = nullptr;
}

bool NcclComm::finalize(Clock::time_point deadline) noexcept {
  if (comm_ == nullptr) return true;
  ncclResult_t result = ncclCommFinalize(comm_);
  // A non-blocking communicator finalizes in the background: poll it against the deadline.
  while (result == ncclInProgress && Clock::now() < deadline) {
    std::this_thread::sleep_for(kCommPollInterval);
    ncclResult_t state = ncclSuccess;
    result = ncclCommGetAsyncError(comm_, &state);
    if (result == ncclSuccess) result = state;
  }
  if (result != ncclSuccess) {
    warn_noexcept("ncclCommFinalize did not finish (",
                  result == ncclInProgress ? "its deadline passed" : ncclGetErrorString(result),
                  "); aborting the communicator");
    abort();
    return false;
  }
  // After a finished finalize, destroying is local: it frees memory and does not wait for peers.
  result = ncclCommDestroy(comm_);
  comm_ = nullptr;
  if (result != ncclSuccess) {
    warn_noexcept("ncclCommDestroy returned ", ncclGetErrorString(result));
    return false;
  }
  return true;
}

CudaEvent CudaEvent::create() {
  CudaEvent event;
  MPU_CUDA_CHECK(cudaEventCreateWithFlags(&event.event_, cudaEventDisableTiming));
  return event;
}

CudaEvent::CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  if (this != &other) {
    reset();
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

void CudaEvent::reset() noexcept {
  if (event_ != nullptr) (void)cudaEventDestroy(event_);
  event_ = nullptr;
}

}  // namespace mpu::detail
