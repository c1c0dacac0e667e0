// The Gloo communicator across 2, 3 and 4 forked ranks, checked exactly against closed forms;
// argument checks; timeouts and dead peers; sharding arithmetic.
#include "catch_torch.h"

#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "collective_checks.h"
#include "mpu/communicator.h"
#include "mpu/config.h"
#include "multiprocess.h"

namespace {

using Clock = std::chrono::steady_clock;

// Runs `check` in every rank of a Gloo communicator of 2, 3 and 4 ranks.
void on_gloo_ranks(void (*check)(mpu::Communicator&)) {
  for (int n : {2, 3, 4}) {
    INFO("world size " << n);
    mpu::test::run_ranks(n, [check](const mpu::SpawnContext& ctx) {
      auto comm = ctx.make_communicator();
      MPU_EXPECT(comm->backend() == "gloo", "backend ", comm->backend());
      MPU_EXPECT(comm->rank() == ctx.rank && comm->size() == ctx.world_size, "rank ", comm->rank(),
                 " size ", comm->size());
      check(*comm);
    });
  }
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

#if MPU_HAS_GLOO

TEST_CASE("Gloo allreduce: sum and avg, every dtype and size", "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_allreduce);
}

TEST_CASE("Gloo reduce: to every root, other ranks unchanged", "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_reduce);
}

TEST_CASE("Gloo broadcast: from every root", "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_broadcast);
}

TEST_CASE("Gloo reduce_scatter: uneven shards, empty tensors, in place",
          "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_reduce_scatter);
}

TEST_CASE("Gloo allgather: uneven shards, empty tensors, in place",
          "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_allgather);
}

TEST_CASE("Gloo reduce_scatter then allgather equals allreduce", "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_round_trip);
}

TEST_CASE("Gloo allreduce_async and reduce_async, joined once, equal the joined collectives",
          "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_async);
}

TEST_CASE("Gloo broadcast_bytes and allgather_bytes: binary, uneven and empty strings",
          "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_bytes);
}

TEST_CASE("Gloo sequence numbers count every call, empty ones too",
          "[communicator][multiprocess]") {
  on_gloo_ranks(mpu::test::check_sequence_numbers);
}

TEST_CASE("Gloo barrier: no rank leaves before every rank has entered",
          "[communicator][multiprocess]") {
  mpu::test::run_ranks(3, [](const mpu::SpawnContext& ctx) {
    auto comm = ctx.make_communicator();
    if (ctx.rank == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      ctx.store->set("rank0_entered", std::vector<std::uint8_t>{1});
    }
    comm->barrier();
    MPU_EXPECT(ctx.store->check({"rank0_entered"}), "rank ", ctx.rank,
               " left the barrier before rank 0 entered it");
  });
}

TEST_CASE("Gloo: a rank that skips a collective makes the others time out",
          "[communicator][multiprocess]") {
  mpu::test::RunOptions options;
  options.timeout = std::chrono::milliseconds(2000);
  mpu::test::run_ranks(
      2,
      [](const mpu::SpawnContext& ctx) {
        auto comm = ctx.make_communicator();
        torch::Tensor t = torch::ones({16});
        comm->allreduce(t);  // both ranks join this one
        if (ctx.rank == 1) {
          std::this_thread::sleep_for(std::chrono::milliseconds(6000));
          return;
        }
        const auto start = Clock::now();
        MPU_EXPECT_THROWS(comm->allreduce(t), mpu::Timeout, "allreduce #2 (gloo, rank 0 of 2)");
        const double waited = seconds_since(start);
        MPU_EXPECT(waited >= 1.6 && waited < 5, "the timeout of 2 s fired after ", waited, " s");
        // The communicator stays aborted.
        MPU_EXPECT_THROWS(comm->broadcast(t, 0), mpu::Timeout, "the communicator was aborted");
        MPU_EXPECT_THROWS(comm->synchronize(), mpu::Timeout, "timed out after 2 s");
      },
      options);
}

TEST_CASE("Gloo: a peer that exits makes the next collective fail fast",
          "[communicator][multiprocess]") {
  mpu::test::RunOptions options;
  options.timeout = std::chrono::milliseconds(30000);
  mpu::test::run_ranks(
      2,
      [](const mpu::SpawnContext& ctx) {
        auto comm = ctx.make_communicator();
        torch::Tensor t = torch::ones({16});
        comm->allreduce(t);
        if (ctx.rank == 1) return;  // the communicator and the process go away
        const auto start = Clock::now();
        MPU_EXPECT_THROWS(comm->allreduce(t), mpu::CommError, "allreduce #2");
        MPU_EXPECT(seconds_since(start) < 10, "a dead peer was noticed only after ",
                   seconds_since(start), " s");
      },
      options);
}

// Before abort() woke the waiter, rank 0 sat in Work::wait() until Gloo's own 60 s timeout
// (rank 1 only leaves once rank 0 is done), and then threw Timeout, not the prompt CommError.
TEST_CASE("Gloo: abort() from another thread wakes a collective a peer never joins",
          "[communicator][multiprocess]") {
  mpu::test::RunOptions options;
  options.timeout = std::chrono::milliseconds(60000);
  mpu::test::run_ranks(
      2,
      [](const mpu::SpawnContext& ctx) {
        auto comm = ctx.make_communicator();
        torch::Tensor t = torch::ones({16});
        comm->allreduce(t);  // both ranks join this one
        if (ctx.rank == 1) {
          // Stays alive, never entering the second allreduce, until rank 0 is done with it.
          ctx.store->wait({"rank0_done"}, std::chrono::seconds(100));
          return;
        }
        std::thread aborter([comm] {
          std::this_thread::sleep_for(std::chrono::milliseconds(300));
          comm->abort();
        });
        const auto start = Clock::now();
        MPU_EXPECT_THROWS(comm->allreduce(t), mpu::CommError,
                          "allreduce #2 (gloo, rank 0 of 2) failed: abort() was called while it "
                          "was in flight");
        const double waited = seconds_since(start);
        aborter.join();
        ctx.store->set("rank0_done", std::vector<std::uint8_t>{1});
        MPU_EXPECT(waited >= 0.25 && waited < 5, "abort() after 0.3 s woke the collective after ",
                   waited, " s (the timeout is 60 s)");
        MPU_EXPECT_THROWS(comm->barrier(), mpu::CommError, "abort() was called");
      },
      options);
}

TEST_CASE("Gloo: abort() makes every later call throw CommError", "[communicator]") {
  auto comm = mpu::make_gloo_communicator(c10::make_intrusive<c10d::HashStore>(), 0, 1,
                                          std::chrono::seconds(10));
  torch::Tensor t = torch::ones({4});
  comm->allreduce(t);
  comm->abort();
  comm->abort();
  CHECK_THROWS_WITH(comm->allreduce(t), Catch::Matchers::Contains("abort() was called"));
  CHECK_THROWS_AS(comm->barrier(), mpu::CommError);
}

TEST_CASE("Gloo with one rank: every collective is the identity", "[communicator]") {
  auto comm = mpu::make_gloo_communicator(c10::make_intrusive<c10d::HashStore>(), 0, 1,
                                          std::chrono::seconds(10));
  for (auto dtype : mpu::test::collective_dtypes()) {
    const torch::Tensor x = mpu::test::rank_values(10, 0, dtype, torch::kCPU);
    torch::Tensor t = x.clone();
    comm->allreduce(t, c10::isFloatingType(dtype) ? mpu::ReduceOp::kAvg : mpu::ReduceOp::kSum);
    CHECK(t.equal(x));
    comm->reduce(t, 0);
    CHECK(t.equal(x));
    comm->broadcast(t, 0);
    CHECK(t.equal(x));
    torch::Tensor out = torch::empty({10}, x.options());
    comm->reduce_scatter(out, x);
    CHECK(out.equal(x));
    comm->allgather(out, x);
    CHECK(out.equal(x));
  }
  comm->barrier();
  const auto dtypes = mpu::test::collective_dtypes().size();
  CHECK(comm->sequence_number() == dtypes * 5 + 1);
  CHECK(comm->broadcast_bytes(std::string("a\0b", 3), 0) == std::string("a\0b", 3));
  CHECK(comm->allgather_bytes("xyz") == std::vector<std::string>{"xyz"});
  CHECK(comm->sequence_number() == dtypes * 5 + 1 + 4);
}

TEST_CASE("Communicator argument checks name the op, the argument and the values",
          "[communicator]") {
  auto comm = mpu::make_gloo_communicator(c10::make_intrusive<c10d::HashStore>(), 0, 1,
                                          std::chrono::seconds(10));
  using Catch::Matchers::Contains;
  torch::Tensor ok = torch::zeros({6});

  torch::Tensor strided = torch::zeros({4, 6}).t();
  CHECK_THROWS_AS(comm->allreduce(strided), mpu::InvalidArgument);
  CHECK_THROWS_WITH(comm->allreduce(strided),
                    Contains("allreduce: argument `t` is float32[6, 4] on cpu with strides "
                             "[1, 6]; it must be contiguous"));
  torch::Tensor shorts = torch::zeros({3}, torch::kShort);
  CHECK_THROWS_WITH(comm->broadcast(shorts, 0),
                    Contains("broadcast: argument `t` is Short[3] on cpu; the communicator takes "
                             "float32, float16, bfloat16, float64, int32, int64 or uint8"));
  torch::Tensor bools = torch::zeros({3}, torch::kBool);
  CHECK_THROWS_AS(comm->allreduce(bools), mpu::InvalidArgument);
  // avg of integers would round: refused by name, for every reducing op and integer dtype.
  const std::pair<c10::ScalarType, std::string> integer_dtypes[] = {
      {torch::kInt, "int32"}, {torch::kLong, "int64"}, {torch::kByte, "uint8"}};
  for (const auto& [dtype, name] : integer_dtypes) {
    torch::Tensor integers = torch::zeros({6}, dtype);
    INFO(name);
    CHECK_THROWS_AS(comm->allreduce(integers, mpu::ReduceOp::kAvg), mpu::InvalidArgument);
    CHECK_THROWS_WITH(comm->allreduce(integers, mpu::ReduceOp::kAvg),
                      Contains("allreduce: argument `op` is avg, but the tensor is " + name +
                               "[6] on cpu; avg takes floating dtypes only"));
    CHECK_THROWS_WITH(comm->reduce(integers, 0, mpu::ReduceOp::kAvg),
                      Contains("reduce: argument `op` is avg, but the tensor is " + name));
    torch::Tensor out = torch::zeros({6}, dtype);
    CHECK_THROWS_WITH(comm->reduce_scatter(out, integers, mpu::ReduceOp::kAvg),
                      Contains("reduce_scatter: argument `op` is avg, but the tensor is " + name));
  }
  CHECK_THROWS_WITH(comm->broadcast_bytes("x", 1),
                    Contains("broadcast_bytes: root 1 is not a rank of this 1-rank communicator"));
  torch::Tensor undefined;
  CHECK_THROWS_WITH(comm->allreduce(undefined),
                    Contains("allreduce: argument `t` is an undefined tensor"));
  torch::Tensor meta = torch::empty({3}, torch::TensorOptions().device(torch::kMeta));
  CHECK_THROWS_WITH(comm->allreduce(meta),
                    Contains("is float32[3] on meta, but the communicator's device is cpu"));
  CHECK_THROWS_WITH(comm->reduce(ok, 1),
                    Contains("reduce: root 1 is not a rank of this 1-rank communicator"));
  CHECK_THROWS_WITH(comm->broadcast(ok, -1), Contains("broadcast: root -1 is not a rank"));

  torch::Tensor small = torch::zeros({5});
  CHECK_THROWS_WITH(comm->reduce_scatter(small, ok),
                    Contains("reduce_scatter: `out` has 5 elements, but rank 0 of 1 owns 6 of "
                             "the 6 elements of `in`"));
  CHECK_THROWS_WITH(comm->allgather(ok, small),
                    Contains("allgather: `in` has 5 elements, but rank 0 of 1 owns 6 of the 6 "
                             "elements of `out`"));
  torch::Tensor halves = torch::zeros({6}, torch::kHalf);
  CHECK_THROWS_WITH(comm->allgather(ok, halves),
                    Contains("allgather: `out` is float32[6] on cpu but `in` is float16[6] on "
                             "cpu; their dtypes must match"));
  torch::Tensor big = torch::zeros({12});
  torch::Tensor shifted = big.narrow(0, 3, 6);
  torch::Tensor base = big.narrow(0, 0, 6);
  CHECK_THROWS_WITH(comm->reduce_scatter(shifted, base),
                    Contains("reduce_scatter: `out` overlaps `in` without being exactly rank 0's "
                             "shard of it"));
  CHECK_THROWS_WITH(comm->allgather(base, shifted),
                    Contains("allgather: `in` overlaps `out` without being exactly rank 0's "
                             "shard of it"));

  // Argument errors leave the communicator usable, and are not counted.
  CHECK(comm->sequence_number() == 0);
  torch::Tensor t = torch::ones({3});
  comm->allreduce(t);
  CHECK(t.equal(torch::ones({3})));
  CHECK(comm->sequence_number() == 1);
}

#else

TEST_CASE("Gloo communicator", "[communicator]") {
  WARN("skipped: this build has no Gloo (install libgloo-dev)");
}

#endif  // MPU_HAS_GLOO

TEST_CASE("shard_offset and shard_numel split like torch::chunk", "[communicator]") {
  for (std::int64_t numel : {0, 1, 2, 5, 10, 12, 13, 4099}) {
    for (int size : {1, 2, 3, 4, 7}) {
      const auto chunks = torch::arange(numel).chunk(size);
      std::int64_t covered = 0;
      for (int rank = 0; rank < size; ++rank) {
        const std::int64_t offset = mpu::shard_offset(numel, size, rank);
        const std::int64_t count = mpu::shard_numel(numel, size, rank);
        INFO("numel " << numel << " size " << size << " rank " << rank);
        CHECK(offset == covered);
        const std::int64_t expected =
            rank < static_cast<int>(chunks.size()) ? chunks[rank].numel() : 0;
        CHECK(count == expected);
        covered += count;
      }
      CHECK(covered == numel);
    }
  }
  CHECK_THROWS_AS(mpu::shard_numel(10, 2, 2), mpu::InvalidArgument);
}

TEST_CASE("comm_timeout reads MPU_COMM_TIMEOUT_SEC", "[communicator]") {
  ::unsetenv(mpu::kEnvCommTimeout);
  CHECK(mpu::comm_timeout() == mpu::kDefaultCommTimeout);
  ::setenv(mpu::kEnvCommTimeout, "2.5", 1);
  CHECK(mpu::comm_timeout() == std::chrono::milliseconds(2500));
  ::setenv(mpu::kEnvCommTimeout, "0", 1);
  CHECK_THROWS_WITH(mpu::comm_timeout(),
                    Catch::Matchers::Contains("MPU_COMM_TIMEOUT_SEC=\"0\" is not a positive"));
  ::setenv(mpu::kEnvCommTimeout, "5s", 1);
  CHECK_THROWS_AS(mpu::comm_timeout(), mpu::InvalidArgument);
  ::unsetenv(mpu::kEnvCommTimeout);
}

TEST_CASE("Factories without the backend say so", "[communicator]") {
#if !MPU_HAS_NCCL
  CHECK_THROWS_WITH(mpu::nccl_unique_id(), Catch::Matchers::Contains("has no NCCL"));
  CHECK_THROWS_WITH(mpu::make_communicator(torch::Device(torch::kCUDA, 0),
                                           c10::make_intrusive<c10d::HashStore>(), 0, 1),
                    Catch::Matchers::Contains("has no NCCL"));
#endif
  CHECK_THROWS_WITH(mpu::make_communicator(torch::Device(torch::kMeta),
                                           c10::make_intrusive<c10d::HashStore>(), 0, 1),
                    Catch::Matchers::Contains("make_communicator: no backend for device meta"));
}
