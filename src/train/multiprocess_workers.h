// The master's side of a MultiprocessParallelUpdater's workers: their processes (one
// Supervisor), their channels, and the description of a worker that died. Every failure the
// master sees on a worker's channel ends in describe(): the worker's rank, device, pid and how
// it ended, never the bare channel error.
#pragma once

#include <torch/serialize.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "mpu/launch.h"
#include "process/channel.h"
#include "process/supervisor.h"

namespace mpu::detail {

/// State that crosses a channel (iterator and optimizer state) as a torch archive's bytes.
std::string serialize(const std::function<void(torch::serialize::OutputArchive&)>& fn);
void deserialize(const std::string& blob,
                 const std::function<void(torch::serialize::InputArchive&)>& fn);

struct Worker {
  int rank = 0;
  torch::Device device = torch::kCPU;
  Channel channel;  // the master's end of the worker's socket pair
};

struct WorkerSet {
  Supervisor processes;  // processes.pid(i) runs workers[i]
  std::vector<Worker> workers;
  std::optional<StoreServer> store;                    // Gloo only: the master's rendezvous
  std::chrono::milliseconds grace = kWorkerExitGrace;  // stop(): before SIGKILL
  bool failing = false;  // stop() after a failure: close the sockets, the workers leave at once
  // The first failure, once the updater failed: "worker 2 (cpu, pid 7) was killed by ...".
  // Every later call repeats it, since the updater cannot go on.
  std::string failure;
  bool failure_is_comm = false;

  ~WorkerSet() { stop(); }

  // "worker 2 (cpu, pid 123) was killed by signal 9 (Killed)[: <the error it sent>]".
  std::string describe(std::size_t i, const std::string& why) const;

  // The error text worker `i` sent before exiting, or "" (none, or its channel broke).
  std::string error_text(std::size_t i) noexcept;

  // Throws CommError naming a dead worker, if one dies within `wait`, and records it as the
  // failure. One death brings down the others (their collectives fail), so once one is found
  // dead the others get a moment to show, and the worker blamed is one that failed on its own
  // (killed by a signal, or its own error), the first the death watch saw if it is one.
  void raise_if_dead(std::chrono::milliseconds wait);

  // The iterator state of worker `i`, asked for through its channel; CommError naming the
  // worker when it is dead, Timeout when it does not answer within `timeout`.
  std::string iterator_state(std::size_t i, std::chrono::milliseconds timeout,
                             std::chrono::milliseconds bound);

  // Asks every worker to finish, waits up to `grace` for all of them, kills the ones left, and
  // reaps all. Idempotent; noexcept.
  void stop() noexcept;
};

}  // namespace mpu::detail
