// MultiprocessParallelUpdater, the worker's side: what a forked worker runs until the master
// says finish, or is gone. Every way out flushes the worker's output (exit_child), since the
// worker leaves through _exit, which flushes nothing.
#include <signal.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>

#include "misc/log.h"
#include "mpu/communicator.h"
#include "mpu/error.h"
#include "mpu/launch.h"
#include "mpu/reporter.h"
#include "mpu/updater.h"
#include "process/channel.h"
#include "process/supervisor.h"
#include "process/worker_watch.h"
#include "sync/sync_engine.h"
#include "train/multiprocess_workers.h"
#include "train/updater_common.h"

namespace mpu {
namespace {

// LibTorch (2.x, with GPUs visible) marks a process forked after the parent's autograd threads
// started, that is after any backward() there, and refuses backward() in it. Found out here,
// once the workers are up, with what to do, rather than as a stack trace at the first step.
void check_autograd_after_fork(int k) {
  std::string refused;
  try {
    torch::Tensor x = torch::zeros({1}, torch::requires_grad());
    x.sum().backward();
  } catch (const c10::Error& e) {
    refused = e.what_without_backtrace();
  }
  MPU_CHECK(refused.empty(), "worker ", k,
            ": LibTorch refuses backward() in a process forked after the parent ran backward() "
            "with GPUs visible (",
            refused.substr(0, refused.find('\n')),
            "). Construct the MultiprocessParallelUpdater before the first backward() of this "
            "process, or hide the GPUs of a CPU-only job with CUDA_VISIBLE_DEVICES=\"\"");
}

}  // namespace

[[noreturn]] void MultiprocessParallelUpdater::run_worker(int k, int fd) noexcept {
  using detail::MessageType;
  int code = detail::kWorkerExitOk;
  detail::Channel channel(fd, detail::cat("worker ", k, " channel to the master"));
  // Outside the try block: a worker that fails sends its kError and leaves through exit_child()
  // below without tearing them down, whatever the backend. A finalise would wait for the
  // collectives in flight, and the master may be blocked in one that waits for this worker,
  // whose exit is what the master's watch acts on. (The NCCL communicator also aborts rather
  // than finalises when destroyed during unwinding; this keeps the worker's way out independent
  // of that.) Only an orderly kFinish finalises them, on every rank alike.
  std::shared_ptr<Communicator> comm;
  std::unique_ptr<detail::SyncEngine> step;
  try {
    // The fork left this process with the forking thread only. GNU OpenMP does not survive
    // fork(): one intra-op thread, as torchrun's default, before any op runs.
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
    std::optional<detail::Message> message = channel.receive();
    if (!message) detail::exit_child(detail::kWorkerExitOk);  // the master left before starting
    MPU_CHECK(message->type == MessageType::kRendezvous, "worker ", k,
              ": expected the rendezvous message, got a ", to_string(message->type), " message");
    const std::string rendezvous = std::move(message->payload);
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
    // After the start-up collectives, so that the master, which watches its workers from
    // here on, names this failure at its next update() instead of waiting out a timeout.
    check_autograd_after_fork(k);
    Iterator& iterator = *iterators_[k];
    std::int64_t iteration = iteration_;
    for (;;) {
      message = channel.receive();
      // The master gone, or failing: its end of the communicator is aborted, so finalising
      // ours would wait for it in vain. Abort ours too, and leave.
      if (!message || message->type == MessageType::kAbort) {
        comm->abort();
        break;
      }
      const MessageType type = message->type;
      if (type == MessageType::kFinish) break;
      if (type == MessageType::kUpdate) {
        sink.clear();
        detail::data_parallel_step(iterator, options_, loss_fn_, device, *step, ++iteration);
      } else if (type == MessageType::kIteratorState) {
        channel.send(MessageType::kIteratorState,
                     detail::serialize([&](auto& a) { iterator.save(a); }));
      } else if (type == MessageType::kGatherState) {
        step->gather_state_for_save();
        step->release_saved_state();
      } else if (type == MessageType::kLoadState) {
        detail::deserialize(message->payload, [&](auto& a) { iterator.load(a); });
        // Then the optimizer state (empty under MasterStep) and the iteration.
        const std::string state =
            channel.receive(MessageType::kLoadState, "the optimizer state after the iterator's");
        iteration =
            std::stoll(channel.receive(MessageType::kLoadState, "the iteration after the state"));
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
        MPU_THROW(CommError, "worker ", k, ": unexpected ", to_string(type),
                  " message from the master");
      }
    }
    step.reset();
    comm.reset();
  } catch (const std::exception& e) {
    code = dynamic_cast<const CommError*>(&e) != nullptr ? detail::kWorkerExitCommError
                                                         : detail::kWorkerExitError;
    (void)channel.try_send(MessageType::kError, e.what());
    MPU_LOG_ERROR("MultiprocessParallelUpdater worker ", k, " (", devices_[k].str(),
                  ") failed: ", e.what());
  } catch (...) {
    code = detail::kWorkerExitError;
  }
  // Leave without running the parent's atexit handlers and static destructors.
  detail::exit_child(code);
}

}  // namespace mpu
