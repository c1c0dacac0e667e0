// Launch: GPU counting through NVML, the rendezvous store, the launchers' environments, init()
// and spawn().
#include "mpu/launch.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "comm/communicator_detail.h"
#include "misc/log.h"
#include "mpu/error.h"

extern char** environ;

namespace mpu {
namespace {

using Clock = std::chrono::steady_clock;

// --- NVML ------------------------------------------------------------------------------------

// NVML's device count, or 0 when the library or the driver is missing. NVML does not touch the
// CUDA driver, so this is safe before fork(). Unused in builds without CUDA.
[[maybe_unused]] int nvml_device_count() {
  void* lib = ::dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return 0;
  using InitFn = int (*)();
  using CountFn = int (*)(unsigned int*);
  using ShutdownFn = int (*)();
  auto init = reinterpret_cast<InitFn>(::dlsym(lib, "nvmlInit_v2"));
  auto count = reinterpret_cast<CountFn>(::dlsym(lib, "nvmlDeviceGetCount_v2"));
  auto shutdown = reinterpret_cast<ShutdownFn>(::dlsym(lib, "nvmlShutdown"));
  int devices = 0;
  if (init != nullptr && count != nullptr && shutdown != nullptr && init() == 0) {
    unsigned int n = 0;
    if (count(&n) == 0) devices = static_cast<int>(n);
    shutdown();
  }
  ::dlclose(lib);
  return devices;
}

// --- Environment parsing ---------------------------------------------------------------------

using Env = std::map<std::string, std::string>;

const std::string* find(const Env& env, const char* name) {
  const auto it = env.find(name);
  return it == env.end() ? nullptr : &it->second;
}

// Strict decimal integer in [lo, hi]; the message names the variable and its value.
int parse_int(const char* name, const std::string& value, int lo, int hi) {
  std::size_t pos = 0;
  long long parsed = 0;
  bool ok = !value.empty() && (std::isdigit(static_cast<unsigned char>(value[0])) != 0 ||
                               value[0] == '-' || value[0] == '+');
  if (ok) {
    try {
      parsed = std::stoll(value, &pos);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  MPU_CHECK(ok && pos == value.size(), "launch environment: ", name, "=\"", value,
            "\" is not an integer");
  MPU_CHECK(parsed >= lo && parsed <= hi, "launch environment: ", name, "=", value,
            " is out of range [", lo, ", ", hi, "]");
  return static_cast<int>(parsed);
}

int require_int(const Env& env, const char* launcher, const char* name, int lo, int hi) {
  const std::string* value = find(env, name);
  MPU_CHECK(value != nullptr, "launch environment: ", launcher, " is detected but ", name,
            " is not set");
  return parse_int(name, *value, lo, hi);
}

int optional_int(const Env& env, const char* name, int lo, int hi, int fallback) {
  const std::string* value = find(env, name);
  return value == nullptr ? fallback : parse_int(name, *value, lo, hi);
}

constexpr int kMaxRanks = 1 << 24;

// SLURM_TASKS_PER_NODE ("2(x3),1"): the task count of node `node`, or 0 when it cannot tell.
int slurm_tasks_on_node(const std::string& spec, int node) {
  std::vector<int> counts;
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    const std::size_t paren = item.find("(x");
    const int tasks = parse_int(kEnvSlurmTasksPerNode, item.substr(0, paren), 0, kMaxRanks);
    int repeat = 1;
    if (paren != std::string::npos) {
      MPU_CHECK(item.back() == ')', "launch environment: ", kEnvSlurmTasksPerNode, "=\"", spec,
                "\" is malformed");
      repeat = parse_int(kEnvSlurmTasksPerNode, item.substr(paren + 2, item.size() - paren - 3), 1,
                         kMaxRanks);
    }
    counts.insert(counts.end(), static_cast<std::size_t>(repeat), tasks);
  }
  if (node >= 0 && node < static_cast<int>(counts.size())) return counts[node];
  if (node < 0 && !counts.empty() &&
      std::all_of(counts.begin(), counts.end(), [&](int c) { return c == counts.front(); })) {
    return counts.front();
  }
  return 0;
}

}  // namespace

// --- GPUs ------------------------------------------------------------------------------------

namespace detail {

int count_visible_gpus(const char* visible, int nvml_count) {
  if (visible == nullptr) return nvml_count;
  // As CUDA reads the list: it ends at the first entry that is empty, not a device, or repeated.
  std::set<std::string> seen;
  int count = 0;
  std::stringstream items(visible);
  std::string item;
  while (std::getline(items, item, ',')) {
    const auto first = item.find_first_not_of(" \t");
    const auto last = item.find_last_not_of(" \t");
    if (first == std::string::npos) break;
    item = item.substr(first, last - first + 1);
    std::string key = item;
    if (item.rfind("GPU-", 0) == 0 || item.rfind("MIG-", 0) == 0) {
      // A UUID: CUDA checks it against the devices; NVML is not asked here, so trust it.
    } else {
      if (!std::all_of(item.begin(), item.end(),
                       [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; })) {
        break;
      }
      if (item.size() > 6) break;
      const int index = std::stoi(item);
      if (index >= nvml_count) break;
      key = std::to_string(index);
    }
    if (!seen.insert(key).second) break;
    ++count;
  }
  return count;
}

std::string first_slurm_host(const std::string& nodelist) {
  // The first entry ends at the first comma outside brackets.
  std::string entry;
  int depth = 0;
  for (char c : nodelist) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    entry += c;
  }
  // Each bracket group "[03-05,09]" becomes its first number, "03".
  std::string host;
  for (std::size_t i = 0; i < entry.size(); ++i) {
    if (entry[i] != '[') {
      host += entry[i];
      continue;
    }
    const std::size_t close = entry.find(']', i);
    MPU_CHECK(close != std::string::npos, "launch environment: SLURM node list \"", nodelist,
              "\" has an unclosed '['");
    const std::string group = entry.substr(i + 1, close - i - 1);
    host += group.substr(0, group.find_first_of(",-"));
    i = close;
  }
  const auto first = host.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return host.substr(first, host.find_last_not_of(" \t") - first + 1);
}

}  // namespace detail

int local_gpu_count() {
#if MPU_HAS_CUDA
  return detail::count_visible_gpus(std::getenv(kEnvCudaVisibleDevices), nvml_device_count());
#else
  return 0;
#endif
}

std::vector<torch::Device> local_gpus() {
  const int count = local_gpu_count();
  if (count == 0) return {torch::Device(torch::kCPU), torch::Device(torch::kCPU)};
  std::vector<torch::Device> devices;
  for (int i = 0; i < count; ++i) {
    devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
  }
  return devices;
}

void manual_seed(std::uint64_t seed) {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_current_seed(seed);
}

bool cuda_initialized() {
  // RTLD_NOLOAD: only look at a driver library that is already loaded; never load it.
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) return false;
  using GetCurrentFn = int (*)(void**);
  auto get_current = reinterpret_cast<GetCurrentFn>(::dlsym(lib, "cuCtxGetCurrent"));
  constexpr int kCudaErrorNotInitialized = 3;
  void* context = nullptr;
  const int result = get_current != nullptr ? get_current(&context) : kCudaErrorNotInitialized;
  ::dlclose(lib);
  return result != kCudaErrorNotInitialized;
}

