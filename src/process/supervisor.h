// The one supervisor of child processes, used by spawn() for its ranks and by
// MultiprocessParallelUpdater for its workers: fork (with the pre-fork flush), death watch,
// reaping, stopping (SIGTERM, then SIGKILL after a grace) and the text that says how a child
// ended.
//
// Threads and fork(): only the forking thread survives in the child, so a lock another thread
// held at the fork stays locked there forever. The supervisor starts no thread before a fork:
// its death watch (ChildWatch) is started by start_watch(), which the owners call after the
// last fork. Threads that already exist are the caller's contract (see
// MultiprocessParallelUpdater's class comment).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mpu {
class Communicator;
namespace detail {

class ChildWatch;

/// Flushes std::cout, std::cerr and every C stdio stream. Before a fork, so that buffered
/// output is not written once by the parent and once more by each child; and in a child before
/// _exit, which flushes nothing. noexcept.
void flush_all_output() noexcept;

/// Leaves a forked child: flushes its output, then _exit(code) (no atexit handlers and no
/// static destructors of the parent's copy run in the child).
[[noreturn]] void exit_child(int code) noexcept;

/// How a child ended, from its wait status: "exited with status 2", "was killed by signal 9
/// (Killed)", ... `meaning`, when given, explains an exit code (" (it failed)"), or returns "".
std::string describe_wait_status(int status, const char* (*meaning)(int code) = nullptr);

/// Owns the children it forked. Move-only; the destructor SIGKILLs and reaps any child still
/// running, and never throws.
class Supervisor {
 public:
  Supervisor();
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  /// Flushes output, forks, and runs `child` in the child, which then leaves through
  /// exit_child() with the code `child` returned (kExitChildThrew if it threw). Returns the
  /// index of the new child. Throws CommError naming `what` and errno when fork() fails.
  std::size_t fork(const std::string& what, const std::function<int()>& child);

  std::size_t size() const { return children_.size(); }
  pid_t pid(std::size_t i) const { return children_[i].pid; }
  bool reaped(std::size_t i) const { return children_[i].reaped; }
  /// The wait status; meaningful once reaped(i).
  int status(std::size_t i) const { return children_[i].status; }
  /// True when the supervisor sent the child a signal (stop()).
  bool signalled(std::size_t i) const { return children_[i].signalled; }
  /// True when the child was reaped by the kernel (SIGCHLD ignored), so that its status is lost.
  bool status_lost(std::size_t i) const { return children_[i].status_lost; }

  /// Reaps child `i` if it has ended, waiting up to `wait`; true once it is reaped.
  bool reap(std::size_t i, std::chrono::milliseconds wait = std::chrono::milliseconds(0));
  /// Reaps every child that ends before `deadline`; true when all are reaped.
  bool reap_all(std::chrono::steady_clock::time_point deadline);

  /// Sends `sig` to every child not yet reaped.
  void signal_running(int sig) noexcept;
  /// Stops every child still running: SIGTERM (unless `term` is false, for children that ignore
  /// it and were asked to leave another way), SIGKILL to those left after `grace`, and reaps
  /// them all. noexcept.
  void stop(std::chrono::milliseconds grace, bool term = true) noexcept;

  /// Starts the death watch over the children forked so far: once one has died, the armed
  /// communicator is aborted, so that a collective blocked on the dead child returns. Call it
  /// after the last fork (a thread must not exist at a fork).
  void start_watch(std::chrono::milliseconds interval);
  /// The communicator the death watch aborts.
  void arm(std::shared_ptr<Communicator> comm);
  /// Index of the first child the death watch found dead, or -1.
  int first_dead() const;

 private:
  struct Child {
    pid_t pid = -1;
    bool reaped = false;
    bool signalled = false;
    bool status_lost = false;
    int status = 0;
  };
  void stop_watch() noexcept;

  std::vector<Child> children_;
  std::unique_ptr<ChildWatch> watch_;
};

/// The exit code of a child whose function threw past the supervisor.
inline constexpr int kExitChildThrew = 1;

}  // namespace detail
}  // namespace mpu
