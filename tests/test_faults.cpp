// Fault injection (issue #9, docs/reliability.md): workers that die, a master that dies, a rank
// that hangs, signals, and bad input. CPU through Gloo here; the [cuda]/[nccl] cases need GPUs.
//
// Every test that forks an updater does so from a run_isolated child, never from the test
// process; a "master" that must die is a further fork of that child, which makes itself a child
// subreaper so that it inherits, and can reap and time, the dead master's workers.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "catch_torch.h"
#include "messages.h"
#include "remove_tree.h"

#include <ATen/Parallel.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "mpu/communicator.h"
#include "mpu/datasets.h"
#include "mpu/error.h"
#include "mpu/extensions.h"
#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/trainer.h"
#include "mpu/updater.h"
#include "multiprocess.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr std::int64_t kFeatures = 4;
constexpr std::int64_t kBatch = 4;
constexpr std::int64_t kExamples = 64;  // per rank

using Devs = std::vector<torch::Device>;

// Inside a forked child, where Catch2's macros must not be used: throws when `cond` is false.
void ensure(bool cond, const std::string& what) {
  if (!cond) throw std::runtime_error("check failed in the child: " + what);
}

std::vector<torch::Device> cpus(int n) {
  return std::vector<torch::Device>(static_cast<std::size_t>(n), torch::kCPU);
}

std::shared_ptr<torch::nn::LinearImpl> make_net(std::int64_t outputs = 2) {
  mpu::manual_seed(7);
  return torch::nn::Linear(kFeatures, outputs).ptr();
}

// Rank r's data: random features whose column 0 is r, so that the loss function knows which
// rank's process it runs in.
std::shared_ptr<mpu::Iterator> rank_iterator(int rank, std::int64_t examples = kExamples) {
  mpu::manual_seed(100 + static_cast<std::uint64_t>(rank));
  auto x = torch::randn({examples, kFeatures});
  x.select(1, 0).fill_(static_cast<double>(rank));
  auto y = torch::zeros({examples, 2});
  return std::make_shared<mpu::Iterator>(std::make_shared<mpu::TensorDataset>(x, y),
                                         mpu::IteratorOptions(kBatch).prefetch(false));
}

std::vector<std::shared_ptr<mpu::Iterator>> rank_iterators(int n) {
  std::vector<std::shared_ptr<mpu::Iterator>> its;
  for (int r = 0; r < n; ++r) its.push_back(rank_iterator(r));
  return its;
}

enum class Fault { kNone, kSigkill, kAbort, kThrow, kExit, kSleep, kOutOfMemory };

[[maybe_unused]] const char* fault_name(Fault f) {
  switch (f) {
    case Fault::kNone:
      return "none";
    case Fault::kSigkill:
      return "SIGKILL";
    case Fault::kAbort:
      return "abort()";
    case Fault::kThrow:
      return "an exception";
    case Fault::kExit:
      return "_exit(7)";
    case Fault::kSleep:
      return "a hang";
    case Fault::kOutOfMemory:
      return "out of memory";
  }
  return "?";
}

// The loss function of every process; in the process of rank `victim`, its `at_call`-th call
// injects `fault` (sleeping `sleep` for kSleep). The count is per process: after the fork each
// process has its own.
mpu::LossFunction faulty_loss(std::shared_ptr<torch::nn::LinearImpl> net, int victim, int at_call,
                              Fault fault, milliseconds sleep = milliseconds(30000)) {
  auto calls = std::make_shared<int>(0);
  return [=](const mpu::Batch& b) {
    const int rank = static_cast<int>(b.data[0][0].item<float>());
    if (rank == victim && ++*calls == at_call) {
      switch (fault) {
        case Fault::kNone:
          break;
        case Fault::kSigkill:
          ::raise(SIGKILL);
          break;
        case Fault::kAbort: {
          const rlimit no_core{0, 0};
          ::setrlimit(RLIMIT_CORE, &no_core);
          ::signal(SIGABRT, SIG_DFL);  // not Catch2's handler, inherited through the fork
          std::abort();
        }
        case Fault::kThrow:
          throw std::runtime_error("injected failure in the loss function");
        case Fault::kExit:
          ::_exit(7);
        case Fault::kSleep:
          std::this_thread::sleep_for(sleep);
          break;
        case Fault::kOutOfMemory:
          // Far more than any GPU has: the caching allocator throws its out-of-memory error.
          (void)torch::empty({std::int64_t{1} << 40}, b.data.options());
          break;
      }
    }
    auto y = net->forward(b.data);
    auto loss = (y - b.target).pow(2).mean();
    mpu::report("loss", loss);
    return loss;
  };
}

torch::Tensor text_tensor(const std::string& s) {
  return torch::tensor(std::vector<std::uint8_t>(s.begin(), s.end()), torch::kUInt8);
}

std::string tensor_text(const torch::Tensor& t) {
  auto c = t.contiguous();
  return std::string(reinterpret_cast<const char*>(c.data_ptr<std::uint8_t>()),
                     static_cast<std::size_t>(c.numel()));
}

// True when no process `pid` exists any more: reaped, not a zombie.
bool gone(int pid) {
  return ::kill(pid, 0) == -1 && errno == ESRCH;
}

// How many of `pids` still exist (running or zombie).
std::int64_t count_alive(const std::vector<int>& pids) {
  std::int64_t alive = 0;
  for (int pid : pids) alive += gone(pid) ? 0 : 1;
  return alive;
}

