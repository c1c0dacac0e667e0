// MultiprocessParallelUpdater: the master process forks one worker per extra device and drives
// them through one Unix socket each (the seed used pipes; a socket lets the master write with
// MSG_NOSIGNAL, so a dead worker is an error, not a SIGPIPE).
//
// Messages, master -> worker: 'R' + rendezvous (NCCL unique id, or the TCPStore port), then
// 'U' (update), 'S' + three blobs (load state: the iterator's, the optimizer's (empty under
// MasterStep) and the iteration; parameters follow by broadcast), 'P' (send your iterator
// state), 'G' (join the gather of the sharded optimizer state for a save), 'F' (finish), 'A'
// (finish without finalising the communicator: the master is failing and has aborted its own).
// Worker -> master: 'P' replies, and 'E' + text when the worker fails, just before it exits.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"
#include "mpu/launch.h"
#include "mpu/updater.h"
#include "sync/sync_engine.h"
#include "train/updater_common.h"
#include "process/worker_watch.h"

namespace mpu {
namespace detail {
namespace {

void write_all(int fd, const void* data, std::size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) MPU_THROW(CommError, "worker socket: send failed: ", std::strerror(errno));
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

// Reads exactly n bytes; false on a clean EOF before the first byte.
bool read_all(int fd, void* data, std::size_t n) {
  char* p = static_cast<char*>(data);
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r = ::recv(fd, p + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0 && got == 0) return false;
    if (r <= 0) MPU_THROW(CommError, "worker socket: connection lost mid-message");
    got += static_cast<std::size_t>(r);
  }
  return true;
}

void send_blob(int fd, char tag, const std::string& blob) {
  const std::uint64_t n = blob.size();
  write_all(fd, &tag, 1);
  write_all(fd, &n, sizeof n);
  write_all(fd, blob.data(), blob.size());
}

std::string read_blob(int fd) {
  std::uint64_t n = 0;
  if (!read_all(fd, &n, sizeof n)) MPU_THROW(CommError, "worker socket: closed");
  std::string blob(n, '\0');
  if (n > 0 && !read_all(fd, blob.data(), n)) MPU_THROW(CommError, "worker socket: closed");
  return blob;
}

std::string serialize(const std::function<void(torch::serialize::OutputArchive&)>& fn) {
  torch::serialize::OutputArchive archive;
  fn(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void deserialize(const std::string& blob,
                 const std::function<void(torch::serialize::InputArchive&)>& fn) {
  std::istringstream in(blob);
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  fn(archive);
}

}  // namespace

struct Worker {
  int rank = 0;
  torch::Device device = torch::kCPU;
  pid_t pid = -1;
  int fd = -1;  // the master's end of the socket pair
  bool reaped = false;
  int status = 0;
};

struct WorkerSet {
  std::vector<Worker> workers;
  std::optional<StoreServer> store;   // Gloo only: the master serves the rendezvous
  std::unique_ptr<ChildWatch> watch;  // notices a dead worker while the master is busy
  std::chrono::milliseconds grace = kWorkerExitGrace;  // stop(): before SIGKILL
  bool failing = false;  // stop() after a failure: close the sockets, the workers leave at once

  // Starts watching the workers; a death aborts the communicator once `arm`ed.
  void start_watch() {
    std::vector<pid_t> pids;
    for (const auto& w : workers) pids.push_back(w.pid);
    watch = std::make_unique<ChildWatch>(std::move(pids), kWorkerWatchInterval);
  }
  void arm(const std::shared_ptr<Communicator>& comm) {
    if (watch) watch->arm(comm);
  }

  // Reaps worker `w` if it has exited (or waits up to `wait` for it to); true when reaped.
  bool reap(Worker& w, std::chrono::milliseconds wait) {
    if (w.reaped) return true;
    const auto deadline = std::chrono::steady_clock::now() + wait;
    for (;;) {
      const pid_t r = ::waitpid(w.pid, &w.status, WNOHANG);
      if (r == w.pid || (r < 0 && errno == ECHILD)) {
        w.reaped = true;
        return true;
      }
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // The error text a failed worker sent before exiting, if any.
  static std::string error_text(const Worker& w) {
    pollfd p{w.fd, POLLIN, 0};
    std::string text;
    while (::poll(&p, 1, 0) > 0 && (p.revents & POLLIN)) {
      char tag = 0;
      if (!read_all(w.fd, &tag, 1)) break;
      if (tag == 'E') return read_blob(w.fd);
      if (tag == 'P') (void)read_blob(w.fd);
    }
    return text;
  }

  // "worker 2 (cpu, pid 123) was killed by signal 9 (Killed)[: <the error it sent>]".
  static std::string describe(const Worker& w, const std::string& why,
                              const char* who = "MultiprocessParallelUpdater") {
    return cat(who, ": worker ", w.rank, " (", w.device.str(), ", pid ", w.pid, ") ",
               w.reaped ? describe_wait_status(w.status) : "closed its socket but is still running",
               why.empty() ? "" : ": ", why);
  }

  // Throws CommError naming a dead worker, if one dies within `wait`. One death brings down
  // the others (their collectives fail), so once one is found dead the others get a moment to
  // show, and the worker blamed is one that failed on its own (killed by a signal, or its own
  // error), the first the watch saw if it is one.
  void raise_if_dead(std::chrono::milliseconds wait) {
    const auto settle = std::chrono::milliseconds(200);
    const auto start = std::chrono::steady_clock::now();
    auto deadline = start + wait;
    bool any = false;
    for (;;) {
      bool own = false;
      for (auto& w : workers) {
        if (reap(w, std::chrono::milliseconds(0))) {
          any = true;
          own = own || !is_consequential_exit(w.status);
        }
      }
      const auto now = std::chrono::steady_clock::now();
      if (own || (any && now >= deadline)) break;
      if (!any && now >= deadline) return;
      if (any) deadline = std::min(deadline, now + settle);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const Worker* blame = nullptr;
    const int first = watch ? watch->first_dead() : -1;
    if (first >= 0 && workers[static_cast<std::size_t>(first)].reaped &&
        !is_consequential_exit(workers[static_cast<std::size_t>(first)].status)) {
      blame = &workers[static_cast<std::size_t>(first)];
    }
    for (const auto& w : workers) {
      if (!blame && w.reaped && !is_consequential_exit(w.status)) blame = &w;
    }
    if (!blame && first >= 0 && workers[static_cast<std::size_t>(first)].reaped) {
      blame = &workers[static_cast<std::size_t>(first)];
    }
    for (const auto& w : workers) {
      if (!blame && w.reaped) blame = &w;
    }
    throw CommError(where(__FILE__, __LINE__) + describe(*blame, error_text(*blame)));
  }

  // The iterator state of worker `i`, asked for through its socket; CommError naming the
  // worker when it is dead or does not answer within `timeout`.
  std::string iterator_state(std::size_t i, std::chrono::milliseconds timeout,
                             std::chrono::milliseconds bound) {
    Worker& w = workers[i];
    std::string why;
    try {
      const char p = 'P';
      write_all(w.fd, &p, 1);
      pollfd pfd{w.fd, POLLIN, 0};
      const int ready = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
      char tag = 0;
      if (ready > 0 && read_all(w.fd, &tag, 1)) {
        if (tag == 'P') return read_blob(w.fd);
        if (tag == 'E') why = read_blob(w.fd);
      } else if (ready == 0) {
        MPU_THROW(Timeout, "MultiprocessParallelUpdater::save: worker ", w.rank, " (",
                  w.device.str(), ", pid ", w.pid, ") did not send its iterator state within ",
                  timeout.count(), " ms");
      }
    } catch (const Timeout&) {
      throw;
    } catch (const CommError& e) {
      why = e.what();
    }
    reap(w, bound);
    throw CommError(where(__FILE__, __LINE__) +
                    describe(w, why, "MultiprocessParallelUpdater::save (iterator state)"));
  }

  // Asks every worker to finish, waits up to `grace` for all of them, kills the ones left, and
  // reaps all. noexcept.
  void stop() noexcept {
    if (watch) watch->stop();
    for (auto& w : workers) {
      if (w.fd >= 0) {
        const char f = failing ? 'A' : 'F';
        (void)::send(w.fd, &f, 1, MSG_NOSIGNAL);
        // A worker blocked in a collective or in user code cannot read the 'F'; its watch of
        // the master sees the socket close and ends it (status 5).
        if (failing) ::shutdown(w.fd, SHUT_WR);
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + grace;
    for (auto& w : workers) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (!reap(w, std::max(left, std::chrono::milliseconds(0)))) {
        MPU_LOG_WARN("MultiprocessParallelUpdater: worker ", w.rank, " (pid ", w.pid,
                     ") did not exit within ", grace.count(), " ms; killing it");
        ::kill(w.pid, SIGKILL);
        reap(w, std::chrono::hours(1));
      }
      if (w.fd >= 0) ::close(w.fd);
      w.fd = -1;
    }
    workers.clear();
    store.reset();
  }
};

}  // namespace detail

namespace {

std::vector<torch::Device> devices_from_map(const std::map<std::string, torch::Device>& devices) {
  auto main = devices.find("main");
  MPU_CHECK(main != devices.end(),
            "MultiprocessParallelUpdater: the devices map needs a \"main\" entry for the master, "
            "got ",
            devices.size(), " entries without one");
  std::vector<torch::Device> out{main->second};
  for (const auto& [name, device] : devices) {
    if (name != "main") out.push_back(device);
  }
  return out;
}

void validate(const torch::nn::Module& model, const std::vector<std::shared_ptr<Iterator>>& its,
              const LossFunction& loss_fn, const std::vector<torch::Device>& devices) {
  const char* who = "MultiprocessParallelUpdater";
  MPU_CHECK(!devices.empty(), who, ": no devices given");
  MPU_CHECK(its.size() == devices.size(), who, ": ", its.size(), " iterators for ", devices.size(),
            " devices; give one iterator per device (mpu::split_iterators "
            "makes them)");
  MPU_CHECK(static_cast<bool>(loss_fn), who, ": loss_fn is empty");
  for (std::size_t i = 0; i < its.size(); ++i) {
    MPU_CHECK(its[i] != nullptr, who, ": iterator ", i, " is null");
  }
  for (std::size_t i = 1; i < its.size(); ++i) {
    MPU_CHECK(its[i]->dataset_size() == its[0]->dataset_size(), who,
              ": the datasets differ in "
              "length: iterator 0 has ",
              its[0]->dataset_size(), " examples, iterator ", i, " has ", its[i]->dataset_size(),
              ". Every device must run the same number of "
              "batches per epoch; split with mpu::split_dataset_n_random");
  }
  const bool gpu = devices[0].is_cuda();
  std::set<int> seen;
  for (std::size_t i = 0; i < devices.size(); ++i) {
    const auto& d = devices[i];
    MPU_CHECK(d.is_cuda() || d.is_cpu(), who, ": device ", i, " is ", d.str(),
              "; only CPU and CUDA devices are supported");
    MPU_CHECK(d.is_cuda() == gpu, who, ": devices mix CPU and GPU (device 0 is ", devices[0].str(),
              ", device ", i, " is ", d.str(), "); use only GPUs or only CPUs");
    if (!d.is_cuda()) continue;
    const int index = d.has_index() ? d.index() : 0;
    MPU_CHECK(seen.insert(index).second, who, ": device ", d.str(),
              " is listed twice; each "
              "GPU runs one process");
  }
  if (gpu) {
    const int count = local_gpu_count();
    for (const auto& d : devices) {
      MPU_CHECK(d.index() < count, who, ": device ", d.str(),
                " is not present; this machine "
                "has ",
                count, " visible GPU(s) (mpu::local_gpus() lists them)");
    }
  }
  if (gpu) {
    MPU_CHECK(!cuda_initialized(), who,
              ": CUDA is already initialised in this process, and "
              "the workers it forks could not use it. Construct the updater (and count GPUs with "
              "mpu::local_gpus(), which uses NVML) before anything touches CUDA: no "
              "torch::cuda::device_count(), no model.to(kCUDA), no CUDA tensors before the "
              "first update(). Or run one process per GPU with DistributedUpdater and "
              "mpu::spawn()/torchrun");
  }
  (void)model;
}

}  // namespace

MultiprocessParallelUpdater::MultiprocessParallelUpdater(
    std::shared_ptr<torch::nn::Module> model, torch::optim::Optimizer& optimizer,
    std::vector<std::shared_ptr<Iterator>> iterators, LossFunction loss_fn,
    std::vector<torch::Device> devices, UpdaterOptions options)
    : model_(std::move(model)),
      optimizer_(optimizer),
      iterators_(std::move(iterators)),
      loss_fn_(std::move(loss_fn)),
      devices_(std::move(devices)),
      options_(std::move(options)) {
  for (auto& d : devices_) {
    if (d.is_cuda() && !d.has_index()) d = torch::Device(torch::kCUDA, 0);
  }
  MPU_CHECK(model_ != nullptr, "MultiprocessParallelUpdater: model is null");
  detail::check_has_parameters(*model_, "MultiprocessParallelUpdater");
  validate(*model_, iterators_, loss_fn_, devices_);
  detail::check_options(options_, "MultiprocessParallelUpdater");
  scaling_changes_ = apply_scaling(
      optimizer_, detail::gradients_per_step(static_cast<int>(devices_.size()), options_),
      options_.scaling);
  (void)detail::worker_death_timeout(options_);  // refuses a bad option or variable now
}

MultiprocessParallelUpdater::MultiprocessParallelUpdater(
    std::shared_ptr<torch::nn::Module> model, torch::optim::Optimizer& optimizer,
    std::vector<std::shared_ptr<Iterator>> iterators, LossFunction loss_fn,
    const std::map<std::string, torch::Device>& devices, UpdaterOptions options)
    : MultiprocessParallelUpdater(std::move(model), optimizer, std::move(iterators),
                                  std::move(loss_fn), devices_from_map(devices),
                                  std::move(options)) {}

MultiprocessParallelUpdater::~MultiprocessParallelUpdater() {
  try {
    finalize();
  } catch (const std::exception& e) {
    MPU_LOG_ERROR("MultiprocessParallelUpdater: finalize failed in the destructor: ", e.what());
  }
}

std::vector<int> MultiprocessParallelUpdater::worker_pids() const {
  std::vector<int> pids;
  if (workers_) {
    for (const auto& w : workers_->workers) pids.push_back(w.pid);
  }
  return pids;
}

void MultiprocessParallelUpdater::start() {
  const int n = static_cast<int>(devices_.size());
  const bool gpu = devices_[0].is_cuda();
  MPU_CHECK(!gpu || !cuda_initialized(),
            "MultiprocessParallelUpdater: CUDA was initialised after the updater was built and "
            "before its first update(); the workers it forks could not use it. Leave CUDA alone "
            "until the first update() has run");
  auto set = std::make_unique<detail::WorkerSet>();
  for (int k = 1; k < n; ++k) {
    int fds[2];
    MPU_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0,
              "MultiprocessParallelUpdater: socketpair failed: ", std::strerror(errno));
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) {
      ::close(fds[0]);
      ::close(fds[1]);
      set->stop();
      MPU_THROW(Error, "MultiprocessParallelUpdater: fork failed: ", std::strerror(errno));
    }
    if (pid == 0) {
      ::close(fds[0]);
      for (const auto& w : set->workers) ::close(w.fd);
      run_worker(k, fds[1]);  // never returns
    }
    ::close(fds[1]);
    set->workers.push_back(detail::Worker{k, devices_[k], pid, fds[0]});
  }
  workers_ = std::move(set);
  workers_->start_watch();

  // Rendezvous: an NCCL unique id for GPUs, a TCPStore for CPUs, sent through the sockets.
  std::string rendezvous;
  if (gpu) {
    const NcclUniqueId id = nccl_unique_id();
    rendezvous.assign(id.begin(), id.end());
  } else {
    workers_->store = serve_store(0, options_.timeout);
    rendezvous = std::to_string(workers_->store->port);
  }
  for (auto& w : workers_->workers) detail::send_blob(w.fd, 'R', rendezvous);

  try {
    model_->to(devices_[0]);
    detail::move_optimizer_state(optimizer_, devices_[0]);
    if (gpu) {
      NcclUniqueId id;
      std::copy(rendezvous.begin(), rendezvous.end(), id.begin());
      comm_ = make_nccl_communicator(id, 0, n, devices_[0].index(), options_.timeout);
    } else {
      comm_ = make_gloo_communicator(workers_->store->store, 0, n, options_.timeout);
    }
    step_ = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm_, options_);
    step_->broadcast_parameters();
    step_->broadcast_buffers();
  } catch (const std::exception& e) {
    fail(e);
  }
  workers_->arm(comm_);
}

[[noreturn]] void MultiprocessParallelUpdater::run_worker(int k, int fd) noexcept {
  int code = 0;
  // Outside the try block: a worker that fails sends its 'E' and leaves through _exit() below
  // without tearing them down, whatever the backend. A finalise would wait for the collectives in
  // flight, and the master may be blocked in one that waits for this worker, whose exit is what
  // the master's watch acts on. (The NCCL communicator also aborts rather than finalises when
  // destroyed during unwinding; this keeps the worker's way out independent of that.) Only an
  // orderly 'F' finalises them, on every rank alike.
  std::shared_ptr<Communicator> comm;
  std::unique_ptr<detail::SyncEngine> step;
  try {
    // GNU OpenMP does not survive fork(): one intra-op thread, as torchrun's default.
    at::set_num_threads(1);
    // Workers follow the master: they leave when it says so or when it is gone, not on the
    // Ctrl-C or SIGTERM meant for the job, so that the master can still save their state.
    ::signal(SIGINT, SIG_IGN);
    ::signal(SIGTERM, SIG_IGN);
    detail::watch_parent(::getppid(), fd, k, kWorkerWatchInterval);
    // The fork copied the master's current observation; reports here go to a private sink that
    // is emptied every step, because only the master reports.
    Observation sink;
    ObservationScope observing(sink);
    char tag = 0;
    if (!detail::read_all(fd, &tag, 1)) ::_exit(0);  // the master went away before starting
    MPU_CHECK(tag == 'R', "worker ", k, ": expected the rendezvous message, got '", tag, "'");
    const std::string rendezvous = detail::read_blob(fd);
    const torch::Device device = devices_[k];
    const int n = static_cast<int>(devices_.size());
    model_->to(device);
    // Every rank steps under Replicated and Sharded: the worker's copy of the optimizer (forked
    // with its rescaled options) follows the model to its device.
    detail::move_optimizer_state(optimizer_, device);
    if (device.is_cuda()) {
      NcclUniqueId id;
      std::copy(rendezvous.begin(), rendezvous.end(), id.begin());
      comm = make_nccl_communicator(id, k, n, device.index(), options_.timeout);
    } else {
      comm = make_gloo_communicator(
          connect_store("127.0.0.1", std::stoi(rendezvous), options_.timeout), k, n,
          options_.timeout);
    }
    step = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm, options_);
    step->broadcast_parameters();
    step->broadcast_buffers();
    Iterator& iterator = *iterators_[k];
    std::int64_t iteration = iteration_;
    for (;;) {
      // The master gone, or failing: its end of the communicator is aborted, so finalising
      // ours would wait for it in vain. Abort ours too, and leave.
      if (!detail::read_all(fd, &tag, 1) || tag == 'A') {
        comm->abort();
        break;
      }
      if (tag == 'F') break;
      if (tag == 'U') {
        sink.clear();
        detail::data_parallel_step(iterator, options_, loss_fn_, device, *step, ++iteration);
      } else if (tag == 'P') {
        detail::send_blob(fd, 'P', detail::serialize([&](auto& a) { iterator.save(a); }));
      } else if (tag == 'G') {
        step->gather_state_for_save();
        step->release_saved_state();
      } else if (tag == 'S') {
        const std::string blob = detail::read_blob(fd);
        detail::deserialize(blob, [&](auto& a) { iterator.load(a); });
        // Then the optimizer state (empty under MasterStep) and the iteration, each tagged 'S'.
        MPU_CHECK(detail::read_all(fd, &tag, 1) && tag == 'S', "worker ", k,
                  ": expected the optimizer state after the iterator state");
        const std::string state = detail::read_blob(fd);
        MPU_CHECK(detail::read_all(fd, &tag, 1) && tag == 'S', "worker ", k,
                  ": expected the iteration after the optimizer state");
        iteration = std::stoll(detail::read_blob(fd));
        if (options_.strategy != Strategy::kMasterStep) {
          // This rank steps: it needs the loaded optimizer state too.
          step.reset();
          detail::deserialize(state, [&](auto& a) { optimizer_.load(a); });
          detail::move_optimizer_state(optimizer_, device);
          step = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm, options_);
        }
        step->broadcast_parameters();
        step->broadcast_buffers();
      } else {
        MPU_THROW(Error, "worker ", k, ": unknown message '", tag, "'");
      }
    }
    step.reset();
    comm.reset();
  } catch (const std::exception& e) {
    code = dynamic_cast<const CommError*>(&e) != nullptr ? detail::kWorkerExitCommError
                                                         : detail::kWorkerExitError;
    try {
      detail::send_blob(fd, 'E', e.what());
    } catch (...) {
    }
    MPU_LOG_ERROR("MultiprocessParallelUpdater worker ", k, " (", devices_[k].str(),
                  ") failed: ", e.what());
  } catch (...) {
    code = detail::kWorkerExitError;
  }
  // Leave without running the parent's atexit handlers and static destructors.
  ::_exit(code);
}

void MultiprocessParallelUpdater::fail(const std::exception& cause) {
  // A failed collective usually means a worker died: name it rather than the collective.
  const std::string what = cause.what();
  const auto bound = detail::worker_death_timeout(options_);
  const bool watched_death = workers_->watch && workers_->watch->first_dead() >= 0;
  const bool comm_failure = dynamic_cast<const CommError*>(&cause) != nullptr || watched_death;
  // Within the bound: half to find the dead worker, half for the others to leave.
  workers_->grace = bound / 2;
  workers_->failing = true;
  if (comm_) comm_->abort();
  try {
    const bool timed_out = dynamic_cast<const Timeout*>(&cause) != nullptr && !watched_death;
    workers_->raise_if_dead(comm_failure && !timed_out ? bound / 2 : std::chrono::milliseconds(0));
  } catch (const CommError& e) {
    std::string msg = e.what();
    if (msg.find("Autograd-and-Fork") != std::string::npos) {
      msg +=
          " [what to do: this process ran backward() before the updater forked its workers, "
          "and CUDA builds of LibTorch cannot run autograd in processes forked after that. "
          "Build the MultiprocessParallelUpdater and call its first update() before any "
          "other training in this process]";
    }
    finalize();
    throw CommError(msg + " [during: " + what + "]");
  }
  finalize();
  if (dynamic_cast<const Timeout*>(&cause)) throw Timeout(what);
  if (dynamic_cast<const CommError*>(&cause)) throw CommError(what);
  if (dynamic_cast<const InvalidArgument*>(&cause)) throw InvalidArgument(what);
  throw Error(what);
}

void MultiprocessParallelUpdater::update() {
  MPU_CHECK(!finalized_, "MultiprocessParallelUpdater: update() after finalize()");
  if (!workers_) start();
  try {
    workers_->raise_if_dead(std::chrono::milliseconds(0));
    for (auto& w : workers_->workers) {
      const char u = 'U';
      detail::write_all(w.fd, &u, 1);
    }
    detail::data_parallel_step(*iterators_[0], options_, loss_fn_, devices_[0], *step_,
                               iteration_ + 1);
  } catch (const std::exception& e) {
    fail(e);
  }
  ++iteration_;
  if (iterators_[0]->is_new_epoch() && options_.on_new_epoch) options_.on_new_epoch(*this);
}

std::int64_t MultiprocessParallelUpdater::epoch() const {
  return iterators_[0]->epoch();
}
double MultiprocessParallelUpdater::epoch_detail() const {
  return iterators_[0]->epoch_detail();
}
bool MultiprocessParallelUpdater::is_new_epoch() const {
  return iterators_[0]->is_new_epoch();
}

std::int64_t MultiprocessParallelUpdater::optimizer_state_bytes() const {
  return step_ ? step_->optimizer_state_bytes() : 0;
}

void MultiprocessParallelUpdater::save(torch::serialize::OutputArchive& archive) const {
  if (step_ && step_->collective_save()) {
    // Sharded: every rank holds a shard of the optimizer state; gather it for the save.
    for (auto& w : workers_->workers) {
      const char g = 'G';
      detail::write_all(w.fd, &g, 1);
    }
    step_->gather_state_for_save();
  }
  detail::save_state(archive, *model_, optimizer_, *iterators_[0], iteration_);
  if (step_) step_->release_saved_state();
  // The workers' iterators advance in the workers; ask them for their state.
  for (std::size_t k = 1; k < iterators_.size(); ++k) {
    std::string blob;
    if (workers_) {
      blob =
          workers_->iterator_state(k - 1, options_.timeout, detail::worker_death_timeout(options_));
    } else {
      blob = detail::serialize([&](auto& a) { iterators_[k]->save(a); });
    }
    archive.write(
        "iterator_blob_" + std::to_string(k),
        torch::tensor(std::vector<std::uint8_t>(blob.begin(), blob.end()), torch::kUInt8));
  }
}

void MultiprocessParallelUpdater::load(torch::serialize::InputArchive& archive) {
  MPU_CHECK(!finalized_, "MultiprocessParallelUpdater: load() after finalize()");
  const torch::Device device = workers_ ? devices_[0] : torch::Device(torch::kCPU);
  iteration_ = detail::load_state(archive, *model_, optimizer_, *iterators_[0], device);
  std::vector<std::string> blobs(iterators_.size());
  for (std::size_t k = 1; k < iterators_.size(); ++k) {
    torch::Tensor bytes;
    MPU_CHECK(archive.try_read("iterator_blob_" + std::to_string(k), bytes),
              "MultiprocessParallelUpdater load: the snapshot has no state for iterator ", k,
              "; it was written for ", k, " device(s), this updater has ", iterators_.size());
    auto c = bytes.contiguous();
    blobs[k].assign(reinterpret_cast<const char*>(c.data_ptr<std::uint8_t>()),
                    static_cast<std::size_t>(c.numel()));
    if (!workers_) detail::deserialize(blobs[k], [&](auto& a) { iterators_[k]->load(a); });
  }
  if (!workers_) return;  // the workers fork from the loaded state
  try {
    const std::string state = options_.strategy == Strategy::kMasterStep
                                  ? std::string()
                                  : detail::serialize([&](auto& a) { optimizer_.save(a); });
    for (std::size_t k = 1; k < iterators_.size(); ++k) {
      const int fd = workers_->workers[k - 1].fd;
      detail::send_blob(fd, 'S', blobs[k]);
      detail::send_blob(fd, 'S', state);
      detail::send_blob(fd, 'S', std::to_string(iteration_));
    }
    step_.reset();
    step_ = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm_, options_);
    step_->broadcast_parameters();
    step_->broadcast_buffers();
  } catch (const std::exception& e) {
    fail(e);
  }
}

void MultiprocessParallelUpdater::finalize() {
  if (finalized_) return;
  finalized_ = true;
  step_.reset();
  if (workers_) workers_->stop();
  comm_.reset();
  workers_.reset();
}

}  // namespace mpu
