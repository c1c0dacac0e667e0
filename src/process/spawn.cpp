// spawn(): forks the local ranks through the Supervisor, collects each rank's error message
// through a pipe, and stops every rank on the first failure or at the time limit.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "comm/communicator_detail.h"
#include "misc/io.h"
#include "mpu/error.h"
#include "mpu/launch.h"
#include "process/supervisor.h"

namespace mpu {

std::shared_ptr<Communicator> SpawnContext::make_communicator() const {
  MPU_CHECK(store,
            "SpawnContext::make_communicator: no store; spawn() ran with "
            "SpawnOptions::store = false");
  return mpu::make_communicator(device, store, rank, world_size, timeout);
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::size_t kMaxMessageBytes = 64 * 1024;
constexpr std::chrono::milliseconds kSupervisePoll{20};

// The parent's end of a rank's message pipe and what came through it.
struct Pipe {
  int fd = -1;  // -1 once closed
  std::string message;

  // Reads what is available; closes the pipe at end of file.
  void drain() {
    char buffer[4096];
    while (fd >= 0) {
      const ssize_t n = ::read(fd, buffer, sizeof(buffer));
      if (n > 0) {
        if (message.size() < kMaxMessageBytes) message.append(buffer, static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      close();
    }
  }
  void close() noexcept {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

bool succeeded(int status) {
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

int run_child(int rank, int n, const torch::Device& device, int port, int write_fd, pid_t parent,
              const std::function<void(const SpawnContext&)>& fn, const SpawnOptions& options) {
  // Die with the parent; if it is already gone, do not run at all.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) return 1;
  // A rank starts with the default disposition of the signals that stop or crash it, whatever
  // handlers the parent installed (a test framework's, say): SIGTERM from spawn() must end it,
  // and a crash must show as its signal.
  for (int sig : {SIGTERM, SIGINT, SIGQUIT, SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    ::signal(sig, SIG_DFL);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  try {
    if (options.threads_per_rank > 0) at::set_num_threads(options.threads_per_rank);
    SpawnContext context;
    context.rank = rank;
    context.world_size = n;
    context.device = device;
    context.timeout = options.timeout;
    if (port > 0) context.store = connect_store("127.0.0.1", port, options.timeout);
    fn(context);
    return 0;
  } catch (...) {
    std::string message = detail::current_exception_text();
    if (message.empty()) message = "(an exception with an empty message)";
    // Best effort: a lost message still leaves the exit status.
    (void)detail::write_all(write_fd, message.data(), std::min(message.size(), kMaxMessageBytes));
    return 1;
  }
}

std::vector<torch::Device> spawn_devices(int n) {
  const int gpus = local_gpu_count();
  if (gpus == 0) return std::vector<torch::Device>(static_cast<std::size_t>(n), torch::kCPU);
  MPU_CHECK(n <= gpus, "spawn: ", n, " ranks, but only ", gpus,
            " GPUs are visible; start fewer ranks or pass SpawnOptions::devices");
  std::vector<torch::Device> devices;
  for (int i = 0; i < n; ++i) devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
  return devices;
}

// Restores SIGCHLD's default disposition while spawn() runs, when it was ignored or set to not
// keep zombies: otherwise the kernel reaps the ranks and their exit statuses are lost.
class ChildStatusGuard {
 public:
  ChildStatusGuard() {
    struct sigaction current {};
    if (::sigaction(SIGCHLD, nullptr, &current) != 0) return;
    if (current.sa_handler != SIG_IGN && (current.sa_flags & SA_NOCLDWAIT) == 0) return;
    struct sigaction standard {};
    standard.sa_handler = SIG_DFL;
    sigemptyset(&standard.sa_mask);
    changed_ = ::sigaction(SIGCHLD, &standard, &saved_) == 0;
  }
  ~ChildStatusGuard() {
    if (changed_) ::sigaction(SIGCHLD, &saved_, nullptr);
  }
  ChildStatusGuard(const ChildStatusGuard&) = delete;
  ChildStatusGuard& operator=(const ChildStatusGuard&) = delete;

 private:
  struct sigaction saved_ {};
  bool changed_ = false;
};

}  // namespace

void spawn(int n, const std::function<void(const SpawnContext&)>& fn, const SpawnOptions& options) {
  MPU_CHECK(n >= 1, "spawn: the number of ranks must be at least 1, got ", n);
  MPU_CHECK(static_cast<bool>(fn), "spawn: the function to run is empty");
  const std::vector<torch::Device> devices =
      options.devices.empty() ? spawn_devices(n) : options.devices;
  MPU_CHECK(static_cast<int>(devices.size()) == n, "spawn: ", devices.size(),
            " devices in SpawnOptions::devices for ", n, " ranks");
  const bool any_cuda = std::any_of(devices.begin(), devices.end(),
                                    [](const torch::Device& d) { return d.is_cuda(); });
  MPU_CHECK(!any_cuda || !cuda_initialized(),
            "spawn: CUDA is already initialised in this process, so forked ranks cannot use "
            "their GPUs; call spawn() first in main, before any CUDA or torch::cuda call (count "
            "GPUs with mpu::local_gpu_count())");

  // The store server's thread exists at the forks; the ranks only connect to it as clients,
  // and never touch the server's state that the thread may hold locked.
  StoreServer server;
  if (options.store) server = serve_store(0, options.timeout);
  const ChildStatusGuard child_status;

  const pid_t parent = ::getpid();
  // Declared after `pipes`, so destroyed first: a rank still running is killed and reaped
  // (spawn() itself failed) before its pipe closes.
  std::vector<Pipe> pipes(static_cast<std::size_t>(n));
  detail::Supervisor ranks;
  for (int rank = 0; rank < n; ++rank) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
      const int err = errno;
      MPU_THROW(CommError, "spawn: pipe() for rank ", rank, " failed: ", std::strerror(err));
    }
    try {
      ranks.fork(detail::cat("spawn: rank ", rank, " of ", n), [&]() -> int {
        ::close(fds[0]);
        for (int earlier = 0; earlier < rank; ++earlier) pipes[earlier].close();
        return run_child(rank, n, devices[rank], server.port, fds[1], parent, fn, options);
      });
    } catch (...) {
      ::close(fds[0]);
      ::close(fds[1]);
      throw;
    }
    ::close(fds[1]);
    ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    pipes[rank].fd = fds[0];
  }

  // Supervise: collect messages, reap exits, stop everyone on the first failure.
  std::vector<int> status(static_cast<std::size_t>(n), 0);
  const auto start = Clock::now();
  int first_failure = -1;
  bool timed_out = false;
  bool stopping = false;
  bool killed = false;
  Clock::time_point stop_time;
  auto begin_stop = [&] {
    if (stopping) return;
    stopping = true;
    stop_time = Clock::now();
    ranks.signal_running(SIGTERM);
  };
  std::vector<bool> done(static_cast<std::size_t>(n), false);
  int running = n;
  while (running > 0) {
    std::vector<pollfd> fds;
    for (const Pipe& pipe : pipes) {
      if (pipe.fd >= 0) fds.push_back(pollfd{pipe.fd, POLLIN, 0});
    }
    if (fds.empty()) {
      std::this_thread::sleep_for(kSupervisePoll);
    } else {
      (void)::poll(fds.data(), fds.size(), static_cast<int>(kSupervisePoll.count()));
    }
    for (int rank = 0; rank < n; ++rank) {
      const auto i = static_cast<std::size_t>(rank);
      pipes[i].drain();
      if (done[i] || !ranks.reap(i)) continue;
      done[i] = true;
      --running;
      pipes[i].drain();
      // SIGCHLD ignored despite the guard (another thread changed it): judge by the message
      // the rank left, since a rank that throws always leaves one.
      status[i] =
          ranks.status_lost(i) ? (pipes[i].message.empty() ? 0 : (1 << 8)) : ranks.status(i);
      if (!succeeded(status[i]) && !ranks.signalled(i) && first_failure < 0) {
        first_failure = rank;
        begin_stop();
      }
    }
    const auto now = Clock::now();
    if (!stopping && options.time_limit.count() > 0 && now - start > options.time_limit) {
      timed_out = true;
      begin_stop();
    }
    if (stopping && !killed && now - stop_time > options.grace) {
      killed = true;
      ranks.signal_running(SIGKILL);
    }
  }
  for (Pipe& pipe : pipes) pipe.close();

  auto describe_rank = [&](int rank) {
    const std::string message = trimmed(pipes[rank].message);
    return detail::cat("rank ", rank, " of ", n, " (", devices[rank].str(), ") ",
                       detail::describe_wait_status(status[rank]), ": ",
                       message.empty() ? "(no error message)" : message);
  };
  if (first_failure >= 0 || timed_out) {
    std::string others;
    std::vector<int> stopped;
    for (int rank = 0; rank < n; ++rank) {
      if (rank == first_failure) continue;
      const auto i = static_cast<std::size_t>(rank);
      if (ranks.signalled(i) && (!WIFEXITED(status[i]) || pipes[i].message.empty())) {
        stopped.push_back(rank);
      } else if (!succeeded(status[i])) {
        others += "\n  also: " + describe_rank(rank);
      }
    }
    std::string stopped_text;
    if (!stopped.empty()) {
      stopped_text = "\n  stopped: rank";
      for (std::size_t i = 0; i < stopped.size(); ++i) {
        stopped_text += detail::cat(i == 0 ? " " : ", ", stopped[i]);
      }
    }
    if (first_failure >= 0) {
      MPU_THROW(CommError, "spawn: ", describe_rank(first_failure), others, stopped_text);
    }
    MPU_THROW(Timeout, "spawn: the ranks did not all finish within ",
              detail::seconds_text(options.time_limit), others, stopped_text);
  }
}

}  // namespace mpu
