// The collectives an NCCL communicator has enqueued and not yet seen finish: the bookkeeping
// behind its watchdog, synchronize() and the bounded shutdown.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "comm/nccl_handles.h"

namespace mpu::detail {

/// Why the oldest collective in flight failed.
struct InFlightFailure {
  const char* op;     ///< "allreduce", ...
  std::uint64_t seq;  ///< Its sequence number.
  bool timed_out;     ///< True when it outlived the timeout, false for a CUDA error.
  std::string why;    ///< For the message: "CUDA error ...", "it did not finish; ...".
};

/// The done events of the collectives in flight on one comm stream, oldest first, and a pool of
/// finished events to reuse. Not thread-safe: the communicator calls it under its mutex.
class InFlight {
 public:
  /// An event to record after the next collective: a finished one when there is one.
  CudaEvent take_event();
  /// Registers collective `op` #`seq`, started at `start`, whose `done` event is recorded on the
  /// comm stream after it.
  void push(std::uint64_t seq, const char* op, CudaEvent done, Clock::time_point start);
  /// Pops the finished collectives, oldest first. Returns the failure of the oldest one still in
  /// flight: a CUDA error, or, when it started more than `timeout` before `now`, a timeout.
  /// Never throws.
  std::optional<InFlightFailure> poll(Clock::time_point now,
                                      std::chrono::milliseconds timeout) noexcept;
  /// True when every collective registered so far has finished (as of the last poll).
  bool empty() const { return pending_.empty(); }
  /// The op and sequence number of the oldest collective in flight; nullopt when none is.
  std::optional<std::pair<const char*, std::uint64_t>> oldest() const;

 private:
  struct Pending {
    std::uint64_t seq;
    const char* op;
    CudaEvent done;
    Clock::time_point start;
  };
  std::deque<Pending> pending_;
  std::vector<CudaEvent> free_events_;
};

}  // namespace mpu::detail
