// MultiprocessParallelUpdater, the master's side: it forks one worker per extra device at the
// first update() (multiprocess_worker.cpp runs them) and drives them over a framed channel
// each (process/channel.h); multiprocess_workers.cpp names a worker that failed.
//
// Threads at the fork: the master starts none of its own before forking (the death watch and
// the TCPStore server start after the last fork); see the class comment for the contract.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <set>

#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"
#include "mpu/launch.h"
#include "mpu/updater.h"
#include "process/worker_watch.h"
#include "sync/sync_engine.h"
#include "train/multiprocess_workers.h"
#include "train/step_graph.h"
#include "train/updater_common.h"

namespace mpu {
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

// Refuses to go on after a failure, repeating it: the workers are gone, and the user never
// called finalize(), so "after finalize()" would mislead.
void check_usable(const detail::WorkerSet* workers, bool finalized, const char* call) {
  if (workers != nullptr && !workers->failure.empty()) {
    const std::string text = detail::cat(
        "MultiprocessParallelUpdater: ", call,
        " after a failure; the updater is "
        "unusable because ",
        workers->failure, ". Build a new updater (and resume from the last snapshot) to go on");
    if (workers->failure_is_comm) MPU_THROW(CommError, text);
    MPU_THROW(Error, text);
  }
  MPU_CHECK(!finalized, "MultiprocessParallelUpdater: ", call, " after finalize()");
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
  detail::check_cuda_graph(options_, devices_[0], static_cast<int>(devices_.size()),
                           "MultiprocessParallelUpdater");
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
    for (std::size_t i = 0; i < workers_->workers.size(); ++i) {
      pids.push_back(workers_->processes.pid(i));
    }
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
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      const int err = errno;
      MPU_THROW(CommError, "MultiprocessParallelUpdater: socketpair() for worker ", k,
                " failed: ", std::strerror(err));
    }
    try {
      set->processes.fork(detail::cat("MultiprocessParallelUpdater worker ", k), [&]() -> int {
        ::close(fds[0]);
        for (auto& w : set->workers) w.channel.close();
        run_worker(k, fds[1]);
      });
    } catch (...) {
      ::close(fds[0]);
      ::close(fds[1]);
      throw;  // `set` stops the workers already forked
    }
    ::close(fds[1]);
    set->workers.push_back(detail::Worker{
        k, devices_[k], detail::Channel(fds[0], detail::cat("worker ", k, " channel"))});
  }
  workers_ = std::move(set);
  // Threads only now, after the last fork.
  workers_->processes.start_watch(kWorkerWatchInterval);

  try {
    // Rendezvous: an NCCL unique id for GPUs, a TCPStore for CPUs, sent through the channels.
    std::string rendezvous;
    if (gpu) {
      const NcclUniqueId id = nccl_unique_id();
      rendezvous.assign(id.begin(), id.end());
    } else {
      workers_->store = serve_store(0, options_.timeout);
      rendezvous = std::to_string(workers_->store->port);
    }
    for (auto& w : workers_->workers) w.channel.send(detail::MessageType::kRendezvous, rendezvous);
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
    if (pending_precision_) step_->apply_precision(*pending_precision_);
    pending_precision_.reset();
    step_->broadcast_parameters();
    step_->broadcast_buffers();
    if (options_.cuda_graph) graph_ = detail::make_step_graph(options_, devices_[0]);
  } catch (const std::exception& e) {
    fail(e);
  }
  workers_->processes.arm(comm_);
}

