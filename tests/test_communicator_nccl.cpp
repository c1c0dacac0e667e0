// The NCCL communicator on 2 (and 4, where present) GPUs: the same closed-form checks as Gloo,
// stream ordering, and the timeout paths. Needs the GPU machine; elsewhere it says why it skips.
//
// The parent never touches CUDA (forked ranks could not use it then): GPUs are counted through
// NVML, and everything else happens inside the ranks.
#include "catch_torch.h"

#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "collective_checks.h"
#include "mpu/communicator.h"
#include "mpu/config.h"
#include "mpu/defaults.h"
#include "mpu/launch.h"
#include "multiprocess.h"

#if MPU_HAS_NCCL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;

std::vector<torch::Device> gpus(int n) {
  std::vector<torch::Device> devices;
  for (int i = 0; i < n; ++i) devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
  return devices;
}

// World sizes to test: 2 and 4 (powers of two keep ncclAvg exact), as far as GPUs allow.
// Empty, with a WARN, when the build or the machine cannot run NCCL.
std::vector<int> nccl_world_sizes() {
#if !MPU_HAS_NCCL
  WARN("skipped: this build has no NCCL (CPU-only LibTorch or MPU_WITH_NCCL=OFF)");
  return {};
#else
  const int count = mpu::local_gpu_count();
  if (count < 1) {
    WARN("skipped: NCCL tests need a GPU, none visible");
    return {};
  }
  if (count == 1) {
    // One rank still runs every NCCL code path (init, each dtype, async, the watchdog); the
    // closed forms hold for n = 1.
    WARN("NCCL tests run on 1 rank only: world sizes 2 and 4 need 2 and 4 GPUs, 1 visible");
    return {1};
  }
  std::vector<int> sizes{2};
  if (count >= 4) sizes.push_back(4);
  return sizes;
#endif
}

void on_nccl_ranks(void (*check)(mpu::Communicator&)) {
  for (int n : nccl_world_sizes()) {
    INFO("world size " << n);
    mpu::test::RunOptions options;
    options.devices = gpus(n);
    mpu::test::run_ranks(
        n,
        [check](const mpu::SpawnContext& ctx) {
          auto comm = ctx.make_communicator();
          MPU_EXPECT(comm->backend() == "nccl", "backend ", comm->backend());
          MPU_EXPECT(comm->device() == ctx.device, "device ", comm->device());
          check(*comm);
          comm->synchronize();
        },
        options);
  }
}

[[maybe_unused]] double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

TEST_CASE("NCCL allreduce: sum and avg, every dtype and size", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_allreduce);
}

TEST_CASE("NCCL reduce: to every root, other ranks unchanged", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_reduce);
}

TEST_CASE("NCCL broadcast: from every root", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_broadcast);
}

TEST_CASE("NCCL reduce_scatter: uneven shards, empty tensors, in place", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_reduce_scatter);
}

TEST_CASE("NCCL allgather: uneven shards, empty tensors, in place", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_allgather);
}

TEST_CASE("NCCL reduce_scatter then allgather equals allreduce", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_round_trip);
}

TEST_CASE("NCCL allreduce_async and reduce_async, joined once, equal the joined collectives",
          "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_async);
}

TEST_CASE("NCCL sequence numbers and barrier", "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_sequence_numbers);
}

TEST_CASE("NCCL broadcast_bytes and allgather_bytes: binary, uneven and empty strings",
          "[nccl][multiprocess]") {
  on_nccl_ranks(mpu::test::check_bytes);
}

#if MPU_HAS_NCCL

namespace {

// The ordering, failure and timeout tests need two ranks on two GPUs.
bool two_gpus() {
  const int count = mpu::local_gpu_count();
  if (count < 2) WARN("skipped: this test needs 2 GPUs, " << count << " visible");
  return count >= 2;
}

// Runs `body` on ranks 0 and 1, on cuda:0 and cuda:1, with the given collective timeout.
void on_two_gpus(const std::function<void(const mpu::SpawnContext&)>& body,
                 std::chrono::milliseconds timeout = mpu::test::RunOptions{}.timeout) {
  mpu::test::RunOptions options;
  options.devices = gpus(2);
  options.timeout = timeout;
  mpu::test::run_ranks(2, body, options);
}

}  // namespace

