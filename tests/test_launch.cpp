// Launch: the launchers' environments (pure parsing), GPU counting rules, spawn()'s fail-fast
// behaviour, and init() over a real TCPStore.
#include "catch_torch.h"
#include "messages.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <thread>

#include "mpu/config.h"
#include "mpu/launch.h"
#include "multiprocess.h"

namespace {

using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;
using Env = std::map<std::string, std::string>;

using mpu::test::message_of;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// True when this process has no child left to reap: spawn() left no zombie behind.
bool no_children_left() {
  return ::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD;
}

mpu::SpawnOptions cpu_ranks(int n) {
  mpu::SpawnOptions options;
  options.devices.assign(static_cast<std::size_t>(n), torch::kCPU);
  options.threads_per_rank = 1;
  options.grace = std::chrono::milliseconds(500);
  return options;
}

void sleep_seconds(int s) {
  std::this_thread::sleep_for(std::chrono::seconds(s));
}

}  // namespace

// --- Environment parsing ----------------------------------------------------------------------

TEST_CASE("torchrun environment", "[launch]") {
  const Env env{{"RANK", "5"},
                {"WORLD_SIZE", "8"},
                {"LOCAL_RANK", "1"},
                {"LOCAL_WORLD_SIZE", "4"},
                {"MASTER_ADDR", "node07"},
                {"MASTER_PORT", "23456"}};
  const mpu::LaunchInfo info = mpu::parse_launch_env(env);
  CHECK(info.launcher == mpu::Launcher::kTorchrun);
  CHECK(info.rank == 5);
  CHECK(info.world_size == 8);
  CHECK(info.local_rank == 1);
  CHECK(info.local_world_size == 4);
  CHECK(info.master_addr == "node07");
  CHECK(info.master_port == 23456);
  CHECK_FALSE(info.use_agent_store);
  CHECK(std::string(mpu::to_string(info.launcher)) == "torchrun");
}

TEST_CASE("torchrun with the agent's store", "[launch]") {
  const Env env{{"RANK", "0"},
                {"WORLD_SIZE", "2"},
                {"LOCAL_RANK", "0"},
                {"LOCAL_WORLD_SIZE", "2"},
                {"MASTER_ADDR", "127.0.0.1"},
                {"MASTER_PORT", "29400"},
                {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                {"TORCHELASTIC_RESTART_COUNT", "3"}};
  const mpu::LaunchInfo info = mpu::parse_launch_env(env);
  CHECK(info.use_agent_store);
  CHECK(info.restart_count == 3);
  CHECK(info.master_port == 29400);
}

TEST_CASE("torchrun-style variables set by hand on one node", "[launch]") {
  const mpu::LaunchInfo info = mpu::parse_launch_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}});
  CHECK(info.local_rank == 1);
  CHECK(info.local_world_size == 2);
  CHECK(info.master_addr == "127.0.0.1");
  CHECK(info.master_port == mpu::kDefaultMasterPort);
}

TEST_CASE("Malformed launcher variables are named with their values", "[launch]") {
  CHECK_THROWS_WITH(mpu::parse_launch_env({{"RANK", "0"}}),
                    Contains("torchrun is detected but WORLD_SIZE is not set"));
  CHECK_THROWS_WITH(mpu::parse_launch_env({{"RANK", "one"}, {"WORLD_SIZE", "2"}}),
                    Contains("RANK=\"one\" is not an integer"));
  CHECK_THROWS_WITH(mpu::parse_launch_env({{"RANK", "2"}, {"WORLD_SIZE", "2"}}),
                    Contains("RANK=2 is out of range [0, 1]"));
  CHECK_THROWS_WITH(mpu::parse_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "2x"}}),
                    Contains("WORLD_SIZE=\"2x\" is not an integer"));
  CHECK_THROWS_WITH(
      mpu::parse_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}),
      Contains("MASTER_PORT=70000 is out of range [1, 65535]"));
  CHECK_THROWS_WITH(mpu::parse_launch_env({{"RANK", "0"},
                                           {"WORLD_SIZE", "4"},
                                           {"LOCAL_RANK", "2"},
                                           {"LOCAL_WORLD_SIZE", "2"},
                                           {"MASTER_ADDR", "h"}}),
                    Contains("local rank 2 is not below the local world size 2"));
  CHECK_THROWS_AS(mpu::parse_launch_env({{"RANK", "-1"}, {"WORLD_SIZE", "2"}}),
                  mpu::InvalidArgument);
}