// Sends stderr to a file while alive; `text()` reads what was written.
class StderrCapture {
 public:
  StderrCapture()
      : path_(
            (fs::temp_directory_path() / ("mpu_faults_stderr_" + std::to_string(::getpid()) + "_" +
                                          std::to_string(Clock::now().time_since_epoch().count())))
                .string()) {
    std::fflush(stderr);
    saved_ = ::dup(STDERR_FILENO);
    const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(fd, STDERR_FILENO);
    ::close(fd);
  }
  ~StderrCapture() {
    restore();
    std::remove(path_.c_str());
  }
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
  }
  std::string text() const {
    std::ifstream in(path_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

 private:
  std::string path_;
  int saved_ = -1;
};

using mpu::test::message_of;

// A fresh directory, removed afterwards.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(fs::temp_directory_path() /
              ("mpu_faults_" + std::to_string(::getpid()) + "_" + name)) {
    mpu::test::remove_tree(path_.string());
    fs::create_directories(path_);
  }
  ~TempDir() { mpu::test::remove_tree(path_.string()); }
  std::string str() const { return path_.string(); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

void write_all(int fd, const std::string& s) {
  const char* p = s.data();
  std::size_t n = s.size();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w <= 0) return;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

// Reads one '\n'-terminated line from `fd` (without the '\n'); "" on EOF or after `timeout`.
std::string read_line(int fd, milliseconds timeout) {
  std::string line;
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    char c = 0;
    const ssize_t r = ::read(fd, &c, 1);
    if (r == 1) {
      if (c == '\n') return line;
      line += c;
    } else if (r == 0) {
      return line;
    } else if (errno != EINTR && errno != EAGAIN) {
      return line;
    } else {
      std::this_thread::sleep_for(milliseconds(5));
    }
  }
  return line;
}

std::vector<int> parse_ints(const std::string& line) {
  std::istringstream in(line);
  std::vector<int> out;
  int v = 0;
  while (in >> v) out.push_back(v);
  return out;
}

}  // namespace

// --- 1. A worker dies during training ----------------------------------------------------------

TEST_CASE("A worker that dies makes the master throw CommError naming it, in bounded time",
          "[faults][multiprocess]") {
  const Fault fault = GENERATE(Fault::kSigkill, Fault::kAbort, Fault::kThrow, Fault::kExit);
  INFO("fault: " << fault_name(fault));
  constexpr milliseconds kBound{3000};
  // Worker 2 of 3 fails in its loss function at its 3rd iteration.
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions options;
    options.worker_death_timeout = kBound;
    mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(3),
                                             faulty_loss(net, 2, 3, fault), cpus(3), options);
    updater.update();
    updater.update();
    const std::vector<int> pids = updater.worker_pids();
    std::string what = "nothing was thrown";
    bool comm_error = false;
    const auto start = Clock::now();
    try {
      updater.update();
    } catch (const mpu::CommError& e) {
      comm_error = true;
      what = e.what();
    } catch (const std::exception& e) {
      what = std::string("not a CommError: ") + e.what();
    }
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    return std::vector<torch::Tensor>{
        text_tensor(what),
        torch::tensor({static_cast<std::int64_t>(comm_error),
                       static_cast<std::int64_t>(elapsed.count()), count_alive(pids),
                       static_cast<std::int64_t>(pids.at(1))})};
  });
  const std::string what = tensor_text(out[0]);
  const auto facts = out[1];
  INFO(what);
  CHECK(facts[0].item<std::int64_t>() == 1);
  CHECK(facts[1].item<std::int64_t>() < kBound.count());
  CHECK(facts[2].item<std::int64_t>() == 0);  // every worker reaped: none running, no zombie
  const std::string worker2 =
      "worker 2 (cpu, pid " + std::to_string(facts[3].item<std::int64_t>()) + ") ";
  CHECK_THAT(what, Catch::Contains(worker2));
  switch (fault) {
    case Fault::kSigkill:
      CHECK_THAT(what, Catch::Contains("was killed by signal 9"));
      break;
    case Fault::kAbort:
      CHECK_THAT(what, Catch::Contains("was killed by signal 6"));
      break;
    case Fault::kThrow:
      CHECK_THAT(what, Catch::Contains("exited with status 2 (it failed): ") &&
                           Catch::Contains("injected failure in the loss function"));
      break;
    case Fault::kExit:
      CHECK_THAT(what, Catch::Contains("exited with status 7"));
      break;
    default:
      break;
  }
}

TEST_CASE("The master's own failure stops the workers at once and passes its message on",
          "[faults][multiprocess]") {
  // The master's loss function throws while the workers wait for it in a collective: they are
  // stopped through their sockets, without waiting for the (default, 10 s) bound.
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(3),
                                             faulty_loss(net, 0, 2, Fault::kThrow), cpus(3));
    updater.update();
    const std::vector<int> pids = updater.worker_pids();
    std::string what = "nothing was thrown";
    const auto start = Clock::now();
    try {
      updater.update();
    } catch (const mpu::Error& e) {
      what = e.what();
    }
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    return std::vector<torch::Tensor>{
        text_tensor(what),
        torch::tensor({static_cast<std::int64_t>(elapsed.count()), count_alive(pids)})};
  });
  const std::string what = tensor_text(out[0]);
  INFO(what);
  CHECK_THAT(what, Catch::Contains("injected failure in the loss function"));
  CHECK(out[1][0].item<std::int64_t>() < mpu::kDefaultWorkerDeathTimeout.count() / 4);
  CHECK(out[1][1].item<std::int64_t>() == 0);
}

