// init(): one rank of a job started by a launcher (or by hand), and manual_seed().
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <mutex>
#include <string>

#include "comm/communicator_detail.h"
#include "misc/log.h"
#include "mpu/error.h"
#include "mpu/launch.h"

namespace mpu {

void manual_seed(std::uint64_t seed) {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_current_seed(seed);
}

namespace {

torch::Device default_device(const LaunchInfo& info) {
  const int gpus = local_gpu_count();
  if (gpus == 0) return torch::kCPU;
  if (gpus == 1) return torch::Device(torch::kCUDA, 0);
  MPU_CHECK(info.local_rank < gpus, "init: local rank ", info.local_rank, " but only ", gpus,
            " GPUs are visible on this node; start at most ", gpus,
            " ranks per node, or give each rank its GPU through ", kEnvCudaVisibleDevices);
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(info.local_rank));
}

}  // namespace

Distributed init(const InitOptions& options) {
  Distributed job;
  job.info = options.info ? *options.info : launch_info_from_env();
  const LaunchInfo& info = job.info;
  job.device = options.device ? *options.device : default_device(info);
  if (info.world_size == 1) {
    job.store = c10::make_intrusive<c10d::HashStore>();
  } else if (info.use_agent_store) {
    job.store = c10::make_intrusive<c10d::PrefixStore>(
        detail::cat("/worker/attempt_", info.restart_count),
        connect_store(info.master_addr, info.master_port, options.timeout));
  } else if (info.rank == 0) {
    job.store = serve_store(info.master_port, options.timeout).store;
  } else {
    job.store = connect_store(info.master_addr, info.master_port, options.timeout);
  }
  job.comm = make_communicator(job.device, job.store, info.rank, info.world_size, options.timeout);
  MPU_LOG_INFO(
      "init: rank ", info.rank, " of ", info.world_size, " (", to_string(info.launcher),
      ", local rank ", info.local_rank, ") on ", job.device.str(), " with ", job.comm->backend(),
      info.world_size == 1 ? std::string(", in-process store")
                           : detail::cat(", store at ", info.master_addr, ":", info.master_port,
                                         info.use_agent_store ? " (torchrun's agent)" : ""));
  return job;
}

}  // namespace mpu
