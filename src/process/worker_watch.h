// Fault detection between a MultiprocessParallelUpdater's master and its workers
// (docs/reliability.md):
// - the master runs a ChildWatch thread that notices a dead worker within kWorkerWatchInterval,
//   without reaping it, and aborts the communicator so that a collective blocked on the dead
//   worker returns;
// - each worker runs watch_parent(), which ends the worker when the master is gone;
// - exit codes and the choice of which dead worker to blame.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mpu/updater.h"

namespace mpu {
class Communicator;
namespace detail {

/// Exit codes of a worker.
inline constexpr int kWorkerExitOk = 0;
/// The worker failed on its own (its loss function threw, out of memory, ...).
inline constexpr int kWorkerExitError = 2;
/// A collective failed: usually the consequence of another process's failure.
inline constexpr int kWorkerExitCommError = 4;
/// The master went away.
inline constexpr int kWorkerExitMasterGone = 5;

/// `options.worker_death_timeout`, else MPU_WORKER_DEATH_TIMEOUT_SEC, else
/// kDefaultWorkerDeathTimeout. Throws InvalidArgument for a negative option or a malformed
/// variable.
std::chrono::milliseconds worker_death_timeout(const UpdaterOptions& options);

/// What a worker's exit code means (" (it failed)"), or "": for describe_wait_status().
const char* worker_exit_meaning(int code);

/// "exited with status 2 (it failed)", "was killed by signal 9 (Killed)", ...
std::string describe_worker_status(int status);

/// True when a worker that ended with `status` failed as a consequence of another process
/// (a failed collective, a vanished master) rather than on its own.
bool is_consequential_exit(int status);

/// Watches child processes from a thread. Noticing a death does not reap the child (waitid with
/// WNOWAIT), so the owner still reaps it and reads its status. Once a child has died, the armed
/// communicator is aborted (at once, or when it is armed later).
class ChildWatch {
 public:
  ChildWatch(std::vector<pid_t> pids, std::chrono::milliseconds interval);
  ~ChildWatch();
  ChildWatch(const ChildWatch&) = delete;
  ChildWatch& operator=(const ChildWatch&) = delete;

  /// The communicator to abort when a child dies.
  void arm(std::shared_ptr<Communicator> comm);
  /// Index (into the pids given) of the first child found dead, or -1.
  int first_dead() const { return first_dead_.load(); }
  /// Stops the thread; idempotent.
  void stop() noexcept;

 private:
  void run() noexcept;

  std::vector<pid_t> pids_;
  std::chrono::milliseconds interval_;
  std::atomic<int> first_dead_{-1};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::shared_ptr<Communicator> comm_;
  std::thread thread_;
};

/// In a worker: starts a detached thread that ends this process with kWorkerExitMasterGone,
/// after logging why and flushing its output, once the master (`master_pid`) is gone: this process
/// was re-parented, or the master's end of `fd` closed.
void watch_parent(pid_t master_pid, int fd, int rank, std::chrono::milliseconds interval);

}  // namespace detail
}  // namespace mpu