TEST_CASE("After a worker dies, the last snapshot is intact and resuming from it continues exactly",
          "[faults][multiprocess][snapshot]") {
  constexpr int kTotal = 6;
  TempDir dir("resume");
  auto train = [&](int iterations, Fault fault, const std::string& resume_from) {
    return mpu::test::run_isolated([&] {
      at::set_num_threads(1);
      auto net = make_net();
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
      mpu::UpdaterOptions options;
      options.worker_death_timeout = milliseconds(3000);
      // Worker 1 is killed in its 4th iteration: snapshots 1..3 exist.
      mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(2),
                                               faulty_loss(net, 1, 4, fault), cpus(2), options);
      mpu::Trainer trainer(updater, mpu::stop_after_iterations(iterations), dir.str());
      trainer.extend(mpu::Snapshot(), mpu::every_iterations(1));
      if (!resume_from.empty()) trainer.resume(resume_from);
      std::int64_t failed = 0;
      try {
        trainer.run();
      } catch (const mpu::CommError&) {
        failed = 1;
      }
      std::vector<torch::Tensor> out{torch::tensor({failed, updater.iteration()})};
      for (const auto& p : net->parameters()) out.push_back(p.detach().clone());
      return out;
    });
  };
  const auto crashed = train(kTotal, Fault::kSigkill, "");
  CHECK(crashed[0][0].item<std::int64_t>() == 1);
  const auto latest = mpu::find_latest_snapshot(dir.str());
  REQUIRE(latest.has_value());
  CHECK(fs::path(*latest).filename() == "snapshot_iter_3");
  const auto resumed = train(kTotal, Fault::kNone, *latest);
  CHECK(resumed[0][0].item<std::int64_t>() == 0);
  CHECK(resumed[0][1].item<std::int64_t>() == kTotal);
  mpu::test::remove_tree(dir.str());
  fs::create_directories(dir.str());
  const auto reference = train(kTotal, Fault::kNone, "");
  REQUIRE(resumed.size() == reference.size());
  for (std::size_t i = 1; i < reference.size(); ++i) {
    INFO("parameter " << i - 1 << ": " << mpu::test::first_difference(resumed[i], reference[i]));
    CHECK(mpu::test::first_difference(resumed[i], reference[i]).empty());
  }
}

namespace {
void on_sigpipe(int /*signal*/) {}
}  // namespace

TEST_CASE("A communicator makes a write to a vanished peer an error, not a SIGPIPE death",
          "[faults]") {
  // Gloo writes to its sockets without MSG_NOSIGNAL: with SIGPIPE at its default, a rank that
  // writes to a dead peer would die of the signal before it could report anything.
  const bool own_handler = GENERATE(false, true);
  INFO("the program installed its own SIGPIPE handler: " << own_handler);
  auto out = mpu::test::run_isolated([&] {
    ::signal(SIGPIPE, own_handler ? on_sigpipe : SIG_DFL);
    auto comm = mpu::make_gloo_communicator(c10::make_intrusive<c10d::HashStore>(), 0, 1,
                                            std::chrono::seconds(10));
    struct sigaction now {};
    ::sigaction(SIGPIPE, nullptr, &now);
    const std::int64_t disposition = now.sa_handler == SIG_IGN      ? 0
                                     : now.sa_handler == on_sigpipe ? 1
                                                                    : 2;
    // A socket whose peer has closed: the write fails with EPIPE, and this process lives on.
    int fds[2] = {-1, -1};
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
    ::close(fds[1]);
    const char byte = 'x';
    const ssize_t written = ::write(fds[0], &byte, 1);
    const int error = errno;
    ::close(fds[0]);
    return std::vector<torch::Tensor>{torch::tensor(
        {disposition, static_cast<std::int64_t>(written), static_cast<std::int64_t>(error)})};
  });
  CHECK(out[0][0].item<std::int64_t>() == (own_handler ? 1 : 0));
  CHECK(out[0][1].item<std::int64_t>() == -1);
  CHECK(out[0][2].item<std::int64_t>() == EPIPE);
}

TEST_CASE("A worker that dies before a snapshot fails the snapshot, and the previous file is kept",
          "[faults][multiprocess][snapshot]") {
  TempDir dir("save");
  const std::string path = dir / "snapshot";
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions options;
    options.worker_death_timeout = milliseconds(3000);
    mpu::MultiprocessParallelUpdater updater(
        net, opt, rank_iterators(2), faulty_loss(net, -1, 0, Fault::kNone), cpus(2), options);
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
    updater.update();
    trainer.save_snapshot(path);
    const auto size = static_cast<std::int64_t>(fs::file_size(path));
    updater.update();
    const int worker = updater.worker_pids().at(0);
    ::kill(worker, SIGKILL);
    std::string what = "nothing was thrown";
    try {
      trainer.save_snapshot(path);
    } catch (const mpu::CommError& e) {
      what = e.what();
    }
    return std::vector<torch::Tensor>{
        text_tensor(what), torch::tensor({size, static_cast<std::int64_t>(worker),
                                          static_cast<std::int64_t>(fs::file_size(path))})};
  });
  const std::string what = tensor_text(out[0]);
  INFO(what);
  CHECK_THAT(what, Catch::Contains("MultiprocessParallelUpdater::save (iterator state): worker 1 "
                                   "(cpu, pid " +
                                   std::to_string(out[1][1].item<std::int64_t>()) +
                                   ") was killed by signal 9"));
  CHECK(out[1][2].item<std::int64_t>() == out[1][0].item<std::int64_t>());
  // The file of the first save still loads: iteration 1.
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(2),
                                           faulty_loss(net, -1, 0, Fault::kNone), cpus(2));
  mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
  trainer.resume(path);
  CHECK(updater.iteration() == 1);
}