TEST_CASE("SLURM environment, master from the step's node list", "[launch]") {
  const Env env{{"SLURM_PROCID", "6"},
                {"SLURM_NTASKS", "8"},
                {"SLURM_LOCALID", "2"},
                {"SLURM_NODEID", "1"},
                {"SLURM_TASKS_PER_NODE", "4(x2)"},
                {"SLURM_JOB_NODELIST", "other[1-9]"},
                {"SLURM_STEP_NODELIST", "gpu[07-08,11],login1"}};
  const mpu::LaunchInfo info = mpu::parse_launch_env(env);
  CHECK(info.launcher == mpu::Launcher::kSlurm);
  CHECK(info.rank == 6);
  CHECK(info.world_size == 8);
  CHECK(info.local_rank == 2);
  CHECK(info.local_world_size == 4);
  CHECK(info.master_addr == "gpu07");
  CHECK(info.master_port == mpu::kDefaultMasterPort);
}

TEST_CASE("SLURM: MASTER_ADDR/MASTER_PORT override, uneven tasks per node", "[launch]") {
  Env env{{"SLURM_PROCID", "4"},
          {"SLURM_NTASKS", "5"},
          {"SLURM_LOCALID", "0"},
          {"SLURM_NODEID", "2"},
          {"SLURM_TASKS_PER_NODE", "2(x2),1"},
          {"SLURM_JOB_NODELIST", "n[1-3]"},
          {"MASTER_ADDR", "10.1.2.3"},
          {"MASTER_PORT", "31000"}};
  mpu::LaunchInfo info = mpu::parse_launch_env(env);
  CHECK(info.local_world_size == 1);
  CHECK(info.master_addr == "10.1.2.3");
  CHECK(info.master_port == 31000);
  env["SLURM_NTASKS_PER_NODE"] = "3";  // preferred over SLURM_TASKS_PER_NODE
  env["SLURM_LOCALID"] = "2";
  CHECK(mpu::parse_launch_env(env).local_world_size == 3);
  env.erase("MASTER_ADDR");
  CHECK(mpu::parse_launch_env(env).master_addr == "n1");
}

TEST_CASE("SLURM without a node list or MASTER_ADDR across nodes is an error", "[launch]") {
  const Env env{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}};
  CHECK_THROWS_WITH(mpu::parse_launch_env(env), Contains("MASTER_ADDR is not set"));
  const Env one_node{{"SLURM_PROCID", "1"},
                     {"SLURM_NTASKS", "2"},
                     {"SLURM_LOCALID", "1"},
                     {"SLURM_NTASKS_PER_NODE", "2"}};
  CHECK(mpu::parse_launch_env(one_node).master_addr == "127.0.0.1");
  CHECK_THROWS_WITH(mpu::parse_launch_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}),
                    Contains("SLURM is detected but SLURM_LOCALID is not set"));
}

