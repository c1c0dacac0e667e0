#include "process/worker_watch.h"

#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "misc/env.h"
#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/defaults.h"
#include "mpu/error.h"
#include "process/supervisor.h"

namespace mpu::detail {
namespace {
constexpr unsigned kFlushBoundSeconds = 2;
}  // namespace

std::chrono::milliseconds worker_death_timeout(const UpdaterOptions& options) {
  MPU_CHECK(options.worker_death_timeout.count() >= 0,
            "UpdaterOptions::worker_death_timeout must be positive, or 0 for the default; got ",
            options.worker_death_timeout.count(), " ms");
  if (options.worker_death_timeout.count() > 0) return options.worker_death_timeout;
  return env_seconds(kEnvWorkerDeathTimeout).value_or(kDefaultWorkerDeathTimeout);
}

const char* worker_exit_meaning(int code) {
  return code == kWorkerExitError        ? " (it failed)"
         : code == kWorkerExitCommError  ? " (a collective failed)"
         : code == kWorkerExitMasterGone ? " (the master was gone)"
                                         : "";
}

std::string describe_worker_status(int status) {
  return describe_wait_status(status, worker_exit_meaning);
}

bool is_consequential_exit(int status) {
  return WIFEXITED(status) &&
         (WEXITSTATUS(status) == kWorkerExitCommError ||
          WEXITSTATUS(status) == kWorkerExitMasterGone || WEXITSTATUS(status) == kWorkerExitOk);
}

ChildWatch::ChildWatch(std::vector<pid_t> pids, std::chrono::milliseconds interval)
    : pids_(std::move(pids)), interval_(interval) {
  thread_ = std::thread([this] { run(); });
}

ChildWatch::~ChildWatch() {
  stop();
}

void ChildWatch::arm(std::shared_ptr<Communicator> comm) {
  std::lock_guard<std::mutex> lock(mutex_);
  comm_ = std::move(comm);
  if (comm_ && first_dead_.load() >= 0) comm_->abort();
}

void ChildWatch::stop() noexcept {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void ChildWatch::run() noexcept {
  while (!stop_.load()) {
    for (std::size_t i = 0; i < pids_.size(); ++i) {
      siginfo_t info{};
      // WNOWAIT: look, do not reap; the owner reaps and reads the status.
      if (::waitid(P_PID, static_cast<id_t>(pids_[i]), &info, WEXITED | WNOHANG | WNOWAIT) != 0 ||
          info.si_pid == 0) {
        continue;
      }
      first_dead_.store(static_cast<int>(i));
      std::lock_guard<std::mutex> lock(mutex_);
      if (comm_) comm_->abort();
      return;  // one death ends the job; the owner takes over
    }
    std::this_thread::sleep_for(interval_);
  }
}

void watch_parent(pid_t master_pid, int fd, int rank, std::chrono::milliseconds interval) {
  std::thread([master_pid, fd, rank, interval] {
    for (;;) {
      std::this_thread::sleep_for(interval);
      const char* why = nullptr;
      if (::getppid() != master_pid) {
        why = "the master process is gone (this worker was re-parented)";
      } else {
        pollfd p{fd, POLLRDHUP, 0};
        if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL))) {
          why = "the master closed its end of the worker socket";
        }
      }
      if (why != nullptr) {
        MPU_LOG_ERROR("MultiprocessParallelUpdater worker ", rank, ": ", why, " (master pid ",
                      master_pid, "); exiting with status ", kWorkerExitMasterGone);
        // Flushing blocks while stdout is a full pipe nobody reads (its reader may have been
        // the master): the alarm bounds the flush, so that the worker still leaves.
        ::alarm(kFlushBoundSeconds);
        exit_child(kWorkerExitMasterGone);
      }
    }
  }).detach();
}

}  // namespace mpu::detail