TEST_CASE("A GPU worker killed, or out of memory, makes the master throw CommError naming it",
          "[faults][multiprocess][cuda][nccl]") {
  if (mpu::local_gpu_count() < 2) {
    WARN("skipped: needs 2 GPUs, this machine has " << mpu::local_gpu_count());
    return;
  }
  // NCCL would wait for the dead worker until the collective timeout (300 s): the master's
  // watch must abort the communicator.
  const Fault fault = GENERATE(Fault::kOutOfMemory, Fault::kSigkill);
  INFO("fault: " << fault_name(fault));
  constexpr milliseconds kBound{5000};
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions options;
    options.worker_death_timeout = kBound;
    mpu::MultiprocessParallelUpdater updater(
        net, opt, rank_iterators(2), faulty_loss(net, 1, 2, fault),
        std::vector<torch::Device>{torch::Device("cuda:0"), torch::Device("cuda:1")}, options);
    updater.update();
    const std::vector<int> pids = updater.worker_pids();
    std::string what = "nothing was thrown";
    const auto start = Clock::now();
    try {
      // NCCL collectives do not block the host: the failure may surface an update later.
      for (int i = 0; i < 4; ++i) {
        updater.update();
        (void)net->weight.sum().item<float>();
      }
    } catch (const mpu::CommError& e) {
      what = e.what();
    }
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    return std::vector<torch::Tensor>{
        text_tensor(what),
        torch::tensor({static_cast<std::int64_t>(elapsed.count()), count_alive(pids)})};
  });
  const std::string what = tensor_text(out[0]);
  INFO(what);
  CHECK_THAT(what, Catch::Contains("worker 1 (cuda:1, pid "));
  if (fault == Fault::kOutOfMemory) {
    CHECK_THAT(what, Catch::Contains("exited with status 2 (it failed)") &&
                         Catch::Contains("out of memory"));
  } else {
    CHECK_THAT(what, Catch::Contains("was killed by signal 9"));
  }
  CHECK(out[1][0].item<std::int64_t>() < 2 * kBound.count());
  CHECK(out[1][1].item<std::int64_t>() == 0);
}

// --- 2. The master dies -------------------------------------------------------------------------

TEST_CASE("When the master dies, its workers exit within the bound, also one busy in user code",
          "[faults][multiprocess]") {
  // Worker 2 sleeps in its loss function (30 s) when the master is killed, worker 1 waits in a
  // collective: only the worker's watch of its master can end worker 2 in time.
  constexpr milliseconds kBound{2000};
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    ensure(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    int fds[2];
    ensure(::pipe(fds) == 0, "pipe");
    std::fflush(nullptr);
    const pid_t master = ::fork();
    if (master == 0) {
      ::close(fds[0]);
      try {
        auto net = make_net();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
        mpu::UpdaterOptions options;
        options.worker_death_timeout = kBound;
        mpu::MultiprocessParallelUpdater updater(
            net, opt, rank_iterators(3), faulty_loss(net, 2, 2, Fault::kSleep), cpus(3), options);
        updater.update();
        std::string line;
        for (int pid : updater.worker_pids()) line += std::to_string(pid) + " ";
        write_all(fds[1], line + "\n");
        updater.update();  // worker 2 sleeps; the master is killed in here
      } catch (...) {
      }
      ::_exit(1);
    }
    ::close(fds[1]);
    const std::vector<int> pids = parse_ints(read_line(fds[0], milliseconds(60000)));
    ::close(fds[0]);
    ensure(pids.size() == 2, "the master did not send its workers' pids");
    std::this_thread::sleep_for(milliseconds(500));  // worker 2 is asleep in its loss function
    ::kill(master, SIGKILL);
    const auto start = Clock::now();
    int status = 0;
    ::waitpid(master, &status, 0);
    // This process is the subreaper: the orphaned workers are its children now.
    std::vector<std::int64_t> statuses(pids.size(), -1);
    std::size_t reaped = 0;
    while (reaped < pids.size() && Clock::now() - start < milliseconds(20000)) {
      for (std::size_t i = 0; i < pids.size(); ++i) {
        if (statuses[i] != -1) continue;
        int st = 0;
        if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
          statuses[i] = st;
          ++reaped;
        }
      }
      std::this_thread::sleep_for(milliseconds(5));
    }
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    for (std::size_t i = 0; i < pids.size(); ++i) {
      if (statuses[i] == -1) ::kill(pids[i], SIGKILL);
    }
    return std::vector<torch::Tensor>{torch::tensor({static_cast<std::int64_t>(elapsed.count()),
                                                     static_cast<std::int64_t>(reaped)}),
                                      torch::tensor(statuses)};
  });
  CHECK(out[0][1].item<std::int64_t>() == 2);
  CHECK(out[0][0].item<std::int64_t>() < kBound.count());
  for (int i = 0; i < 2; ++i) {
    const int status = static_cast<int>(out[1][i].item<std::int64_t>());
    INFO("worker " << i + 1 << " wait status " << status);
    // They exit on their own (status 4: a collective failed; 5: the master is gone), not killed.
    CHECK(WIFEXITED(status));
    CHECK((WEXITSTATUS(status) == 4 || WEXITSTATUS(status) == 5));
  }
  // The sleeping worker can only have noticed through its watch.
  CHECK(WEXITSTATUS(static_cast<int>(out[1][1].item<std::int64_t>())) == 5);
}

// --- 3. A rank hangs in user code ---------------------------------------------------------------