TEST_CASE("Open MPI environment", "[launch]") {
  const Env env{{"OMPI_COMM_WORLD_RANK", "3"},
                {"OMPI_COMM_WORLD_SIZE", "4"},
                {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                {"MASTER_ADDR", "head"},
                {"MASTER_PORT", "29511"}};
  const mpu::LaunchInfo info = mpu::parse_launch_env(env);
  CHECK(info.launcher == mpu::Launcher::kOpenMpi);
  CHECK(info.rank == 3);
  CHECK(info.world_size == 4);
  CHECK(info.local_rank == 1);
  CHECK(info.local_world_size == 2);
  CHECK(info.master_addr == "head");
  CHECK(info.master_port == 29511);
}

TEST_CASE("Open MPI across nodes needs MASTER_ADDR - on one node it is local", "[launch]") {
  Env env{{"OMPI_COMM_WORLD_RANK", "0"},
          {"OMPI_COMM_WORLD_SIZE", "4"},
          {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
          {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}};
  CHECK_THROWS_WITH(mpu::parse_launch_env(env), Contains("mpirun: -x MASTER_ADDR"));
  env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "4";
  CHECK(mpu::parse_launch_env(env).master_addr == "127.0.0.1");
}

TEST_CASE("Launcher precedence: torchrun, then Open MPI, then SLURM", "[launch]") {
  Env env{{"SLURM_PROCID", "0"},
          {"SLURM_NTASKS", "1"},
          {"SLURM_LOCALID", "0"},
          {"OMPI_COMM_WORLD_RANK", "1"},
          {"OMPI_COMM_WORLD_SIZE", "2"},
          {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
          {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}};
  CHECK(mpu::parse_launch_env(env).launcher == mpu::Launcher::kOpenMpi);
  CHECK(mpu::parse_launch_env(env).rank == 1);
  env["RANK"] = "0";
  env["WORLD_SIZE"] = "1";
  CHECK(mpu::parse_launch_env(env).launcher == mpu::Launcher::kTorchrun);
  const mpu::LaunchInfo none = mpu::parse_launch_env({{"PATH", "/usr/bin"}});
  CHECK(none.launcher == mpu::Launcher::kNone);
  CHECK(none.rank == 0);
  CHECK(none.world_size == 1);
}

TEST_CASE("first_slurm_host expands the first entry of a node list", "[launch]") {
  CHECK(mpu::detail::first_slurm_host("gpu[03-05,09],cpu1") == "gpu03");
  CHECK(mpu::detail::first_slurm_host("node1,node2") == "node1");
  CHECK(mpu::detail::first_slurm_host("rack[2-3]-n[10,12]") == "rack2-n10");
  CHECK(mpu::detail::first_slurm_host("single") == "single");
  CHECK(mpu::detail::first_slurm_host("a[7]") == "a7");
  CHECK(mpu::detail::first_slurm_host("") == "");
  CHECK_THROWS_AS(mpu::detail::first_slurm_host("bad[1-2"), mpu::InvalidArgument);
}

// --- GPUs ------------------------------------------------------------------------------------

TEST_CASE("CUDA_VISIBLE_DEVICES limits the NVML count as CUDA reads it", "[launch]") {
  using mpu::detail::count_visible_gpus;
  CHECK(count_visible_gpus(nullptr, 4) == 4);
  CHECK(count_visible_gpus("", 4) == 0);
  CHECK(count_visible_gpus("0,1", 4) == 2);
  CHECK(count_visible_gpus("3, 1", 4) == 2);
  CHECK(count_visible_gpus("1,5,2", 4) == 1);  // 5 does not exist: the list ends there
  CHECK(count_visible_gpus("1,1", 4) == 1);    // repeated: ends there
  CHECK(count_visible_gpus("-1", 4) == 0);
  CHECK(count_visible_gpus("0,x,1", 4) == 1);
  CHECK(count_visible_gpus("GPU-8f3a,GPU-77b1", 2) == 2);
  CHECK(count_visible_gpus("0", 0) == 0);
}

TEST_CASE("local_gpus: one device per GPU, or two CPU devices", "[launch]") {
  const int count = mpu::local_gpu_count();
  const auto devices = mpu::local_gpus();
  if (count == 0) {
    REQUIRE(devices.size() == 2);
    CHECK(devices[0] == torch::Device(torch::kCPU));
    CHECK(devices[1] == torch::Device(torch::kCPU));
  } else {
    REQUIRE(static_cast<int>(devices.size()) == count);
    for (int i = 0; i < count; ++i) CHECK(devices[i] == torch::Device(torch::kCUDA, i));
  }
#if !MPU_HAS_CUDA
  CHECK(count == 0);
  CHECK_FALSE(mpu::cuda_initialized());
#endif
}

// --- spawn -----------------------------------------------------------------------------------

TEST_CASE("spawn runs every rank with its number, device and store", "[launch][multiprocess]") {
  const auto start = Clock::now();
  mpu::test::run_ranks(3, [](const mpu::SpawnContext& ctx) {
    MPU_EXPECT(ctx.world_size == 3, "world size ", ctx.world_size);
    MPU_EXPECT(ctx.device == torch::Device(torch::kCPU), "device ", ctx.device);
    MPU_EXPECT(ctx.store, "no store");
    ctx.store->set("rank/" + std::to_string(ctx.rank),
                   std::vector<std::uint8_t>{static_cast<std::uint8_t>(ctx.rank)});
    for (int r = 0; r < ctx.world_size; ++r) {
      const std::string key = "rank/" + std::to_string(r);
      ctx.store->wait({key});
      const auto value = ctx.store->get(key);
      MPU_EXPECT(value.size() == 1 && value[0] == r, "store value of rank ", r);
    }
  });
  CHECK(seconds_since(start) < 30);
  CHECK(no_children_left());
}

TEST_CASE("spawn: a rank that throws stops the others and is named", "[launch][multiprocess]") {
  const auto start = Clock::now();
  const std::string message = message_of([] {
    mpu::spawn(
        3,
        [](const mpu::SpawnContext& ctx) {
          if (ctx.rank == 1) throw std::runtime_error("boom from rank 1");
          sleep_seconds(60);
        },
        cpu_ranks(3));
  });
  const double elapsed = seconds_since(start);
  INFO(message);
  CHECK_THAT(message, Contains("spawn: rank 1 of 3 (cpu) exited with status 1: boom from rank 1"));
  CHECK_THAT(message, Contains("stopped: rank 0, 2"));
  CHECK(elapsed < 10);
  CHECK(no_children_left());
  CHECK_THROWS_AS(
      mpu::spawn(
          2, [](const mpu::SpawnContext&) { throw std::runtime_error("x"); }, cpu_ranks(2)),
      mpu::CommError);
}

TEST_CASE("spawn: a rank that calls abort() is reported with its signal",
          "[launch][multiprocess]") {
  const auto start = Clock::now();
  const std::string message = message_of([] {
    mpu::spawn(
        3,
        [](const mpu::SpawnContext& ctx) {
          if (ctx.rank == 2) std::abort();
          sleep_seconds(60);
        },
        cpu_ranks(3));
  });
  const double elapsed = seconds_since(start);
  INFO(message);
  CHECK_THAT(message, Contains("spawn: rank 2 of 3 (cpu) was killed by signal 6 (Aborted"));
  CHECK_THAT(message, Contains("stopped: rank 0, 1"));
  CHECK(elapsed < 10);
  CHECK(no_children_left());
}

TEST_CASE("spawn: a non-zero exit without an exception, and ranks that ignore SIGTERM",
          "[launch][multiprocess]") {
  const auto start = Clock::now();
  const std::string message = message_of([] {
    mpu::spawn(
        2,
        [](const mpu::SpawnContext& ctx) {
          if (ctx.rank == 0) {
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
            ::_exit(3);
          }
          std::signal(SIGTERM, SIG_IGN);
          sleep_seconds(60);
        },
        cpu_ranks(2));
  });
  const double elapsed = seconds_since(start);
  INFO(message);
  CHECK_THAT(message, Contains("rank 0 of 2 (cpu) exited with status 3: (no error message)"));
  CHECK_THAT(message, Contains("stopped: rank 1"));
  CHECK(elapsed < 10);  // SIGKILL after the 0.5 s grace period
  CHECK(no_children_left());
}

TEST_CASE("spawn: ranks that fail on their own after the first are listed too",
          "[launch][multiprocess]") {
  const std::string message = message_of([] {
    mpu::spawn(
        2,
        [](const mpu::SpawnContext& ctx) {
          if (ctx.rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds(100));
          throw std::runtime_error("failure of rank " + std::to_string(ctx.rank));
        },
        cpu_ranks(2));
  });
  INFO(message);
  CHECK_THAT(message, Contains("spawn: rank 0 of 2 (cpu) exited with status 1: failure of rank 0"));
  // Rank 1 throws before or after SIGTERM reaches it: either listed, or stopped.
  const bool listed =
      message.find("also: rank 1 of 2 (cpu) exited with status 1: failure of rank 1") !=
      std::string::npos;
  const bool stopped = message.find("stopped: rank 1") != std::string::npos;
  CHECK((listed || stopped));
  CHECK(no_children_left());
}

TEST_CASE("spawn: exit statuses survive SIGCHLD being ignored", "[launch][multiprocess]") {
  std::signal(SIGCHLD, SIG_IGN);
  const std::string message = message_of([] {
    mpu::spawn(
        2,
        [](const mpu::SpawnContext& ctx) {
          if (ctx.rank == 1) ::_exit(7);
        },
        cpu_ranks(2));
  });
  std::signal(SIGCHLD, SIG_DFL);
  INFO(message);
  CHECK_THAT(message, Contains("rank 1 of 2 (cpu) exited with status 7"));
  CHECK(no_children_left());
}

TEST_CASE("spawn: the time limit stops hung ranks", "[launch][multiprocess]") {
  mpu::SpawnOptions options = cpu_ranks(2);
  options.time_limit = std::chrono::milliseconds(1000);
  const auto start = Clock::now();
  const std::string message = message_of([&] {
    mpu::spawn(
        2, [](const mpu::SpawnContext&) { sleep_seconds(60); }, options);
  });
  INFO(message);
  CHECK_THAT(message, Contains("spawn: the ranks did not all finish within 1 s"));
  CHECK_THAT(message, Contains("stopped: rank 0, 1"));
  CHECK(seconds_since(start) < 10);
  CHECK(no_children_left());
  CHECK_THROWS_AS(mpu::spawn(
                      2, [](const mpu::SpawnContext&) { sleep_seconds(60); }, options),
                  mpu::Timeout);
}

TEST_CASE("spawn checks its arguments", "[launch]") {
  CHECK_THROWS_WITH(mpu::spawn(0, [](const mpu::SpawnContext&) {}),
                    Contains("spawn: the number of ranks must be at least 1, got 0"));
  CHECK_THROWS_WITH(mpu::spawn(
                        3, [](const mpu::SpawnContext&) {}, cpu_ranks(2)),
                    Contains("spawn: 2 devices in SpawnOptions::devices for 3 ranks"));
  CHECK_THROWS_WITH(mpu::spawn(1, nullptr), Contains("the function to run is empty"));
  mpu::SpawnOptions no_store = cpu_ranks(1);
  no_store.store = false;
  const std::string message = message_of([&] {
    mpu::spawn(
        1, [](const mpu::SpawnContext& ctx) { ctx.make_communicator(); }, no_store);
  });
  CHECK_THAT(message, Contains("SpawnContext::make_communicator: no store"));
}

// --- init ------------------------------------------------------------------------------------

namespace {

// A port that was free a moment ago (bound to port 0, then released).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace

TEST_CASE("init without a launcher: one rank over an in-process store", "[launch]") {
  mpu::InitOptions options;
  options.info = mpu::parse_launch_env({});
  options.device = torch::Device(torch::kCPU);
  const mpu::Distributed job = mpu::init(options);
  REQUIRE(job.comm);
  CHECK(job.comm->size() == 1);
  CHECK(job.comm->rank() == 0);
  torch::Tensor t = torch::full({4}, 3.0);
  job.comm->allreduce(t);
  CHECK(t.equal(torch::full({4}, 3.0)));
}

#if MPU_HAS_GLOO
TEST_CASE("init under a torchrun-like environment meets the others through a TCPStore",
          "[launch][multiprocess]") {
  const int port = free_port();
  mpu::test::run_ranks(3, [port](const mpu::SpawnContext& ctx) {
    ::setenv("RANK", std::to_string(ctx.rank).c_str(), 1);
    ::setenv("WORLD_SIZE", "3", 1);
    ::setenv("LOCAL_RANK", std::to_string(ctx.rank).c_str(), 1);
    ::setenv("LOCAL_WORLD_SIZE", "3", 1);
    ::setenv("MASTER_ADDR", "127.0.0.1", 1);
    ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
    mpu::InitOptions options;
    options.device = torch::Device(torch::kCPU);
    options.timeout = std::chrono::seconds(60);
    const mpu::Distributed job = mpu::init(options);
    MPU_EXPECT(job.info.launcher == mpu::Launcher::kTorchrun, "launcher ",
               mpu::to_string(job.info.launcher));
    MPU_EXPECT(job.comm->rank() == ctx.rank && job.comm->size() == 3, "rank ", job.comm->rank(),
               " of ", job.comm->size());
    torch::Tensor t = torch::full({5}, ctx.rank + 1.0);
    job.comm->allreduce(t);
    MPU_EXPECT_EQUAL(t, torch::full({5}, 6.0), "[allreduce after init]");
  });
}
#endif