void MultiprocessParallelUpdater::fail(const std::exception& cause) {
  // A failed collective or channel usually means a worker died: name it rather than the
  // collective. Every failure path on the master ends here, so the worker is always described.
  const std::string what = cause.what();
  const auto bound = detail::worker_death_timeout(options_);
  const bool watched_death = workers_->processes.first_dead() >= 0;
  const bool comm_failure = dynamic_cast<const CommError*>(&cause) != nullptr || watched_death;
  // Within the bound: half to find the dead worker, half for the others to leave.
  workers_->grace = bound / 2;
  workers_->failing = true;
  if (comm_) comm_->abort();
  std::string message;
  try {
    const bool timed_out = dynamic_cast<const Timeout*>(&cause) != nullptr && !watched_death;
    workers_->raise_if_dead(comm_failure && !timed_out ? bound / 2 : std::chrono::milliseconds(0));
  } catch (const CommError& e) {
    message = e.what();
    if (message.find("Autograd-and-Fork") != std::string::npos) {
      message +=
          " [what to do: this process ran backward() before the updater forked its workers, "
          "and CUDA builds of LibTorch cannot run autograd in processes forked after that. "
          "Build the MultiprocessParallelUpdater and call its first update() before any "
          "other training in this process]";
    }
    message += " [during: " + what + "]";
  }
  if (workers_->failure.empty()) {
    workers_->failure = "the master's step failed: " + what;
    workers_->failure_is_comm = dynamic_cast<const CommError*>(&cause) != nullptr;
  }
  // Release everything but the record of the failure, which later calls repeat.
  finalized_ = true;
  graph_.reset();
  step_.reset();
  workers_->stop();
  comm_.reset();
  if (!message.empty()) throw CommError(message);
  if (dynamic_cast<const Timeout*>(&cause)) throw Timeout(what);
  if (dynamic_cast<const CommError*>(&cause)) throw CommError(what);
  if (dynamic_cast<const InvalidArgument*>(&cause)) throw InvalidArgument(what);
  throw Error(what);
}

void MultiprocessParallelUpdater::update() {
  check_usable(workers_.get(), finalized_, "update()");
  if (!workers_) start();
  try {
    workers_->raise_if_dead(std::chrono::milliseconds(0));
    for (auto& w : workers_->workers) w.channel.send(detail::MessageType::kUpdate);
    if (graph_) {
      graph_->step(*iterators_[0], options_, loss_fn_, *step_, iteration_ + 1);
    } else {
      detail::data_parallel_step(*iterators_[0], options_, loss_fn_, devices_[0], *step_,
                                 iteration_ + 1);
    }
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

void MultiprocessParallelUpdater::save(torch::serialize::OutputArchive& archive) {
  if (workers_ && !workers_->failure.empty()) check_usable(workers_.get(), false, "save()");
  if (step_ && step_->collective_save()) {
    // Sharded: every rank holds a shard of the optimizer state; gather it for the save.
    for (auto& w : workers_->workers) w.channel.send(detail::MessageType::kGatherState);
    step_->gather_state_for_save();
  }
  detail::save_state(archive, *model_, optimizer_, *iterators_[0], iteration_);
  if (step_) step_->save_precision(archive);
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
  check_usable(workers_.get(), finalized_, "load()");
  const torch::Device device = workers_ ? devices_[0] : torch::Device(torch::kCPU);
  auto precision = detail::SyncEngine::read_precision(archive, options_);
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
  if (!workers_) {
    // The workers fork from the loaded state; the engine, built then, takes the precision
    // state.
    pending_precision_ = std::make_unique<detail::PrecisionState>(std::move(precision));
    return;
  }
  try {
    const std::string state = options_.strategy == Strategy::kMasterStep
                                  ? std::string()
                                  : detail::serialize([&](auto& a) { optimizer_.save(a); });
    for (std::size_t k = 1; k < iterators_.size(); ++k) {
      detail::Channel& channel = workers_->workers[k - 1].channel;
      channel.send(detail::MessageType::kLoadState, blobs[k]);
      channel.send(detail::MessageType::kLoadState, state);
      channel.send(detail::MessageType::kLoadState, std::to_string(iteration_));
    }
    graph_.reset();
    step_.reset();
    step_ = std::make_unique<detail::SyncEngine>(*model_, optimizer_, *comm_, options_);
    step_->apply_precision(precision);
    step_->broadcast_parameters();
    step_->broadcast_buffers();
    if (options_.cuda_graph) graph_ = detail::make_step_graph(options_, devices_[0]);
  } catch (const std::exception& e) {
    fail(e);
  }
}

void MultiprocessParallelUpdater::finalize() {
  if (finalized_) return;
  finalized_ = true;
  graph_.reset();
  step_.reset();
  if (workers_) workers_->stop();
  comm_.reset();
  workers_.reset();
}

}  // namespace mpu