TEST_CASE("A rank that hangs makes the others throw Timeout, logged with collective and number",
          "[faults][multiprocess]") {
  constexpr milliseconds kTimeout{2000};
  mpu::test::RunOptions run_options;
  run_options.timeout = kTimeout;
  run_options.time_limit = milliseconds(60000);
  mpu::test::run_ranks(
      2,
      [&](const mpu::SpawnContext& ctx) {
        auto net = make_net();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
        // Rank 1 sleeps 3.5 s in its 2nd loss: rank 0 waits in that step's first collective.
        mpu::DistributedUpdater updater(net, opt, rank_iterator(ctx.rank),
                                        faulty_loss(net, 1, 2, Fault::kSleep, milliseconds(3500)),
                                        ctx.make_communicator());
        updater.update();
        if (ctx.rank == 1) {
          MPU_EXPECT_THROWS(updater.update(), mpu::CommError, "(gloo, rank 1 of 2)");
          return;
        }
        StderrCapture capture;
        const auto start = Clock::now();
        std::string what = "nothing was thrown";
        try {
          updater.update();
        } catch (const mpu::Timeout& e) {
          what = e.what();
        } catch (const std::exception& e) {
          what = std::string("not a Timeout: ") + e.what();
        }
        const auto elapsed = Clock::now() - start;
        capture.restore();
        const std::string log = capture.text();
        MPU_EXPECT(elapsed >= kTimeout * 9 / 10 && elapsed < kTimeout + milliseconds(2000),
                   "rank 0 threw after ", std::chrono::duration_cast<milliseconds>(elapsed).count(),
                   " ms");
        MPU_EXPECT(what.find("timed out after 2") != std::string::npos, what);
        const std::regex line(
            "(reduce|allreduce|reduce_scatter|broadcast|allgather) #[0-9]+ \\(gloo, rank 0 of 2\\) "
            "timed out after 2");
        MPU_EXPECT(std::regex_search(log, line), "the log lacks the collective: ", log);
      },
      run_options);
}

TEST_CASE("A worker that hangs makes the master throw Timeout, and the hung worker is stopped",
          "[faults][multiprocess]") {
  constexpr milliseconds kTimeout{2000};
  constexpr milliseconds kBound{2000};
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::UpdaterOptions options;
    options.timeout = kTimeout;
    options.worker_death_timeout = kBound;
    mpu::MultiprocessParallelUpdater updater(
        net, opt, rank_iterators(2), faulty_loss(net, 1, 2, Fault::kSleep), cpus(2), options);
    updater.update();
    const std::vector<int> pids = updater.worker_pids();
    StderrCapture capture;
    std::string what = "nothing was thrown";
    const auto start = Clock::now();
    try {
      updater.update();
    } catch (const mpu::Timeout& e) {
      what = e.what();
    } catch (const std::exception& e) {
      what = std::string("not a Timeout: ") + e.what();
    }
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    capture.restore();
    return std::vector<torch::Tensor>{
        text_tensor(what), text_tensor(capture.text()),
        torch::tensor({static_cast<std::int64_t>(elapsed.count()), count_alive(pids)})};
  });
  const std::string what = tensor_text(out[0]);
  const std::string log = tensor_text(out[1]);
  INFO(what << "\nlog:\n" << log);
  CHECK_THAT(what, Catch::Contains("(gloo, rank 0 of 2) timed out after 2"));
  CHECK(std::regex_search(log, std::regex("(reduce|allreduce|reduce_scatter|broadcast|allgather) "
                                          "#[0-9]+ \\(gloo, rank 0 of 2\\) timed out after 2")));
  CHECK(out[2][0].item<std::int64_t>() < (kTimeout + kBound + milliseconds(1000)).count());
  CHECK(out[2][1].item<std::int64_t>() == 0);
}

// --- 7. Signals ---------------------------------------------------------------------------------

TEST_CASE("SIGTERM or SIGINT stops the master and every worker, with a final snapshot if asked",
          "[faults][multiprocess][snapshot]") {
  const int sig = GENERATE(SIGTERM, SIGINT);
  const bool snapshot = sig == SIGTERM;
  INFO("signal " << sig << (snapshot ? ", with a snapshot on interrupt" : ""));
  TempDir dir("signal_" + std::to_string(sig));
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    int fds[2];
    ensure(::pipe(fds) == 0, "pipe");
    std::fflush(nullptr);
    const pid_t master = ::fork();
    if (master == 0) {
      ::close(fds[0]);
      ::setpgid(0, 0);
      // A program's defaults, not the handlers Catch2 installed in the test process.
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM,
               SIG_DFL);  // a process group of its own, as a job in a shell: the workers join it
      int code = 99;
      try {
        auto net = make_net();
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
        auto loss = faulty_loss(net, -1, 0, Fault::kNone);
        auto slow_loss = [loss](const mpu::Batch& b) {
          std::this_thread::sleep_for(milliseconds(5));
          return loss(b);
        };
        mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(2), slow_loss, cpus(2));
        mpu::Trainer trainer(updater, mpu::stop_after_iterations(1000000), dir.str());
        mpu::Snapshot snap;
        if (snapshot) snap.write_on_interrupt();
        trainer.extend(snap, mpu::every_iterations(1000000));
        std::vector<int> pids;
        trainer.extend(mpu::make_extension("announce", [&](mpu::Trainer& t) {
          if (t.updater().iteration() != 1) return;
          pids = updater.worker_pids();
          write_all(fds[1], std::to_string(pids.at(0)) + "\n");
        }));
        try {
          trainer.run();
        } catch (const mpu::Interrupted& e) {
          const bool all_gone = count_alive(pids) == 0 && updater.worker_pids().empty();
          write_all(fds[1], std::to_string(e.signal()) + " " + std::to_string(updater.iteration()) +
                                " " + std::to_string(all_gone ? 1 : 0) + "\n");
          code = 128 + e.signal();
        }
      } catch (...) {
      }
      ::_exit(code);
    }
    ::close(fds[1]);
    const auto worker = parse_ints(read_line(fds[0], milliseconds(60000)));
    ensure(worker.size() == 1, "the master did not announce its worker");
    std::this_thread::sleep_for(milliseconds(300));
    // SIGINT to the whole group, as Ctrl-C does; SIGTERM to the master alone.
    ::kill(sig == SIGINT ? -master : master, sig);
    const auto result = parse_ints(read_line(fds[0], milliseconds(30000)));
    ::close(fds[0]);
    int status = 0;
    ::waitpid(master, &status, 0);
    std::vector<std::int64_t> facts{status, static_cast<std::int64_t>(result.size())};
    for (int v : result) facts.push_back(v);
    facts.push_back(gone(worker[0]) ? 1 : 0);
    return std::vector<torch::Tensor>{torch::tensor(facts)};
  });
  const auto facts = out[0];
  const int status = static_cast<int>(facts[0].item<std::int64_t>());
  REQUIRE(facts[1].item<std::int64_t>() == 3);
  const std::int64_t caught = facts[2].item<std::int64_t>();
  const std::int64_t iteration = facts[3].item<std::int64_t>();
  CHECK(caught == sig);
  CHECK(iteration >= 1);
  CHECK(facts[4].item<std::int64_t>() == 1);  // the workers were stopped before run() threw
  CHECK(facts[5].item<std::int64_t>() == 1);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 128 + sig);
  const auto latest = mpu::find_latest_snapshot(dir.str());
  if (!snapshot) {
    CHECK_FALSE(latest.has_value());
    return;
  }
  REQUIRE(latest.has_value());
  CHECK(fs::path(*latest).filename() == "snapshot_iter_" + std::to_string(iteration));
  // It resumes: the updater comes back at that iteration (nothing forks before run()).
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(2),
                                           faulty_loss(net, -1, 0, Fault::kNone), cpus(2));
  mpu::Trainer trainer(updater, mpu::stop_after_iterations(1000000), dir.str());
  trainer.resume(*latest);
  CHECK(updater.iteration() == iteration);
}

