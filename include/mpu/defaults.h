/// \file
/// Every environment variable torch-mpu reads, and every tuning default, in one place.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace mpu {

// --- Logging -----------------------------------------------------------------------------------
/// Log level: "error", "warn", "info" (default) or "debug".
inline constexpr const char* kEnvLogLevel = "MPU_LOG_LEVEL";

// --- Communication -----------------------------------------------------------------------------
/// Seconds a collective may take before the communicator aborts it and throws `mpu::Timeout`.
inline constexpr const char* kEnvCommTimeout = "MPU_COMM_TIMEOUT_SEC";
/// Default deadline of one collective, and of a rendezvous.
inline constexpr std::chrono::seconds kDefaultCommTimeout{300};
/// How often a waiting communicator polls for asynchronous errors and dead peers.
inline constexpr std::chrono::milliseconds kCommPollInterval{1};

// --- Launch (torchrun, SLURM, Open MPI) ----------------------------------------------------------
/// torchrun: the global rank of this process.
inline constexpr const char* kEnvRank = "RANK";
/// torchrun: the number of ranks in the job.
inline constexpr const char* kEnvWorldSize = "WORLD_SIZE";
/// torchrun: the rank of this process on its node (its GPU index by default).
inline constexpr const char* kEnvLocalRank = "LOCAL_RANK";
/// torchrun: the number of ranks on this node.
inline constexpr const char* kEnvLocalWorldSize = "LOCAL_WORLD_SIZE";
/// Host of the rendezvous store, for every launcher.
inline constexpr const char* kEnvMasterAddr = "MASTER_ADDR";
/// Port of the rendezvous store, for every launcher (default `kDefaultMasterPort`).
inline constexpr const char* kEnvMasterPort = "MASTER_PORT";
/// SLURM (srun): the global rank.
inline constexpr const char* kEnvSlurmProcId = "SLURM_PROCID";
/// SLURM: the number of ranks.
inline constexpr const char* kEnvSlurmNTasks = "SLURM_NTASKS";
/// SLURM: the rank on this node.
inline constexpr const char* kEnvSlurmLocalId = "SLURM_LOCALID";
/// SLURM: ranks per node, when the job gives one number for all nodes.
inline constexpr const char* kEnvSlurmNTasksPerNode = "SLURM_NTASKS_PER_NODE";
/// SLURM: the job's nodes; without MASTER_ADDR and SLURM_STEP_NODELIST, its first is the master.
inline constexpr const char* kEnvSlurmNodeList = "SLURM_JOB_NODELIST";
/// Open MPI (mpirun): the global rank.
inline constexpr const char* kEnvOmpiRank = "OMPI_COMM_WORLD_RANK";
/// Open MPI: the number of ranks.
inline constexpr const char* kEnvOmpiSize = "OMPI_COMM_WORLD_SIZE";
/// Open MPI: the rank on this node.
inline constexpr const char* kEnvOmpiLocalRank = "OMPI_COMM_WORLD_LOCAL_RANK";
/// Open MPI: the number of ranks on this node.
inline constexpr const char* kEnvOmpiLocalSize = "OMPI_COMM_WORLD_LOCAL_SIZE";
/// The rendezvous port when MASTER_PORT is unset.
inline constexpr int kDefaultMasterPort = 29500;
/// The GPUs CUDA may use; `local_gpu_count()` applies it to NVML's count.
inline constexpr const char* kEnvCudaVisibleDevices = "CUDA_VISIBLE_DEVICES";

