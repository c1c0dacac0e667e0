// The collectives in flight of an NCCL communicator (nccl_in_flight.h).
#include "comm/nccl_in_flight.h"

#include <utility>

#include "mpu/error.h"

namespace mpu::detail {

CudaEvent InFlight::take_event() {
  if (free_events_.empty()) return CudaEvent::create();
  CudaEvent event = std::move(free_events_.back());
  free_events_.pop_back();
  return event;
}

void InFlight::push(std::uint64_t seq, const char* op, CudaEvent done, Clock::time_point start) {
  pending_.push_back(Pending{seq, op, std::move(done), start});
}

std::optional<InFlightFailure> InFlight::poll(Clock::time_point now,
                                              std::chrono::milliseconds timeout) noexcept {
  try {
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
        return InFlightFailure{
            oldest.op, oldest.seq, false,
            cat("CUDA error ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")")};
      }
      if (now - oldest.start > timeout) {
        return InFlightFailure{oldest.op, oldest.seq, true,
                               "it did not finish; a peer may have stopped calling collectives"};
      }
      return std::nullopt;
    }
  } catch (...) {
    // Only building the message can throw (out of memory): report the failure without it.
    const Pending& oldest = pending_.front();
    return InFlightFailure{oldest.op, oldest.seq, false, {}};
  }
  return std::nullopt;
}

std::optional<std::pair<const char*, std::uint64_t>> InFlight::oldest() const {
  if (pending_.empty()) return std::nullopt;
  return std::make_pair(pending_.front().op, pending_.front().seq);
}

}  // namespace mpu::detail