// --- 6. Bad input -------------------------------------------------------------------------------

TEST_CASE("Bad input to the updaters is refused, naming the argument and the value", "[faults]") {
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  auto loss = faulty_loss(net, -1, 0, Fault::kNone);
  using Devs = std::vector<torch::Device>;
  using Its = std::vector<std::shared_ptr<mpu::Iterator>>;
  auto mpu_with = [&](std::shared_ptr<torch::nn::Module> model, Its its, Devs devs) {
    return message_of([&] {
      mpu::MultiprocessParallelUpdater u(std::move(model), opt, std::move(its), loss,
                                         std::move(devs));
    });
  };

  SECTION("an iterator count that differs from the device count") {
    CHECK_THAT(mpu_with(net, rank_iterators(3), cpus(4)),
               Catch::Contains("MultiprocessParallelUpdater: 3 iterators for 4 devices"));
  }
  SECTION("datasets of unequal length") {
    CHECK_THAT(mpu_with(net, Its{rank_iterator(0, 64), rank_iterator(1, 60)}, cpus(2)),
               Catch::Contains("the datasets differ in length: iterator 0 has 64 examples, "
                               "iterator 1 has 60"));
  }
  SECTION("a device listed twice") {
    CHECK_THAT(
        mpu_with(net, rank_iterators(3),
                 Devs{torch::Device("cuda:0"), torch::Device("cuda:1"), torch::Device("cuda:1")}),
        Catch::Contains("device cuda:1 is listed twice"));
  }
  SECTION("a device that is not present") {
    CHECK_THAT(
        mpu_with(net, rank_iterators(2), Devs{torch::Device("cuda:62"), torch::Device("cuda:63")}),
        Catch::Contains("device cuda:62 is not present; this machine has " +
                        std::to_string(mpu::local_gpu_count()) + " visible GPU(s)"));
  }
  SECTION("a model without parameters") {
    auto empty = std::make_shared<torch::nn::Module>();
    CHECK_THAT(mpu_with(empty, rank_iterators(2), cpus(2)),
               Catch::Contains("MultiprocessParallelUpdater: the model has no parameters"));
    CHECK_THAT(message_of([&] { mpu::StandardUpdater u(empty, opt, rank_iterator(0), loss); }),
               Catch::Contains("StandardUpdater: the model has no parameters"));
  }
  SECTION("a parameter on the meta device, beside one on the CPU") {
    // The meta check comes before the one-device check: a meta tensor has no storage, so the
    // useful message is that it must be materialised, not that it sits on another device.
    auto mixed = std::make_shared<torch::nn::Module>();
    mixed->register_parameter("a", torch::zeros({2}));
    mixed->register_parameter("b", torch::zeros({2}, torch::TensorOptions().device(torch::kMeta)));
    const std::string expected = "parameter 'b' is on the meta device (shape [2], no storage)";
    CHECK_THAT(mpu_with(mixed, rank_iterators(2), cpus(2)), Catch::Contains(expected));
    CHECK_THAT(message_of([&] { mpu::StandardUpdater u(mixed, opt, rank_iterator(0), loss); }),
               Catch::Contains("StandardUpdater: " + expected));
  }
  SECTION("integer parameters") {
    auto counting = std::make_shared<torch::nn::Module>();
    counting->register_parameter("w", torch::zeros({2}));
    counting->register_parameter("steps", torch::zeros({1}, torch::kLong), false);
    const std::string expected = "parameter 'steps' has dtype Long; only floating-point";
    CHECK_THAT(mpu_with(counting, rank_iterators(2), cpus(2)), Catch::Contains(expected));
    CHECK_THAT(message_of([&] { mpu::StandardUpdater u(counting, opt, rank_iterator(0), loss); }),
               Catch::Contains(expected) && Catch::Contains("register_buffer"));
  }
}

TEST_CASE("CUDA initialised before the fork is refused, at construction and at the first update",
          "[faults][multiprocess][cuda]") {
  if (mpu::local_gpu_count() < 2) {
    WARN("skipped: needs 2 GPUs, this machine has " << mpu::local_gpu_count());
    return;
  }
  auto out = mpu::test::run_isolated([&] {
    const Devs devices{torch::Device("cuda:0"), torch::Device("cuda:1")};
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    auto loss = faulty_loss(net, -1, 0, Fault::kNone);
    mpu::MultiprocessParallelUpdater built_first(net, opt, rank_iterators(2), loss, devices);
    (void)torch::cuda::device_count();  // initialises CUDA, as user code often does by accident
    const std::string at_update = message_of([&] { built_first.update(); });
    const std::string at_construction = message_of(
        [&] { mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(2), loss, devices); });
    return std::vector<torch::Tensor>{text_tensor(at_update), text_tensor(at_construction)};
  });
  CHECK_THAT(tensor_text(out[0]),
             Catch::Contains("CUDA was initialised after the updater was built and before its "
                             "first update()"));
  CHECK_THAT(tensor_text(out[1]), Catch::Contains("CUDA is already initialised in this process") &&
                                      Catch::Contains("mpu::local_gpus()"));
}

