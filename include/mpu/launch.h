/// \file
/// Starting a data-parallel job: reading the launcher's environment (torchrun, SLURM, Open MPI)
/// in `init()`, forking local ranks with `spawn()`, and counting GPUs without touching CUDA.
///
/// CUDA does not survive `fork()`: after `cudaGetDeviceCount`, `torch::cuda::device_count()`,
/// `torch::cuda::is_available()` or anything else that calls `cuInit`, a forked child cannot use
/// the GPU. So count GPUs with `local_gpu_count()`/`local_gpus()` (NVML), and call `spawn()` first
/// thing in `main`.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mpu/communicator.h"
#include "mpu/defaults.h"

namespace mpu {

// --- GPUs ------------------------------------------------------------------------------------

/// The number of GPUs this process may use: NVML's device count (libnvidia-ml.so.1, loaded with
/// dlopen), limited by CUDA_VISIBLE_DEVICES as CUDA reads it (the list ends at its first invalid
/// or repeated entry). Does not initialise CUDA, so it is safe before `fork()`. 0 when NVML or
/// the driver is missing, and always 0 in a build without CUDA.
int local_gpu_count();

/// `cuda:0` … `cuda:{n-1}` for the n GPUs of `local_gpu_count()`, or `{cpu, cpu}` when there is
/// none, so that CPU-only machines still run two processes.
std::vector<torch::Device> local_gpus();

/// True once something in this process has initialised the CUDA driver (`cuInit`): then forked
/// children cannot use CUDA. Asks the driver only when it is already loaded; never initialises it.
bool cuda_initialized();

/// Seeds LibTorch's default CPU generator, and nothing else. Use it instead of
/// `torch::manual_seed` before a `MultiprocessParallelUpdater` forks: on CUDA builds of LibTorch,
/// `torch::manual_seed` also seeds every GPU's generator, which initialises CUDA, and the forked
/// workers could then not use their GPUs. Each process seeds its own GPU generators later, if it
/// needs to.
void manual_seed(std::uint64_t seed);

// --- Rendezvous store ------------------------------------------------------------------------

/// A TCPStore server started in this process, and the port it listens on.
struct StoreServer {
  StorePtr store;  ///< Also usable as a client by this process.
  int port = 0;    ///< The bound port: the one asked for, or the one the OS chose for port 0.
};

/// Starts a c10d TCPStore server on `port` (0: any free port) on all interfaces. Starting it
/// starts threads: fork children before, or have the children connect as clients and leave with
/// `_exit()`.
StoreServer serve_store(int port = 0, std::chrono::milliseconds timeout = comm_timeout());

/// A TCPStore client of the server at `host:port`. Retries until `timeout` while the server is
/// not up yet, then throws `mpu::CommError`.
StorePtr connect_store(const std::string& host, int port,
                       std::chrono::milliseconds timeout = comm_timeout());

// --- Launcher environment --------------------------------------------------------------------

/// Which launcher started the process.
enum class Launcher { kNone, kTorchrun, kSlurm, kOpenMpi };

/// "none", "torchrun", "slurm" or "openmpi".
const char* to_string(Launcher launcher);

/// What the launcher told this process.
struct LaunchInfo {
  /// The launcher whose variables were found.
  Launcher launcher = Launcher::kNone;
  /// Global rank, in [0, world_size).
  int rank = 0;
  /// Number of ranks in the job.
  int world_size = 1;
  /// Rank on this node, in [0, local_world_size); the GPU index by default.
  int local_rank = 0;
  /// Ranks on this node; 0 when the launcher does not say.
  int local_world_size = 1;
  /// Host of the rendezvous store (rank 0's host, or torchrun's agent).
  std::string master_addr = "127.0.0.1";
  /// Port of the rendezvous store.
  int master_port = kDefaultMasterPort;
  /// torchrun hosts the store in its agent (TORCHELASTIC_USE_AGENT_STORE=True): every rank is a
  /// client, under the prefix "/worker/attempt_<restart_count>", as torch.distributed does.
  bool use_agent_store = false;
  /// torchrun's restart count (TORCHELASTIC_RESTART_COUNT), 0 otherwise.
  int restart_count = 0;
};

/// Reads a launcher environment given as a map, without touching the process's. The first
/// launcher whose variables are present wins, in this order:
/// - torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and
///   TORCHELASTIC_USE_AGENT_STORE / TORCHELASTIC_RESTART_COUNT.
/// - Open MPI: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE. (Before SLURM, because
///   mpirun inside an allocation inherits the batch step's SLURM_PROCID.)
/// - SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the local size from
///   SLURM_NTASKS_PER_NODE or from SLURM_TASKS_PER_NODE ("4(x2),3") and SLURM_NODEID.
/// - none of these: a single process, rank 0 of 1.
/// MASTER_ADDR and MASTER_PORT override the defaults for every launcher. Without MASTER_ADDR:
/// SLURM uses the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST); every launcher uses
/// 127.0.0.1 when all ranks are on one node; otherwise it is an error that says what to set.
/// MASTER_PORT defaults to `kDefaultMasterPort`. Throws `mpu::InvalidArgument` naming the variable
/// and its value when one is malformed or out of range.
LaunchInfo parse_launch_env(const std::map<std::string, std::string>& env);

/// `parse_launch_env` of this process's environment.
LaunchInfo launch_info_from_env();

namespace detail {
/// The first host of a SLURM node list: "gpu[03-05,09],cpu1" gives "gpu03". Empty for "".
std::string first_slurm_host(const std::string& nodelist);
/// The GPU count CUDA would see, given NVML's `nvml_count` and CUDA_VISIBLE_DEVICES (`visible`,
/// nullptr when unset).
int count_visible_gpus(const char* visible, int nvml_count);
}  // namespace detail

// --- init ------------------------------------------------------------------------------------

/// What `init()` may override.
struct InitOptions {
  /// The device of this rank. Unset: `cuda:<local_rank>` when GPUs are visible (`cuda:0` when
  /// exactly one is, as with per-task GPU binding), else the CPU.
  c10::optional<torch::Device> device;
  /// The launcher environment; unset: `launch_info_from_env()`.
  c10::optional<LaunchInfo> info;
  /// Deadline of the rendezvous and of every collective of the communicator.
  std::chrono::milliseconds timeout = comm_timeout();
};

/// A rank of a job started by a launcher.
struct Distributed {
  /// What the launcher told this process.
  LaunchInfo info;
  /// This rank's device (see `InitOptions::device`).
  torch::Device device = torch::kCPU;
  /// A client of the rendezvous store, shared by every rank; usable for further communicators.
  StorePtr store;
  /// This rank's communicator: NCCL on a GPU, Gloo on the CPU.
  std::shared_ptr<Communicator> comm;
};

/// Joins the job the launcher started: reads its environment, meets the other ranks through a
/// c10d TCPStore at MASTER_ADDR:MASTER_PORT (hosted by rank 0, or by torchrun's agent), and builds
/// the communicator for this rank's device: NCCL for CUDA (the unique id travels through the
/// store), Gloo for the CPU. A single process without a launcher gets a one-rank communicator over
/// an in-process store. Throws `mpu::Timeout` when the others do not join within the timeout.
Distributed init(const InitOptions& options = {});

// --- spawn -----------------------------------------------------------------------------------

/// What each rank of `spawn()` is given.
struct SpawnContext {
  /// This rank, in [0, world_size).
  int rank = 0;
  /// The number of ranks `spawn()` forked.
  int world_size = 1;
  /// This rank's device: `SpawnOptions::devices[rank]`.
  torch::Device device = torch::kCPU;
  /// A client of the TCPStore the parent serves; null when `SpawnOptions::store` is false.
  StorePtr store;
  /// `SpawnOptions::timeout`, for this rank's communicators.
  std::chrono::milliseconds timeout = comm_timeout();