// --- Store -----------------------------------------------------------------------------------

StoreServer serve_store(int port, std::chrono::milliseconds timeout) {
  MPU_CHECK(port >= 0 && port <= 65535, "serve_store: port ", port, " is out of range");
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = true;
  options.waitWorkers = false;
  options.timeout = timeout;
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
    const int bound = store->getPort();
    return StoreServer{store, bound};
  } catch (const std::exception& e) {
    MPU_THROW(CommError, "serve_store: could not start a TCPStore server on port ", port, ": ",
              detail::exception_text(e));
  }
}

StorePtr connect_store(const std::string& host, int port, std::chrono::milliseconds timeout) {
  MPU_CHECK(port > 0 && port <= 65535, "connect_store: port ", port, " is out of range");
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = false;
  options.timeout = timeout;
  const auto start = Clock::now();
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  } catch (const std::exception& e) {
    const std::string why = detail::exception_text(e);
    if (Clock::now() - start >= timeout * 9 / 10) {
      MPU_THROW(Timeout, "connect_store: no TCPStore server answered at ", host, ":", port,
                " within ", detail::seconds_text(timeout), ": ", why);
    }
    MPU_THROW(CommError, "connect_store: could not connect to the TCPStore at ", host, ":", port,
              ": ", why);
  }
}