TEST_CASE("A snapshot of another model, or of another device count, is refused by name",
          "[faults][snapshot]") {
  TempDir dir("other_model");
  const std::string path = dir / "snapshot";
  {
    auto net = make_net(2);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(2),
                                       faulty_loss(net, -1, 0, Fault::kNone), cpus(2));
    mpu::Trainer trainer(u, mpu::stop_after_iterations(1), dir.str());
    trainer.save_snapshot(path);  // before any update: nothing forks
  }
  SECTION("another model") {
    auto net = make_net(3);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(2),
                                       faulty_loss(net, -1, 0, Fault::kNone), cpus(2));
    mpu::Trainer trainer(u, mpu::stop_after_iterations(1), dir.str());
    CHECK_THAT(message_of([&] { trainer.resume(path); }),
               Catch::Contains("snapshot '" + path + "' does not fit this trainer") &&
                   Catch::Contains("the model's parameter 'bias' is [3] Float, but the snapshot "
                                   "holds [2] Float; the snapshot is of a different model"));
  }
  SECTION("another number of devices") {
    auto net = make_net(2);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(3),
                                       faulty_loss(net, -1, 0, Fault::kNone), cpus(3));
    mpu::Trainer trainer(u, mpu::stop_after_iterations(1), dir.str());
    CHECK_THAT(message_of([&] { trainer.resume(path); }),
               Catch::Contains("the snapshot has no state for iterator 2") &&
                   Catch::Contains("this updater has 3"));
  }
}

TEST_CASE("A corrupt, truncated or empty snapshot file is refused by name and size",
          "[faults][snapshot]") {
  TempDir dir("corrupt");
  const std::string good = dir / "good";
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  mpu::StandardUpdater updater(net, opt, rank_iterator(0), faulty_loss(net, -1, 0, Fault::kNone));
  mpu::Trainer trainer(updater, mpu::stop_after_iterations(1), dir.str());
  trainer.save_snapshot(good);
  const auto size = fs::file_size(good);
  std::string bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto resume = [&](const std::string& content, const std::string& name) {
    const std::string path = dir / name;
    std::ofstream(path, std::ios::binary) << content;
    mpu::StandardUpdater u(net, opt, rank_iterator(0), faulty_loss(net, -1, 0, Fault::kNone));
    mpu::Trainer t(u, mpu::stop_after_iterations(1), dir.str());
    return std::make_pair(path, message_of([&] { t.resume(path); }));
  };
  {
    const auto [path, msg] = resume(bytes.substr(0, size / 2), "truncated");
    CHECK_THAT(msg, Catch::Contains("snapshot '" + path + "' (" + std::to_string(size / 2) +
                                    " bytes) is truncated or corrupt"));
  }
  {
    std::string garbage = bytes;
    for (std::size_t i = 0; i < 64 && i < garbage.size(); ++i) garbage[i] = '\x5a';
    const auto [path, msg] = resume(garbage, "corrupt");
    CHECK_THAT(msg, Catch::Contains("snapshot '" + path + "' (" + std::to_string(size) +
                                    " bytes) is truncated or corrupt"));
  }
  {
    const auto [path, msg] = resume("", "empty");
    CHECK_THAT(msg, Catch::Contains("snapshot '" + path + "' (0 bytes) is truncated or corrupt"));
  }
  const std::string missing = dir / "missing";
  CHECK_THAT(message_of([&] { trainer.resume(missing); }),
             Catch::Contains("cannot read snapshot '" + missing + "'"));
}

TEST_CASE("Missing dataset files are refused, naming the directory and what to do", "[faults]") {
  TempDir dir("datasets");
  const std::string nowhere = dir / "nowhere";
  const std::string msg =
      message_of([&] { mpu::datasets::FashionMNIST(mpu::datasets::Split::Train, nowhere); });
  CHECK_THAT(msg, Catch::Contains("Fashion-MNIST: " + nowhere + " does not exist") &&
                      Catch::Contains("train-images-idx3-ubyte.gz") &&
                      Catch::Contains(mpu::kEnvFashionMnistDir));
  CHECK_THAT(message_of([&] { mpu::datasets::MNIST(mpu::datasets::Split::Test, nowhere); }),
             Catch::Contains("MNIST: " + nowhere + " does not exist"));
}

TEST_CASE("The worker-death bound is checked: a negative option, a malformed variable",
          "[faults]") {
  auto net = make_net();
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  auto loss = faulty_loss(net, -1, 0, Fault::kNone);
  mpu::UpdaterOptions options;
  options.worker_death_timeout = milliseconds(-5);
  CHECK_THAT(message_of([&] {
               mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(2), loss, cpus(2),
                                                  options);
             }),
             Catch::Contains("UpdaterOptions::worker_death_timeout must be positive, or 0 for "
                             "the default; got -5 ms"));
  ::setenv(mpu::kEnvWorkerDeathTimeout, "soon", 1);
  const std::string malformed = message_of(
      [&] { mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(2), loss, cpus(2)); });
  ::setenv(mpu::kEnvWorkerDeathTimeout, "2.5", 1);
  const std::string fine = message_of(
      [&] { mpu::MultiprocessParallelUpdater u(net, opt, rank_iterators(2), loss, cpus(2)); });
  ::unsetenv(mpu::kEnvWorkerDeathTimeout);
  CHECK_THAT(malformed, Catch::Contains("MPU_WORKER_DEATH_TIMEOUT_SEC=\"soon\" is not a "
                                        "positive number of seconds"));
  CHECK(fine.empty());  // nothing was thrown
}

