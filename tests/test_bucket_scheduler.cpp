// BucketScheduler: buckets over the flat entries, per-entry readiness, in-order launches; and
// through SyncEngine and autograd: a parameter used twice in forward, and a second backward.
//
// How the old code failed: each bucket counted hook calls (`++ready`, launched once
// `ready >= expected`), not entries. A parameter marked twice counted twice, so a 2-entry
// bucket went out with one entry's gradient still missing; and a gradient that arrived again
// after its bucket went out (retain_graph and a second backward) was silently added to a
// buffer already on the wire, so the ranks stepped on a stale or racing sum.
#include "catch_torch.h"

#include "mpu/error.h"
#include "mpu/launch.h"
#include "multiprocess.h"
#include "sync/bucket_scheduler.h"
#include "sync/sync_engine.h"

namespace {

using mpu::detail::BucketEntry;
using mpu::detail::BucketScheduler;

// Four entries of 4 fp32 elements (16 bytes); a 32-byte cap makes two buckets of two entries.
BucketScheduler four_entries(std::int64_t cap_bytes = 32) {
  std::vector<BucketEntry> e;
  for (int i = 0; i < 4; ++i) e.push_back(BucketEntry{"p" + std::to_string(i), 4 * i, 4, true});
  return BucketScheduler(std::move(e), 4, cap_bytes);
}

using Launched = std::vector<std::size_t>;

}  // namespace

TEST_CASE("BucketScheduler: buckets close at the byte cap, frozen entries are not waited for",
          "[bucket_scheduler]") {
  auto s = four_entries();
  REQUIRE(s.size() == 2);
  CHECK(s.buckets()[0].offset == 0);
  CHECK(s.buckets()[0].numel == 8);
  CHECK(s.buckets()[1].offset == 8);
  CHECK(s.bucket_of(3) == 1);
  CHECK(four_entries(1).size() == 4);  // an entry over the cap gets a bucket of its own

  std::vector<BucketEntry> e{{"a", 0, 4, true}, {"frozen", 4, 4, false}};
  BucketScheduler f(std::move(e), 4, 1024);
  REQUIRE(f.size() == 1);
  CHECK(f.mark_ready(0) == Launched{0});
}

TEST_CASE("BucketScheduler: marking one entry twice does not make a 2-entry bucket ready",
          "[bucket_scheduler]") {
  // Old code: ready = 2 >= expected = 2 after two calls for p0, and bucket 0 went out without
  // p1's gradient.
  auto s = four_entries();
  CHECK(s.mark_ready(0).empty());
  CHECK(s.mark_ready(0).empty());
  CHECK(s.mark_ready(1) == Launched{0});
}

TEST_CASE("BucketScheduler: out-of-order readiness launches the buckets in order",
          "[bucket_scheduler]") {
  auto s = four_entries();
  CHECK(s.mark_ready(3).empty());
  CHECK(s.mark_ready(2).empty());  // bucket 1 is complete, but bucket 0 has not gone out
  CHECK(s.mark_ready(0).empty());
  CHECK(s.mark_ready(1) == Launched{0, 1});
  CHECK(s.take_remaining().empty());

  s.reset();  // the next backward starts over
  CHECK(s.mark_ready(0).empty());
  CHECK(s.take_remaining() == Launched{0, 1});
}

TEST_CASE("BucketScheduler: a gradient arriving after its bucket went out is refused by name",
          "[bucket_scheduler]") {
  auto s = four_entries();
  s.mark_ready(0);
  REQUIRE(s.mark_ready(1) == Launched{0});
  REQUIRE_THROWS_WITH(s.mark_ready(1), Catch::Contains("parameter 'p1' arrived again") &&
                                           Catch::Contains("bucket (#0)"));
  CHECK(s.mark_ready(2).empty());  // the other buckets are unaffected
}

namespace {

// w is used twice in forward: autograd sums both uses before w's accumulator, which fires once.
struct TwiceImpl : torch::nn::Module {
  TwiceImpl() {
    w = register_parameter("w", torch::zeros({4}));
    v = register_parameter("v", torch::zeros({4}));
  }
  torch::Tensor loss(const torch::Tensor& x) {
    return (w * x).sum() + (w * (2 * x)).sum() + (v * x).sum();
  }
  torch::Tensor w, v;
};
TORCH_MODULE(Twice);

mpu::UpdaterOptions bucketed(mpu::Strategy strategy) {
  mpu::UpdaterOptions o;
  o.strategy = strategy;
  o.bucket_bytes = 16;  // one 4-element fp32 parameter per bucket
  o.flat_step = false;
  return o;
}

}  // namespace

TEST_CASE("Bucketed gradients of a parameter used twice in forward equal the closed form",
          "[bucket_scheduler][multiprocess]") {
  mpu::test::run_ranks(2, [](const mpu::SpawnContext& ctx) {
    for (auto strategy : {mpu::Strategy::kReplicated, mpu::Strategy::kMasterStep}) {
      Twice net;
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(1.0));
      auto comm = ctx.make_communicator();
      mpu::detail::SyncEngine engine(*net, opt, *comm, bucketed(strategy));
      MPU_EXPECT(engine.bucket_count() == 2u, engine.bucket_count(), " buckets");
      engine.zero_grad();
      engine.arm(true);
      const auto x = torch::full({4}, ctx.rank + 1.0f);
      const auto before = comm->sequence_number();
      net->loss(x).backward();
      // Both buckets went out during backward: every entry was ready exactly once.
      MPU_EXPECT(comm->sequence_number() - before == 2u, comm->sequence_number() - before,
                 " collectives during backward");
      engine.finish(1);
      // Sum over ranks r of d/dw = 3 x_r = 3 (1 + 2) = 9; d/dv = 1 + 2 = 3; lr 1 from zero.
      MPU_EXPECT_EQUAL(net->w.detach(), torch::full({4}, -9.0f), " w, ", mpu::to_string(strategy));
      MPU_EXPECT_EQUAL(net->v.detach(), torch::full({4}, -3.0f), " v, ", mpu::to_string(strategy));
    }
  });
}

TEST_CASE("A second backward through a retained graph after its bucket went out throws by name",
          "[bucket_scheduler][multiprocess]") {
  mpu::test::run_ranks(2, [](const mpu::SpawnContext& ctx) {
    Twice net;
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(1.0));
    auto comm = ctx.make_communicator();
    mpu::detail::SyncEngine engine(*net, opt, *comm, bucketed(mpu::Strategy::kReplicated));
    engine.zero_grad();
    engine.arm(true);
    auto loss = net->loss(torch::ones({4}));
    loss.backward({}, /*retain_graph=*/true);
    // Old code: no error; the second gradient was added into buffers already reduced.
    std::string message = "nothing was thrown";
    try {
      loss.backward();
    } catch (const std::exception& e) {
      message = e.what();
    }
    MPU_EXPECT(message.find("gradient of parameter '") != std::string::npos, message);
    // The engine is still usable for the next step.
    engine.zero_grad();
    engine.arm(true);
    net->loss(torch::ones({4})).backward();
    engine.finish(1);
    MPU_EXPECT_EQUAL(net->v.detach(), torch::full({4}, -2.0f), " v after the next step");
  });
}