// --- Launcher environment --------------------------------------------------------------------

const char* to_string(Launcher launcher) {
  switch (launcher) {
    case Launcher::kNone:
      return "none";
    case Launcher::kTorchrun:
      return "torchrun";
    case Launcher::kSlurm:
      return "slurm";
    case Launcher::kOpenMpi:
      return "openmpi";
  }
  return "unknown";
}

LaunchInfo parse_launch_env(const Env& env) {
  LaunchInfo info;
  std::string master_addr_hint;
  if (find(env, kEnvRank) != nullptr || find(env, kEnvWorldSize) != nullptr) {
    info.launcher = Launcher::kTorchrun;
    info.world_size = require_int(env, "torchrun", kEnvWorldSize, 1, kMaxRanks);
    info.rank = require_int(env, "torchrun", kEnvRank, 0, info.world_size - 1);
    // Absent when the variables were set by hand for one node: then every rank is local.
    info.local_rank = optional_int(env, kEnvLocalRank, 0, kMaxRanks, info.rank);
    info.local_world_size = optional_int(env, kEnvLocalWorldSize, 1, kMaxRanks, info.world_size);
    const std::string* agent = find(env, kEnvTorchelasticUseAgentStore);
    info.use_agent_store = agent != nullptr && *agent == "True";
    info.restart_count = optional_int(env, kEnvTorchelasticRestartCount, 0, kMaxRanks, 0);
  } else if (find(env, kEnvOmpiRank) != nullptr) {
    info.launcher = Launcher::kOpenMpi;
    info.world_size = require_int(env, "Open MPI", kEnvOmpiSize, 1, kMaxRanks);
    info.rank = require_int(env, "Open MPI", kEnvOmpiRank, 0, info.world_size - 1);
    info.local_rank = require_int(env, "Open MPI", kEnvOmpiLocalRank, 0, kMaxRanks);
    info.local_world_size = optional_int(env, kEnvOmpiLocalSize, 1, kMaxRanks, 0);
  } else if (find(env, kEnvSlurmProcId) != nullptr) {
    info.launcher = Launcher::kSlurm;
    info.world_size = require_int(env, "SLURM", kEnvSlurmNTasks, 1, kMaxRanks);
    info.rank = require_int(env, "SLURM", kEnvSlurmProcId, 0, info.world_size - 1);
    info.local_rank = require_int(env, "SLURM", kEnvSlurmLocalId, 0, kMaxRanks);
    if (const std::string* per_node = find(env, kEnvSlurmNTasksPerNode)) {
      info.local_world_size = parse_int(kEnvSlurmNTasksPerNode, *per_node, 1, kMaxRanks);
    } else if (const std::string* tasks = find(env, kEnvSlurmTasksPerNode)) {
      const int node = optional_int(env, kEnvSlurmNodeId, 0, kMaxRanks, -1);
      info.local_world_size = slurm_tasks_on_node(*tasks, node);
    } else {
      info.local_world_size = 0;
    }
    const std::string* nodes = find(env, kEnvSlurmStepNodeList);
    if (nodes == nullptr) nodes = find(env, kEnvSlurmNodeList);
    if (nodes != nullptr) master_addr_hint = detail::first_slurm_host(*nodes);
  }
  MPU_CHECK(info.local_world_size == 0 || info.local_rank < info.local_world_size,
            "launch environment (", to_string(info.launcher), "): local rank ", info.local_rank,
            " is not below the local world size ", info.local_world_size);

  if (const std::string* addr = find(env, kEnvMasterAddr); addr != nullptr && !addr->empty()) {
    info.master_addr = *addr;
  } else if (!master_addr_hint.empty()) {
    info.master_addr = master_addr_hint;
  } else {
    MPU_CHECK(
        info.world_size == 1 || info.local_world_size == info.world_size, "launch environment (",
        to_string(info.launcher), "): ", kEnvMasterAddr, " is not set, and the ", info.world_size,
        " ranks may span several nodes (",
        info.local_world_size == 0 ? std::string("unknown") : std::to_string(info.local_world_size),
        " on this one); export ", kEnvMasterAddr,
        "=<host of rank 0> (with mpirun: -x MASTER_ADDR)");
    info.master_addr = "127.0.0.1";
  }
  if (const std::string* port = find(env, kEnvMasterPort)) {
    info.master_port = parse_int(kEnvMasterPort, *port, 1, 65535);
  }
  return info;
}