// --- Worker deaths described on every path, and what follows them -----------------------------

// Before the fix, about 1 trial in 6 failed: the worker, SIGKILLed with the master's "update"
// still unread, reset its socket; the master, reading the dead worker's last message to
// describe it, got ECONNRESET and threw "worker socket: connection lost mid-message" in place
// of the description. And the next update() said "update() after finalize()", though finalize()
// was never called.
TEST_CASE("A SIGKILLed worker is named with its rank, pid and signal every time, and stays named",
          "[faults][multiprocess]") {
  constexpr int kTrials = 8;
  // A process each: LibTorch 2.x with GPUs visible refuses autograd in a child forked after
  // the parent ran backward(), as the master does in update().
  std::vector<torch::Tensor> out;
  for (int trial = 0; trial < kTrials; ++trial) {
    auto texts = mpu::test::run_isolated([&] {
      at::set_num_threads(1);
      std::vector<torch::Tensor> texts;
      auto net = make_net();
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
      mpu::UpdaterOptions options;
      options.worker_death_timeout = milliseconds(3000);
      mpu::MultiprocessParallelUpdater updater(
          net, opt, rank_iterators(3), faulty_loss(net, 0, 0, Fault::kNone), cpus(3), options);
      updater.update();
      const std::vector<int> pids = updater.worker_pids();
      // Killed from outside, right before the master sends the next "update".
      ::kill(pids.at(0), SIGKILL);
      std::string first = "nothing was thrown";
      std::string second = "nothing was thrown";
      try {
        updater.update();
      } catch (const std::exception& e) {
        first = e.what();
      }
      try {
        updater.update();
      } catch (const mpu::CommError& e) {
        second = e.what();
      } catch (const std::exception& e) {
        second = std::string("not a CommError: ") + e.what();
      }
      texts.push_back(text_tensor(std::to_string(pids.at(0))));
      texts.push_back(text_tensor(first));
      texts.push_back(text_tensor(second));
      return texts;
    });
    out.insert(out.end(), texts.begin(), texts.end());
  }
  REQUIRE(out.size() == 3 * kTrials);
  for (int trial = 0; trial < kTrials; ++trial) {
    const std::string worker =
        "worker 1 (cpu, pid " + tensor_text(out[3 * trial]) + ") was killed by signal 9";
    INFO("trial " << trial);
    CHECK_THAT(tensor_text(out[3 * trial + 1]), Catch::Contains(worker));
    CHECK_THAT(
        tensor_text(out[3 * trial + 2]),
        Catch::Contains("update() after a failure; the updater is unusable because " + worker) &&
            !Catch::Contains("after finalize()"));
  }
}

TEST_CASE("CPU workers forked after a backward() on a GPU machine fail at once, saying why",
          "[faults][multiprocess][cuda]") {
  if (mpu::local_gpu_count() < 1) {
    WARN("skipped: only LibTorch with GPUs visible refuses autograd after fork; none here");
    return;
  }
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    torch::Tensor x = torch::ones({2}, torch::requires_grad());
    x.sum().backward();  // starts LibTorch's per-GPU autograd threads in this process
    std::string what = "nothing was thrown";
    try {
      auto net = make_net();
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
      mpu::MultiprocessParallelUpdater updater(net, opt, rank_iterators(2),
                                               faulty_loss(net, -1, 0, Fault::kNone), cpus(2));
      updater.update();
    } catch (const std::exception& e) {
      what = e.what();
    }
    return std::vector<torch::Tensor>{text_tensor(what)};
  });
  REQUIRE(out.size() == 1);
  const std::string what = tensor_text(out[0]);
  if (what == "nothing was thrown") {
    WARN("this LibTorch runs autograd in children forked after backward(): nothing to refuse");
    return;
  }
  CHECK_THAT(what, Catch::Contains("worker 1") &&
                       Catch::Contains("LibTorch refuses backward() in a process forked after") &&
                       Catch::Contains("CUDA_VISIBLE_DEVICES"));
}

// Before the fix, workers left through _exit() without flushing: what a loss function printed
// to a file or pipe without a newline or flush was lost.
TEST_CASE("What a worker prints is flushed when it exits", "[faults][multiprocess]") {
  TempDir dir("worker_stdout");
  const std::string path = dir / "stdout.txt";
  auto out = mpu::test::run_isolated([&] {
    at::set_num_threads(1);
    // A file: stdout is fully buffered, as it is under a pipe or a job scheduler's log.
    ensure(std::freopen(path.c_str(), "w", stdout) != nullptr, "freopen " + path);
    const pid_t master = ::getpid();
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    auto loss = faulty_loss(net, 0, 0, Fault::kNone);
    mpu::MultiprocessParallelUpdater updater(
        net, opt, rank_iterators(3),
        [=](const mpu::Batch& b) {
          if (::getpid() != master) {
            std::printf("[printf from %d]", static_cast<int>(::getpid()));
            std::cout << "[cout from " << ::getpid() << "]";
          }
          return loss(b);
        },
        cpus(3));
    updater.update();
    const std::vector<int> pids = updater.worker_pids();
    updater.finalize();
    std::fflush(stdout);
    std::vector<torch::Tensor> result;
    for (int pid : pids) result.push_back(text_tensor(std::to_string(pid)));
    return result;
  });
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  REQUIRE(out.size() == 2);
  for (const auto& pid : out) {
    CHECK_THAT(text.str(), Catch::Contains("[printf from " + tensor_text(pid) + "]") &&
                               Catch::Contains("[cout from " + tensor_text(pid) + "]"));
  }
}