// --- Communicators and launch (communicator.h, launch.h) --------------------------------------
/// How often an NCCL communicator's watchdog thread checks the collectives in flight.
inline constexpr std::chrono::milliseconds kCommWatchdogInterval{100};
/// The longest an NCCL communicator's destructor waits for ncclCommFinalize (capped by the
/// communicator's timeout) before it aborts instead: a destructor must not block for minutes.
inline constexpr std::chrono::milliseconds kNcclFinalizeTimeout{10000};
/// How often a Gloo collective that waits for its peers looks at the abort flag, so that
/// abort() from another thread wakes it.
inline constexpr std::chrono::milliseconds kGlooAbortCheckInterval{50};
/// "1": create NCCL communicators in blocking mode. The default, non-blocking mode lets a
/// rendezvous or a first collective that a peer never joins time out instead of hanging.
inline constexpr const char* kEnvNcclBlocking = "MPU_NCCL_BLOCKING";
/// "high" (the default) or "normal": the CUDA priority of an NCCL communicator's stream. High
/// lets communication kernels be scheduled ahead of queued compute; normal is what
/// torch.distributed's ProcessGroupNCCL uses. For measuring which overlaps backward better.
inline constexpr const char* kEnvNcclStreamPriority = "MPU_NCCL_STREAM_PRIORITY";
/// Network interface for Gloo (the same variable torch.distributed reads).
inline constexpr const char* kEnvGlooSocketIfname = "GLOO_SOCKET_IFNAME";
/// Set to "True" by torchrun when its agent hosts the store at MASTER_ADDR:MASTER_PORT.
inline constexpr const char* kEnvTorchelasticUseAgentStore = "TORCHELASTIC_USE_AGENT_STORE";
/// torchrun: how often the agent restarted the job; part of the store prefix.
inline constexpr const char* kEnvTorchelasticRestartCount = "TORCHELASTIC_RESTART_COUNT";
/// SLURM's per-node task counts ("4(x2),3") and this node's index in the step.
inline constexpr const char* kEnvSlurmTasksPerNode = "SLURM_TASKS_PER_NODE";
/// SLURM: this node's index in the job step.
inline constexpr const char* kEnvSlurmNodeId = "SLURM_NODEID";
/// The nodes of this job step, preferred over SLURM_JOB_NODELIST for the master address.
inline constexpr const char* kEnvSlurmStepNodeList = "SLURM_STEP_NODELIST";
/// spawn(): time between SIGTERM and SIGKILL when the other ranks are stopped after a failure.
inline constexpr std::chrono::milliseconds kSpawnGracePeriod{2000};

// --- Data --------------------------------------------------------------------------------------
/// Overrides the Fashion-MNIST directory.
inline constexpr const char* kEnvFashionMnistDir = "FASHION_MNIST_DIR";
/// Where Debian's dataset-fashion-mnist package installs the gzip idx files.
inline constexpr const char* kDefaultFashionMnistDir = "/usr/share/datasets/fashion-mnist";
/// The MNIST directory (no Debian package ships MNIST, so there is no default).
inline constexpr const char* kEnvMnistDir = "MNIST_DIR";

// --- Packing and stepping ----------------------------------------------------------------------
/// Gradient bucket size for overlapped communication.
inline constexpr std::size_t kDefaultBucketBytes = std::size_t{25} << 20;

// --- Training loop (Trainer and extensions) ----------------------------------------------------
/// Where a Trainer writes its log, plots and snapshots.
inline constexpr const char* kDefaultOutDir = "result";
/// Snapshot file names; "{iteration}" and "{epoch}" are replaced by the counters.
inline constexpr const char* kDefaultSnapshotPattern = "snapshot_iter_{iteration}";
/// How many snapshots Snapshot keeps (0 keeps all).
inline constexpr int kDefaultSnapshotKeepLast = 3;
/// LogReport's file in the output directory.
inline constexpr const char* kDefaultLogFilename = "log";
/// PlotReport's image in the output directory.
inline constexpr const char* kDefaultPlotFilename = "plot.png";
/// Iterations between two ProgressBar updates.
inline constexpr std::int64_t kDefaultProgressUpdateInterval = 100;
/// Characters in ProgressBar's bar.
inline constexpr int kDefaultProgressBarLength = 50;
/// Version of the snapshot layout written by Trainer::save.
inline constexpr std::int64_t kSnapshotFormatVersion = 1;

// --- Reliability (docs/reliability.md) ----------------------------------------------------------
/// Seconds (fractions allowed) within which a MultiprocessParallelUpdater's master throws
/// `mpu::CommError` after one of its workers has died, and within which the workers of a dead
/// master exit. Overrides `kDefaultWorkerDeathTimeout` when `UpdaterOptions::worker_death_timeout`
/// is left at 0.
inline constexpr const char* kEnvWorkerDeathTimeout = "MPU_WORKER_DEATH_TIMEOUT_SEC";
/// The default of that bound.
inline constexpr std::chrono::milliseconds kDefaultWorkerDeathTimeout{10000};
/// How often the master checks whether a worker has died, and a worker whether the master has.
inline constexpr std::chrono::milliseconds kWorkerWatchInterval{50};
/// How long `MultiprocessParallelUpdater::finalize()` waits for idle workers to leave after
/// asking them to, before it kills them.
inline constexpr std::chrono::milliseconds kWorkerExitGrace{10000};

}  // namespace mpu
