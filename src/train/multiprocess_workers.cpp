#include "train/multiprocess_workers.h"

#include <algorithm>
#include <sstream>
#include <thread>

#include "misc/log.h"
#include "mpu/error.h"
#include "process/worker_watch.h"

namespace mpu::detail {
namespace {
using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kDeathSettle{200};
constexpr std::chrono::milliseconds kReapPoll{5};
}  // namespace

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

std::string WorkerSet::describe(std::size_t i, const std::string& why) const {
  const Worker& w = workers[i];
  return cat("worker ", w.rank, " (", w.device.str(), ", pid ", processes.pid(i), ") ",
             processes.reaped(i) ? describe_worker_status(processes.status(i))
                                 : "closed its socket but is still running",
             why.empty() ? "" : ": ", why);
}

std::string WorkerSet::error_text(std::size_t i) noexcept {
  // A worker killed with unread messages resets the connection: reading then fails, and that
  // must not replace the description of how the worker ended.
  try {
    Channel& channel = workers[i].channel;
    while (channel.is_open() && channel.readable(std::chrono::milliseconds(0))) {
      std::optional<Message> message = channel.receive();
      if (!message) break;
      if (message->type == MessageType::kError) return message->payload;
    }
  } catch (const std::exception& e) {
    MPU_LOG_DEBUG("MultiprocessParallelUpdater: reading worker ", workers[i].rank,
                  "'s last message failed: ", e.what());
  }
  return "";
}

void WorkerSet::raise_if_dead(std::chrono::milliseconds wait) {
  auto deadline = Clock::now() + wait;
  bool any = false;
  for (;;) {
    bool own = false;
    for (std::size_t i = 0; i < workers.size(); ++i) {
      if (processes.reap(i)) {
        any = true;
        own = own || !is_consequential_exit(processes.status(i));
      }
    }
    const auto now = Clock::now();
    if (own || (any && now >= deadline)) break;
    if (!any && now >= deadline) return;
    if (any) deadline = std::min(deadline, now + kDeathSettle);
    std::this_thread::sleep_for(kReapPoll);
  }
  auto on_its_own = [&](std::size_t i) {
    return processes.reaped(i) && !is_consequential_exit(processes.status(i));
  };
  std::optional<std::size_t> blame;
  const int first = processes.first_dead();
  if (first >= 0 && on_its_own(static_cast<std::size_t>(first)))
    blame = static_cast<std::size_t>(first);
  for (std::size_t i = 0; i < workers.size() && !blame; ++i) {
    if (on_its_own(i)) blame = i;
  }
  if (!blame && first >= 0 && processes.reaped(static_cast<std::size_t>(first)))
    blame = static_cast<std::size_t>(first);
  for (std::size_t i = 0; i < workers.size() && !blame; ++i) {
    if (processes.reaped(i)) blame = i;
  }
  failure = describe(*blame, error_text(*blame));
  failure_is_comm = true;
  throw CommError(where(__FILE__, __LINE__) + "MultiprocessParallelUpdater: " + failure);
}

std::string WorkerSet::iterator_state(std::size_t i, std::chrono::milliseconds timeout,
                                      std::chrono::milliseconds bound) {
  Worker& w = workers[i];
  std::string why;
  try {
    w.channel.send(MessageType::kIteratorState);
    if (!w.channel.readable(timeout)) {
      MPU_THROW(Timeout, "MultiprocessParallelUpdater::save: worker ", w.rank, " (", w.device.str(),
                ", pid ", processes.pid(i), ") did not send its iterator state within ",
                timeout.count(), " ms");
    }
    std::optional<Message> reply = w.channel.receive();
    if (reply && reply->type == MessageType::kIteratorState) return std::move(reply->payload);
    if (reply && reply->type == MessageType::kError) why = std::move(reply->payload);
  } catch (const Timeout&) {
    throw;
  } catch (const CommError& e) {
    // The channel broke: the worker's exit says why, better than the channel can.
    MPU_LOG_DEBUG("MultiprocessParallelUpdater::save: worker ", w.rank, "'s channel: ", e.what());
  }
  processes.reap(i, bound);
  failure = describe(i, why);
  failure_is_comm = true;
  throw CommError(where(__FILE__, __LINE__) +
                  "MultiprocessParallelUpdater::save (iterator state): " + failure);
}

void WorkerSet::stop() noexcept {
  for (Worker& w : workers) {
    if (!w.channel.is_open()) continue;
    (void)w.channel.try_send(failing ? MessageType::kAbort : MessageType::kFinish);
    // A worker blocked in a collective or in user code cannot read the message; its watch of
    // the master sees the socket close and ends it (status 5).
    if (failing) w.channel.shutdown_write();
  }
  // The workers ignore SIGTERM (it is meant for the master, which then stops them), so no TERM:
  // they leave on the message, or are killed after the grace.
  processes.stop(grace, /*term=*/false);
  workers.clear();
  store.reset();
}

}  // namespace mpu::detail