LaunchInfo launch_info_from_env() {
  Env env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const char* eq = std::strchr(*entry, '=');
    if (eq == nullptr) continue;
    env.emplace(std::string(*entry, static_cast<std::size_t>(eq - *entry)), std::string(eq + 1));
  }
  return parse_launch_env(env);
}

// --- init ------------------------------------------------------------------------------------

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

// --- spawn -----------------------------------------------------------------------------------

std::shared_ptr<Communicator> SpawnContext::make_communicator() const {
  MPU_CHECK(store,
            "SpawnContext::make_communicator: no store; spawn() ran with "
            "SpawnOptions::store = false");
  return mpu::make_communicator(device, store, rank, world_size, timeout);
}

namespace {

constexpr std::size_t kMaxMessageBytes = 64 * 1024;
constexpr std::chrono::milliseconds kSupervisePoll{20};

struct Child {
  pid_t pid = -1;
  int fd = -1;  // read end of the rank's message pipe; -1 once closed
  bool running = false;
  bool signalled = false;  // we sent it SIGTERM/SIGKILL
  int status = 0;
  std::string message;
};

void write_all(int fd, const std::string& text) {
  const char* data = text.data();
  std::size_t left = std::min(text.size(), kMaxMessageBytes);
  while (left > 0) {
    const ssize_t n = ::write(fd, data, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    data += n;
    left -= static_cast<std::size_t>(n);
  }
}

// Reads what is available; closes the pipe at end of file.
void drain(Child& child) {
  char buffer[4096];
  while (child.fd >= 0) {
    const ssize_t n = ::read(child.fd, buffer, sizeof(buffer));
    if (n > 0) {
      if (child.message.size() < kMaxMessageBytes) child.message.append(buffer, n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    ::close(child.fd);
    child.fd = -1;
  }
}

bool succeeded(int status) {
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

std::string how_it_ended(int status) {
  if (WIFEXITED(status)) return detail::cat("exited with code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return detail::cat("was killed by signal ", sig, " (", name ? name : "unknown", ")",
                       WCOREDUMP(status) ? ", core dumped" : "");
  }
  return detail::cat("ended with wait status ", status);
}

std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

[[noreturn]] void run_child(int rank, int n, const torch::Device& device, int port, int write_fd,
                            pid_t parent, const std::function<void(const SpawnContext&)>& fn,
                            const SpawnOptions& options) {
  // Die with the parent; if it is already gone, do not run at all.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  // A rank starts with the default disposition of the signals that stop or crash it, whatever
  // handlers the parent installed (a test framework's, say): SIGTERM from spawn() must end it,
  // and a crash must show as its signal.
  for (int sig : {SIGTERM, SIGINT, SIGQUIT, SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    ::signal(sig, SIG_DFL);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  int code = 0;
  std::string message;
  try {
    if (options.threads_per_rank > 0) at::set_num_threads(options.threads_per_rank);
    SpawnContext context;
    context.rank = rank;
    context.world_size = n;
    context.device = device;
    context.timeout = options.timeout;
    if (port > 0) context.store = connect_store("127.0.0.1", port, options.timeout);
    fn(context);
  } catch (...) {
    message = detail::current_exception_text();
    if (message.empty()) message = "(an exception with an empty message)";
    code = 1;
  }
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  if (code != 0) write_all(write_fd, message);
  ::_exit(code);
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

// Sends `sig` to every running child.
void signal_running(std::vector<Child>& children, int sig) {
  for (Child& child : children) {
    if (child.running) {
      ::kill(child.pid, sig);
      child.signalled = true;
    }
  }
}

// SIGKILLs and reaps every started child: the cleanup when spawn() itself fails.
void kill_and_reap(std::vector<Child>& children) noexcept {
  for (Child& child : children) {
    if (child.running) {
      ::kill(child.pid, SIGKILL);
      while (::waitpid(child.pid, &child.status, 0) < 0 && errno == EINTR) {
      }
      child.running = false;
    }
    if (child.fd >= 0) {
      ::close(child.fd);
      child.fd = -1;
    }
  }
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

  StoreServer server;
  if (options.store) server = serve_store(0, options.timeout);
  const ChildStatusGuard child_status;

  // Buffered output would otherwise be written once by the parent and once by every child.
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);

  const pid_t parent = ::getpid();
  std::vector<Child> children(static_cast<std::size_t>(n));
  for (int rank = 0; rank < n; ++rank) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
      const int err = errno;
      kill_and_reap(children);
      MPU_THROW(CommError, "spawn: pipe() for rank ", rank, " failed: ", std::strerror(err));
    }
    const pid_t pid = ::fork();
    if (pid < 0) {
      const int err = errno;
      ::close(fds[0]);
      ::close(fds[1]);
      kill_and_reap(children);
      MPU_THROW(CommError, "spawn: fork() of rank ", rank, " of ", n,
                " failed: ", std::strerror(err));
    }
    if (pid == 0) {
      ::close(fds[0]);
      for (int earlier = 0; earlier < rank; ++earlier) ::close(children[earlier].fd);
      run_child(rank, n, devices[rank], server.port, fds[1], parent, fn, options);
    }
    ::close(fds[1]);
    ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    children[rank] = Child{pid, fds[0], true, false, 0, {}};
  }

  // Supervise: collect messages, reap exits, stop everyone on the first failure.
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
    signal_running(children, SIGTERM);
  };
  int running = n;
  while (running > 0) {
    std::vector<pollfd> fds;
    for (const Child& child : children) {
      if (child.fd >= 0) fds.push_back(pollfd{child.fd, POLLIN, 0});
    }
    if (fds.empty()) {
      std::this_thread::sleep_for(kSupervisePoll);
    } else {
      (void)::poll(fds.data(), fds.size(), static_cast<int>(kSupervisePoll.count()));
    }
    for (int rank = 0; rank < n; ++rank) {
      Child& child = children[rank];
      drain(child);
      if (!child.running) continue;
      int status = 0;
      const pid_t done = ::waitpid(child.pid, &status, WNOHANG);
      if (done < 0 && errno == ECHILD) {
        // SIGCHLD is ignored, so the kernel reaped the child and its exit status is lost: judge
        // by the message it left (a rank that throws always leaves one).
        if (::kill(child.pid, 0) == 0) continue;
        drain(child);
        status = child.message.empty() ? 0 : (1 << 8);
      } else if (done != child.pid) {
        continue;
      }
      child.running = false;
      child.status = status;
      --running;
      drain(child);
      if (!succeeded(status) && !child.signalled && first_failure < 0) {
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
      signal_running(children, SIGKILL);
    }
  }
  for (Child& child : children) {
    if (child.fd >= 0) {
      ::close(child.fd);
      child.fd = -1;
    }
  }

  auto describe_rank = [&](int rank) {
    const Child& child = children[rank];
    const std::string message = trimmed(child.message);
    return detail::cat("rank ", rank, " of ", n, " (", devices[rank].str(), ") ",
                       how_it_ended(child.status), ": ",
                       message.empty() ? "(no error message)" : message);
  };
  if (first_failure >= 0 || timed_out) {
    std::string others;
    std::vector<int> stopped;
    for (int rank = 0; rank < n; ++rank) {
      if (rank == first_failure) continue;
      const Child& child = children[rank];
      if (child.signalled && (!WIFEXITED(child.status) || child.message.empty())) {
        stopped.push_back(rank);
      } else if (!succeeded(child.status)) {
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