TEST_CASE("NCCL collectives are ordered after and before torch's current stream",
          "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus([](const mpu::SpawnContext& ctx) {
    auto comm = ctx.make_communicator();
    // A side stream as torch's current stream, busy with a long chain of kernels that the
    // collective must wait for; the result is read on the same stream without a host sync.
    c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool(false, ctx.device.index()));
    const auto options = torch::TensorOptions().dtype(torch::kFloat).device(ctx.device);
    torch::Tensor t = torch::zeros({1 << 24}, options);
    for (int i = 0; i <= ctx.rank; ++i) {
      for (int k = 0; k < 50; ++k) t.add_(1.0 / 50);
    }
    t.round_();  // rank r holds r + 1 everywhere
    comm->allreduce(t);
    torch::Tensor total = t.sum();  // queued on the current stream after the collective
    const double expected = 3.0 * (1 << 24);
    MPU_EXPECT(total.item<double>() == expected, "sum ", total.item<double>(), " expected ",
               expected);
  });
}

TEST_CASE("NCCL allreduce_async and reduce_async leave torch's current stream free until join()",
          "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus([](const mpu::SpawnContext& ctx) {
    c10::cuda::CUDAGuard device_guard(ctx.device);  // the raw CUDA calls below use it
    auto comm = ctx.make_communicator();
    const auto options = torch::TensorOptions().dtype(torch::kFloat).device(ctx.device);
    const cudaStream_t current = c10::cuda::getCurrentCUDAStream(ctx.device.index()).stream();
    // Host seconds until `event`, recorded on the current stream now, has completed (30 at most).
    // Between the call and the measurement only kernels already loaded are launched, and nothing
    // is allocated or created: the first launch of a kernel (CUDA loads modules lazily) or a
    // cudaMalloc may wait for the kernels running on the device, the collective's among them.
    // Seen on 2x H100: 2.8 s on the host after the call, before the first event was recorded.
    cudaEvent_t events[2] = {nullptr, nullptr};
    for (auto& e : events) {
      MPU_EXPECT(cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess,
                 "could not create a CUDA event");
    }
    const auto seconds_until_done = [current](cudaEvent_t event) {
      MPU_EXPECT(cudaEventRecord(event, current) == cudaSuccess, "could not record a CUDA event");
      const auto start = Clock::now();
      while (cudaEventQuery(event) == cudaErrorNotReady && seconds_since(start) < 30) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      return seconds_since(start);
    };
    torch::Tensor after = torch::ones({1}, options);
    {
      // NCCL connects peers lazily, for each kind of transfer, in the first enqueue of it, which
      // waits on the host for the peers (seen: 2.8 s, rank 1's GPU delay). The same collectives
      // once with both ranks in step connect them.
      torch::Tensor warm = torch::ones({1 << 20}, options);
      comm->allreduce(warm);
      comm->reduce(warm, 0);
      comm->synchronize();
    }
    for (const bool reduce : {false, true}) {
      const char* op = reduce ? "reduce_async" : "allreduce_async";
      torch::Tensor t = torch::full({1 << 20}, ctx.rank + 1.0, options);
      comm->barrier();
      if (ctx.rank == 1) {
        // Rank 1's GPU reaches the collective seconds late: its comm stream waits for this.
        torch::Tensor a = torch::full({4096, 4096}, 1.0 / 4096, options);
        for (int i = 0; i < 1000; ++i) a = torch::mm(a, a);
      }
      const auto issued = Clock::now();
      if (reduce) {
        comm->reduce_async(t, 0);
      } else {
        comm->allreduce_async(t);
      }
      const double in_call = seconds_since(issued);
      if (ctx.rank == 1) {
        comm->join();
        MPU_EXPECT_EQUAL(t.cpu(), torch::full({1 << 20}, reduce ? 2.0 : 3.0), "[rank 1 ", op, "]");
        continue;
      }
      after.fill_(2.0);  // queued after the call
      const double before_join = seconds_until_done(events[0]);
      comm->join();
      const double joined = seconds_until_done(events[1]);  // counted from when `after` was done
      MPU_EXPECT(joined > 0.3, op, ": work queued after it finished only ", joined,
                 " s before the collective, which waited for rank 1's GPU for seconds; the "
                 "current stream waited for the collective (",
                 before_join, " s, ", seconds_since(issued), " s since the call, ", in_call,
                 " s in it)");
      MPU_EXPECT(after.item<float>() == 2.0f, "the work queued after the call ran");
      const double total = t.sum().item<double>();  // on the current stream, after join()
      MPU_EXPECT(total == 3.0 * (1 << 20), op, ": sum ", total, ", expected ", 3.0 * (1 << 20));
    }
    for (auto& e : events) (void)cudaEventDestroy(e);
  });
}

