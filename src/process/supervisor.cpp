#include "process/supervisor.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <thread>

#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"
#include "process/worker_watch.h"

namespace mpu::detail {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kReapPoll{5};

}  // namespace

void flush_all_output() noexcept {
  try {
    std::cout.flush();
    std::cerr.flush();
    std::clog.flush();
  } catch (...) {
    // A stream set to throw on failure: flushing what can be flushed is all we can do here.
  }
  std::fflush(nullptr);
}

void exit_child(int code) noexcept {
  flush_all_output();
  ::_exit(code);
}

std::string describe_wait_status(int status, const char* (*meaning)(int code)) {
  if (WIFEXITED(status)) {
    const int code = WEXITSTATUS(status);
    return cat("exited with status ", code, meaning != nullptr ? meaning(code) : "");
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return cat("was killed by signal ", sig, " (", name != nullptr ? name : "unknown", ")",
               WCOREDUMP(status) ? ", core dumped" : "");
  }
  return cat("ended with wait status ", status);
}

Supervisor::Supervisor() = default;

Supervisor::~Supervisor() {
  stop(std::chrono::milliseconds(0), false);
}

std::size_t Supervisor::fork(const std::string& what, const std::function<int()>& child) {
  // A watch thread alive at the fork would be missing in the child, with whatever it held.
  MPU_CHECK(watch_ == nullptr, what, ": fork() after the death watch started");
  flush_all_output();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    MPU_THROW(CommError, what, ": fork() failed: ", std::strerror(err));
  }
  if (pid == 0) {
    int code = kExitChildThrew;
    try {
      code = child();
    } catch (const std::exception& e) {
      MPU_LOG_ERROR(what, ": the child process failed: ", e.what());
    } catch (...) {
      MPU_LOG_ERROR(what, ": the child process failed with an unknown exception");
    }
    exit_child(code);
  }
  children_.push_back(Child{pid});
  return children_.size() - 1;
}

bool Supervisor::reap(std::size_t i, std::chrono::milliseconds wait) {
  Child& c = children_[i];
  const auto deadline = Clock::now() + wait;
  while (!c.reaped) {
    const pid_t r = ::waitpid(c.pid, &c.status, WNOHANG);
    if (r == c.pid) {
      c.reaped = true;
    } else if (r < 0 && errno == ECHILD && ::kill(c.pid, 0) != 0) {
      // SIGCHLD is ignored: the kernel reaped the child, and its status is lost.
      c.reaped = true;
      c.status_lost = true;
      c.status = 0;
    } else if (Clock::now() >= deadline) {
      return false;
    } else {
      std::this_thread::sleep_for(kReapPoll);
    }
  }
  return true;
}

bool Supervisor::reap_all(Clock::time_point deadline) {
  bool all = true;
  for (std::size_t i = 0; i < children_.size(); ++i) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    all = reap(i, std::max(left, std::chrono::milliseconds(0))) && all;
  }
  return all;
}

void Supervisor::signal_running(int sig) noexcept {
  for (Child& c : children_) {
    if (!c.reaped) {
      ::kill(c.pid, sig);
      c.signalled = true;
    }
  }
}

void Supervisor::stop(std::chrono::milliseconds grace, bool term) noexcept {
  stop_watch();
  try {
    if (term) signal_running(SIGTERM);
    if (!reap_all(Clock::now() + grace)) {
      for (std::size_t i = 0; i < children_.size(); ++i) {
        if (children_[i].reaped) continue;
        if (grace.count() > 0) {
          MPU_LOG_WARN("process ", children_[i].pid, " did not exit within ", grace.count(),
                       " ms; killing it");
        }
        ::kill(children_[i].pid, SIGKILL);
        children_[i].signalled = true;
      }
      // SIGKILL cannot be caught: the wait is bounded by the kernel, not by the child.
      for (std::size_t i = 0; i < children_.size(); ++i) (void)reap(i, std::chrono::hours(1));
    }
  } catch (const std::exception& e) {
    MPU_LOG_ERROR("stopping child processes failed: ", e.what());
  }
}

void Supervisor::start_watch(std::chrono::milliseconds interval) {
  std::vector<pid_t> pids;
  for (const Child& c : children_) pids.push_back(c.pid);
  watch_ = std::make_unique<ChildWatch>(std::move(pids), interval);
}

void Supervisor::arm(std::shared_ptr<Communicator> comm) {
  if (watch_) watch_->arm(std::move(comm));
}

int Supervisor::first_dead() const {
  return watch_ ? watch_->first_dead() : -1;
}

void Supervisor::stop_watch() noexcept {
  if (watch_) watch_->stop();
}

}  // namespace mpu::detail