  /// `make_communicator(device, store, rank, world_size, timeout)`.
  std::shared_ptr<Communicator> make_communicator() const;
};

/// How `spawn()` runs the ranks.
struct SpawnOptions {
  /// One device per rank; empty: `cuda:0` … `cuda:{n-1}` when `local_gpu_count() >= n` GPUs are
  /// visible, n CPU ranks when none is.
  std::vector<torch::Device> devices;
  /// Serve a TCPStore in the parent and give every rank a client of it.
  bool store = true;
  /// Intra-op threads of each rank (`at::set_num_threads`); 0 leaves LibTorch's default. Use 1
  /// when the parent may already have run a parallel CPU op: GNU OpenMP hangs in a forked child
  /// otherwise.
  int threads_per_rank = 0;
  /// The collective timeout handed to the ranks.
  std::chrono::milliseconds timeout = comm_timeout();
  /// Between SIGTERM and SIGKILL when the other ranks are stopped after a failure.
  std::chrono::milliseconds grace = kSpawnGracePeriod;
  /// Stop all ranks and throw `mpu::Timeout` when they have not all finished by then; 0: no limit.
  std::chrono::milliseconds time_limit{0};
};

/// Forks `n` ranks, runs `fn` in each, and waits for all of them. Call it at the start of `main`,
/// before CUDA and before any thread pool: the parent only forks, serves the store and waits.
///
/// Each child runs `fn(context)` and leaves with `_exit()`: 0 when `fn` returns, 1 when it throws
/// (the exception's `what()` goes back to the parent through a pipe). The children die with the
/// parent (PR_SET_PDEATHSIG), and start with the default handlers of SIGTERM, SIGINT, SIGQUIT and
/// the crash signals, and no blocked signals.
///
/// Fails fast: when a rank exits non-zero, is killed by a signal or throws, `spawn` sends SIGTERM
/// to the others (SIGKILL after `grace`), reaps every child, and throws `mpu::CommError` naming
/// the rank, its exit code or signal, and its message; other ranks that failed on their own are
/// listed too. Throws `mpu::InvalidArgument` for CUDA devices when CUDA is already initialised.
void spawn(int n, const std::function<void(const SpawnContext&)>& fn,
           const SpawnOptions& options = {});

}  // namespace mpu