// Without record_stream, the caching allocator hands the freed block of `t` straight back to the
// next allocation on the current stream, whose fill then races the collective still waiting for
// rank 1: rank 1 would receive -7 + 2 instead of 1 + 2, and `other` would end up holding the sum.
TEST_CASE("NCCL allreduce_async: freeing the tensor before join() leaves the result intact",
          "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus([](const mpu::SpawnContext& ctx) {
    auto comm = ctx.make_communicator();
    const auto options = torch::TensorOptions().dtype(torch::kFloat).device(ctx.device);
    constexpr std::int64_t kNumel = 1 << 22;
    {
      torch::Tensor warm = torch::ones({kNumel}, options);  // connects the peers
      comm->allreduce(warm);
      comm->synchronize();
    }
    torch::Tensor t = torch::full({kNumel}, ctx.rank + 1.0, options);
    comm->barrier();
    if (ctx.rank == 1) {
      // Rank 1's GPU reaches the collective seconds late: rank 0's waits for it meanwhile.
      torch::Tensor a = torch::full({4096, 4096}, 1.0 / 4096, options);
      for (int i = 0; i < 500; ++i) a = torch::mm(a, a);
      comm->allreduce_async(t);
      comm->join();
      MPU_EXPECT_EQUAL(t.cpu(), torch::full({kNumel}, 3.0), "[rank 1 received rank 0's 1s]");
      return;
    }
    comm->allreduce_async(t);
    const void* freed = t.data_ptr();
    t = torch::Tensor();  // freed while the collective still uses it
    torch::Tensor other = torch::empty({kNumel}, options);
    other.fill_(-7.0);  // queued on the current stream, which does not wait for the collective
    MPU_EXPECT(other.data_ptr() != freed,
               "the allocator handed out the block of a tensor in a collective in flight");
    comm->join();
    MPU_EXPECT_EQUAL(other.cpu(), torch::full({kNumel}, -7.0),
                     "[rank 0's new tensor, after join()]");
  });
}

TEST_CASE("NCCL: a rank that skips a collective makes the others time out",
          "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus(
      [](const mpu::SpawnContext& ctx) {
        auto comm = ctx.make_communicator();
        torch::Tensor t = torch::ones({1 << 20}, torch::TensorOptions().device(ctx.device));
        comm->allreduce(t);  // both ranks join this one
        comm->synchronize();
        if (ctx.rank == 1) {
          std::this_thread::sleep_for(std::chrono::seconds(8));
          comm->abort();
          return;
        }
        const auto start = Clock::now();
        comm->allreduce(t);  // never joined by rank 1: enqueued, then stuck on the GPU
        MPU_EXPECT_THROWS(comm->synchronize(), mpu::Timeout,
                          "allreduce #2 (nccl, rank 0 of 2, cuda:0) timed out after 3 s");
        const double waited = seconds_since(start);
        MPU_EXPECT(waited >= 2.5 && waited < 7, "the 3 s timeout fired after ", waited, " s");
        MPU_EXPECT_THROWS(comm->broadcast(t, 0), mpu::Timeout, "the communicator was aborted");
        MPU_EXPECT_THROWS(comm->barrier(), mpu::CommError, "timed out after 3 s");
      },
      std::chrono::milliseconds(3000));
}

TEST_CASE("NCCL: a first collective that a peer never joins times out", "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus(
      [](const mpu::SpawnContext& ctx) {
        auto comm = ctx.make_communicator();
        if (ctx.rank == 1) {
          std::this_thread::sleep_for(std::chrono::seconds(8));
          comm->abort();
          return;
        }
        torch::Tensor t = torch::ones({1024}, torch::TensorOptions().device(ctx.device));
        const auto start = Clock::now();
        MPU_EXPECT_THROWS(
            [&] {
              comm->allreduce(t);
              comm->synchronize();
            }(),
            mpu::Timeout, "allreduce #1 (nccl, rank 0 of 2, cuda:0) timed out after 3 s");
        const double waited = seconds_since(start);
        MPU_EXPECT(waited >= 2.5 && waited < 7, "the 3 s timeout fired after ", waited, " s");
      },
      std::chrono::milliseconds(3000));
}

TEST_CASE("NCCL: creating a communicator times out when a rank never joins",
          "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus(
      [](const mpu::SpawnContext& ctx) {
        if (ctx.rank == 1) {
          std::this_thread::sleep_for(std::chrono::seconds(6));
          return;
        }
        const auto start = Clock::now();
        MPU_EXPECT_THROWS(ctx.make_communicator(), mpu::Timeout,
                          "did not finish ncclCommInitRankConfig within 3 s");
        const double waited = seconds_since(start);
        MPU_EXPECT(waited >= 2.5 && waited < 7, "the 3 s timeout fired after ", waited, " s");
      },
      std::chrono::milliseconds(3000));
}

TEST_CASE("NCCL: MPU_NCCL_STREAM_PRIORITY normal works, and a bad value is refused by name",
          "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus([](const mpu::SpawnContext& ctx) {
    ::setenv(mpu::kEnvNcclStreamPriority, "normal", 1);
    {
      auto comm = ctx.make_communicator();
      torch::Tensor t = torch::full({8}, ctx.rank + 1.0, torch::TensorOptions().device(ctx.device));
      comm->allreduce(t);
      MPU_EXPECT_EQUAL(t.cpu(), torch::full({8}, 3.0), "[allreduce on a normal-priority stream]");
    }
    ::setenv(mpu::kEnvNcclStreamPriority, "fast", 1);
    MPU_EXPECT_THROWS(ctx.make_communicator(), mpu::InvalidArgument,
                      "MPU_NCCL_STREAM_PRIORITY=\"fast\" is not a stream priority; use "
                      "\"high\" (the default) or \"normal\"");
    ::unsetenv(mpu::kEnvNcclStreamPriority);
  });
}

TEST_CASE("NCCL argument checks: device and dtype", "[nccl][multiprocess]") {
  if (!two_gpus()) return;
  on_two_gpus([](const mpu::SpawnContext& ctx) {
    auto comm = ctx.make_communicator();
    torch::Tensor cpu = torch::ones({4});
    MPU_EXPECT_THROWS(comm->allreduce(cpu), mpu::InvalidArgument,
                      "allreduce: argument `t` is float32[4] on cpu, but the communicator's "
                      "device is cuda:");
    const int other = 1 - ctx.rank;
    torch::Tensor wrong_gpu = torch::ones(
        {4}, torch::TensorOptions().device(torch::kCUDA, static_cast<c10::DeviceIndex>(other)));
    MPU_EXPECT_THROWS(comm->broadcast(wrong_gpu, 0), mpu::InvalidArgument, "on cuda:");
    MPU_EXPECT(comm->sequence_number() == 0,
               "argument errors were counted: ", comm->sequence_number());
    torch::Tensor t = torch::ones({4}, torch::TensorOptions().device(ctx.device));
    comm->allreduce(t);
    MPU_EXPECT_EQUAL(t.cpu(), torch::full({4}, 2.0), "[allreduce after argument errors]");
  });
}

#endif  // MPU_HAS_NCCL
