#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "mpu/datasets.h"
#include "mpu/iterator.h"

#include "catch_torch.h"

namespace {

// Example i is (data = [i, -i] as float, target = i), so a batch's targets are its indices.
mpu::DatasetPtr counting_dataset(std::int64_t n) {
  auto ids = torch::arange(n, torch::kInt64);
  auto data = torch::stack({ids, -ids}, 1).to(torch::kFloat32);
  return std::make_shared<mpu::TensorDataset>(data, ids);
}

std::vector<std::int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.to(torch::kInt64).contiguous();
  return std::vector<std::int64_t>(c.data_ptr<std::int64_t>(),
                                   c.data_ptr<std::int64_t>() + c.numel());
}

std::vector<std::int64_t> range(std::int64_t begin, std::int64_t end) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(end - begin));
  std::iota(v.begin(), v.end(), begin);
  return v;
}

std::vector<std::int64_t> concat(std::vector<std::int64_t> a, const std::vector<std::int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

bool is_permutation_of_range(std::vector<std::int64_t> v, std::int64_t n) {
  std::sort(v.begin(), v.end());
  return v == range(0, n);
}

struct Step {
  std::vector<std::int64_t> indices;
  std::int64_t epoch;
  bool is_new_epoch;
  std::int64_t examples_seen;  // epoch_detail * N, for repeat
};

void expect_steps(mpu::Iterator& it, const std::vector<Step>& steps) {
  const auto n = static_cast<double>(it.dataset_size());
  for (std::size_t k = 0; k < steps.size(); ++k) {
    INFO("batch " << k + 1);
    const mpu::Batch b = it.next();
    CHECK(to_vector(b.target) == steps[k].indices);
    CHECK(b.data.size(0) == static_cast<std::int64_t>(steps[k].indices.size()));
    CHECK(it.epoch() == steps[k].epoch);
    CHECK(it.is_new_epoch() == steps[k].is_new_epoch);
    CHECK(it.epoch_detail() == Approx(steps[k].examples_seen / n));
    CHECK(it.iteration() == static_cast<std::int64_t>(k + 1));
  }
}

// A tiny LibTorch dataset, to test the adapter.
class SquaresDataset : public torch::data::datasets::Dataset<SquaresDataset> {
 public:
  torch::data::Example<> get(size_t index) override {
    const auto i = static_cast<std::int64_t>(index);
    return {torch::full({2}, static_cast<float>(i * i)), torch::tensor(i)};
  }
  torch::optional<size_t> size() const override { return 6; }
};

}  // namespace

TEST_CASE("The generator is the standard's mt19937_64", "[iterator]") {
  // [rand.predef]: the 10000th output of a default-constructed mt19937_64 is fixed by the
  // standard. Orders depend on nothing else, so they are the same on every platform.
  mpu::Rng rng;
  rng.discard(9999);
  CHECK(rng() == 9981545732273789042ULL);
}

TEST_CASE("random_permutation and epoch_order are reproducible permutations", "[iterator]") {
  for (std::int64_t n : {0, 1, 2, 7, 100, 1000}) {
    INFO("n = " << n);
    const auto p = mpu::random_permutation(n, 42);
    CHECK(is_permutation_of_range(p, n));
    CHECK(p == mpu::random_permutation(n, 42));
  }
  const auto e0 = mpu::epoch_order(1000, 7, 0, true);
  const auto e1 = mpu::epoch_order(1000, 7, 1, true);
  CHECK(is_permutation_of_range(e0, 1000));
  CHECK(is_permutation_of_range(e1, 1000));
  CHECK(e0 != e1);
  CHECK(e0 == mpu::epoch_order(1000, 7, 0, true));
  CHECK(e0 != mpu::epoch_order(1000, 8, 0, true));
  CHECK(e0 == mpu::random_permutation(1000, mpu::derive_seed(7, 0)));
  CHECK(mpu::epoch_order(5, 7, 3, false) == range(0, 5));
  CHECK_THROWS_AS(mpu::epoch_order(5, 7, -1, true), mpu::InvalidArgument);
}

TEST_CASE("random_permutation is uniform over the 6 orders of 3", "[iterator]") {
  std::map<std::vector<std::int64_t>, int> counts;
  const int trials = 60000;
  for (int s = 0; s < trials; ++s) ++counts[mpu::random_permutation(3, mpu::derive_seed(s, 1))];
  REQUIRE(counts.size() == 6);
  // Expected 10000 each, standard deviation about 91: 5 sigma is 456.
  for (const auto& [perm, count] : counts) CHECK(std::abs(count - trials / 6) < 456);
}

TEST_CASE("uniform_below stays in range and rejects n = 0", "[iterator]") {
  mpu::Rng rng(3);
  std::vector<int> seen(5, 0);
  for (int i = 0; i < 5000; ++i) {
    const auto x = mpu::uniform_below(rng, 5);
    REQUIRE(x < 5);
    ++seen[static_cast<std::size_t>(x)];
  }
  for (int c : seen) CHECK(c > 800);
  CHECK(mpu::uniform_below(rng, 1) == 0);
  CHECK_THROWS_AS(mpu::uniform_below(rng, 0), mpu::InvalidArgument);
}

TEST_CASE("Iterator with repeat: batches wrap around epoch ends (N=10, B=4)", "[iterator]") {
  for (bool prefetch : {false, true}) {
    SECTION(prefetch ? "prefetch" : "no prefetch") {
      mpu::Iterator it(counting_dataset(10),
                       mpu::IteratorOptions(4).shuffle(false).prefetch(prefetch));
      CHECK(it.epoch() == 0);
      CHECK_FALSE(it.is_new_epoch());
      CHECK(it.epoch_detail() == 0.0);
      CHECK(it.batch_size() == 4);
      CHECK(it.dataset_size() == 10);
      expect_steps(it, {{{0, 1, 2, 3}, 0, false, 4},
                        {{4, 5, 6, 7}, 0, false, 8},
                        {{8, 9, 0, 1}, 1, true, 12},
                        {{2, 3, 4, 5}, 1, false, 16},
                        {{6, 7, 8, 9}, 2, true, 20},
                        {{0, 1, 2, 3}, 2, false, 24}});
      CHECK(it.position() == 4);
      CHECK_FALSE(it.finished());
      it.reset();
      CHECK(it.epoch() == 0);
      CHECK(it.iteration() == 0);
      CHECK(it.epoch_detail() == 0.0);
      expect_steps(it, {{{0, 1, 2, 3}, 0, false, 4}});
    }
  }
}

TEST_CASE("Iterator without repeat: one pass, a partial last batch, then StopIteration",
          "[iterator]") {
  for (bool prefetch : {false, true}) {
    SECTION(prefetch ? "prefetch" : "no prefetch") {
      mpu::Iterator it(counting_dataset(10),
                       mpu::IteratorOptions(4).shuffle(false).repeat(false).prefetch(prefetch));
      expect_steps(
          it, {{{0, 1, 2, 3}, 0, false, 4}, {{4, 5, 6, 7}, 0, false, 8}, {{8, 9}, 1, true, 10}});
      CHECK(it.finished());
      CHECK(it.epoch_detail() == 1.0);
      CHECK_THROWS_AS(it.next(), mpu::StopIteration);
      CHECK_THROWS_WITH(it.next(), Catch::Matchers::Contains("call reset()"));
      it.reset();
      CHECK_FALSE(it.finished());
      expect_steps(it, {{{0, 1, 2, 3}, 0, false, 4}});
    }
  }
  SECTION("the batch divides the dataset") {
    mpu::Iterator it(counting_dataset(8), mpu::IteratorOptions(4).shuffle(false).repeat(false));
    expect_steps(it, {{{0, 1, 2, 3}, 0, false, 4}, {{4, 5, 6, 7}, 1, true, 8}});
    CHECK(it.finished());
    CHECK_THROWS_AS(it.next(), mpu::StopIteration);
  }
  SECTION("shuffled: every example exactly once") {
    mpu::Iterator it(counting_dataset(10), mpu::IteratorOptions(3).repeat(false).seed(9));
    std::vector<std::int64_t> seen;
    while (!it.finished()) seen = concat(seen, to_vector(it.next().target));
    CHECK(seen == mpu::epoch_order(10, 9, 0, true));
    CHECK(it.iteration() == 4);
  }
}

TEST_CASE("Iterator with shuffle serves each epoch in the order of (seed, epoch)", "[iterator]") {
  const std::int64_t n = 7;
  const std::uint64_t seed = 5;
  std::vector<std::int64_t> stream;
  for (std::int64_t e = 0; e < 4; ++e) stream = concat(stream, mpu::epoch_order(n, seed, e, true));
  mpu::Iterator it(counting_dataset(n), mpu::IteratorOptions(3).seed(seed));
  // Batch k takes stream[3k, 3k+3); the epoch ends after examples 7, 14, 21.
  std::vector<Step> steps;
  for (std::int64_t k = 0; k < 9; ++k) {
    const std::int64_t end = 3 * (k + 1);
    steps.push_back({std::vector<std::int64_t>(stream.begin() + 3 * k, stream.begin() + end),
                     end / n, (end / n) != ((end - 3) / n), end});
  }
  expect_steps(it, steps);
  SECTION("the same seed gives the same batches, another seed others") {
    mpu::Iterator same(counting_dataset(n), mpu::IteratorOptions(3).seed(seed));
    mpu::Iterator other(counting_dataset(n), mpu::IteratorOptions(3).seed(seed + 1));
    bool all_same = true;
    std::vector<std::int64_t> a, b;
    for (int k = 0; k < 9; ++k) {
      a = concat(a, to_vector(same.next().target));
      b = concat(b, to_vector(other.next().target));
    }
    CHECK(a == std::vector<std::int64_t>(stream.begin(), stream.begin() + 27));
    all_same = a == b;
    CHECK_FALSE(all_same);
  }
}

TEST_CASE("Iterator with a batch larger than the dataset crosses several epochs", "[iterator]") {
  mpu::Iterator it(counting_dataset(3), mpu::IteratorOptions(7).shuffle(false));
  expect_steps(it, {{{0, 1, 2, 0, 1, 2, 0}, 2, true, 7}, {{1, 2, 0, 1, 2, 0, 1}, 4, true, 14}});
  CHECK(it.position() == 2);
}

TEST_CASE("Prefetching does not change the batches", "[iterator]") {
  // Random augmentations keyed by (seed, epoch, index), so that a wrong epoch would show.
  auto images = torch::randint(0, 256, {23, 1, 6, 6}, torch::kUInt8);
  auto labels = torch::arange(23, torch::kInt64) % 10;
  mpu::DatasetPtr base = std::make_shared<mpu::datasets::ImageDataset>(images, labels);
  auto data = mpu::datasets::transform(
      base, {mpu::datasets::RandomCrop(6, 2), mpu::datasets::RandomHorizontalFlip()}, 11);
  mpu::Iterator plain(data, mpu::IteratorOptions(5).seed(3).prefetch(false));
  mpu::Iterator fetched(data, mpu::IteratorOptions(5).seed(3).prefetch(true));
  for (int k = 0; k < 30; ++k) {
    INFO("batch " << k);
    const auto a = plain.next();
    const auto b = fetched.next();
    REQUIRE(torch::equal(a.data, b.data));
    REQUIRE(torch::equal(a.target, b.target));
    REQUIRE(plain.epoch_detail() == fetched.epoch_detail());
    REQUIRE(plain.is_new_epoch() == fetched.is_new_epoch());
  }
  // reset() in the middle discards the prefetched batch.
  fetched.reset();
  mpu::Iterator fresh(data, mpu::IteratorOptions(5).seed(3).prefetch(false));
  CHECK(torch::equal(fetched.next().data, fresh.next().data));
}

TEST_CASE("Iterator save/load resumes exactly", "[iterator]") {
  auto data = counting_dataset(11);
  const auto options = mpu::IteratorOptions(4).seed(21);
  mpu::Iterator it(data, options);
  for (int k = 0; k < 7; ++k) it.next();
  torch::serialize::OutputArchive out;
  it.save(out);
  std::ostringstream os;
  out.save_to(os);

  std::istringstream is(os.str());
  torch::serialize::InputArchive in;
  in.load_from(is);
  mpu::Iterator resumed(data, options);
  resumed.next();  // a prefetched batch must not survive the load
  resumed.load(in);
  CHECK(resumed.epoch() == it.epoch());
  CHECK(resumed.position() == it.position());
  CHECK(resumed.iteration() == it.iteration());
  CHECK(resumed.is_new_epoch() == it.is_new_epoch());
  CHECK(resumed.epoch_detail() == it.epoch_detail());
  for (int k = 0; k < 12; ++k) {
    INFO("batch " << k);
    CHECK(to_vector(resumed.next().target) == to_vector(it.next().target));
    CHECK(resumed.epoch() == it.epoch());
  }

  SECTION("a different seed, shuffle or dataset size is refused") {
    std::istringstream is2(os.str());
    torch::serialize::InputArchive in2;
    in2.load_from(is2);
    mpu::Iterator other_seed(data, mpu::IteratorOptions(4).seed(22));
    CHECK_THROWS_WITH(other_seed.load(in2), Catch::Matchers::Contains("saved with seed 21"));
    mpu::Iterator other_shuffle(data, mpu::IteratorOptions(4).seed(21).shuffle(false));
    CHECK_THROWS_AS(other_shuffle.load(in2), mpu::InvalidArgument);
    mpu::Iterator other_size(counting_dataset(12), options);
    CHECK_THROWS_WITH(other_size.load(in2),
                      Catch::Matchers::Contains("saved for a dataset of 11 examples"));
    torch::serialize::InputArchive empty;
    CHECK_THROWS_WITH(other_size.load(empty), Catch::Matchers::Contains("has no"));
  }
}

TEST_CASE("split_dataset_n_random: equal, disjoint shards - the remainder is dropped",
          "[iterator]") {
  auto data = counting_dataset(103);
  for (int n : {1, 2, 4, 7, 103}) {
    INFO("n = " << n);
    const auto shards = mpu::split_dataset_n_random(data, n, 17);
    REQUIRE(static_cast<int>(shards.size()) == n);
    std::set<std::int64_t> all;
    for (const auto& shard : shards) {
      REQUIRE(shard->size() == 103 / n);
      std::vector<std::int64_t> all_indices = range(0, shard->size());
      for (auto i : to_vector(shard->get_batch(all_indices).target)) {
        CHECK(all.insert(i).second);  // no example in two shards
        CHECK((i >= 0 && i < 103));
      }
    }
    CHECK(static_cast<std::int64_t>(all.size()) == (103 / n) * n);
    // Exactly the first n*m positions of the split permutation are served.
    const auto perm = mpu::random_permutation(103, mpu::derive_seed(17, mpu::kSplitStream));
    CHECK(all == std::set<std::int64_t>(perm.begin(), perm.begin() + (103 / n) * n));
  }
  auto indices_of = [](const mpu::DatasetPtr& shard) {
    return dynamic_cast<const mpu::SubsetDataset&>(*shard).indices();
  };
  const auto a = mpu::split_dataset_n_random(data, 4, 17);
  const auto b = mpu::split_dataset_n_random(data, 4, 17);
  const auto c = mpu::split_dataset_n_random(data, 4, 18);
  for (int i = 0; i < 4; ++i) CHECK(indices_of(a[i]) == indices_of(b[i]));
  CHECK(indices_of(a[0]) != indices_of(c[0]));
  for (int r = 0; r < 4; ++r) {
    CHECK(indices_of(mpu::shard_dataset(data, r, 4, 17)) == indices_of(a[r]));
    CHECK(indices_of(mpu::shard_dataset(data, r, 4, 17, false)) == range(25 * r, 25 * r + 25));
  }
  const auto contiguous = mpu::split_dataset_n(data, 3);
  CHECK(indices_of(contiguous[2]) == range(68, 102));

  CHECK_THROWS_WITH(mpu::split_dataset_n_random(data, 104, 0),
                    Catch::Matchers::Contains("104 shards of a dataset of 103 examples"));
  CHECK_THROWS_AS(mpu::split_dataset_n_random(data, 0, 0), mpu::InvalidArgument);
  CHECK_THROWS_AS(mpu::split_dataset_n_random(nullptr, 2, 0), mpu::InvalidArgument);
  CHECK_THROWS_WITH(mpu::shard_dataset(data, 4, 4), Catch::Matchers::Contains("rank 4"));
}

TEST_CASE("split_iterators and shard_iterator serve the same batches", "[iterator]") {
  auto data = counting_dataset(50);
  const auto iters = mpu::split_iterators(data, 3, 4, true, 99);
  REQUIRE(iters.size() == 3);
  std::set<std::int64_t> first_epoch;
  for (int r = 0; r < 3; ++r) {
    auto shard = mpu::shard_iterator(data, r, 3, 4, true, 99);
    CHECK(iters[r]->dataset_size() == 16);
    CHECK(shard->options().seed() == iters[r]->options().seed());
    for (int k = 0; k < 9; ++k) {
      const auto a = to_vector(iters[r]->next().target);
      CHECK(a == to_vector(shard->next().target));
      if (k < 4) first_epoch.insert(a.begin(), a.end());
    }
  }
  CHECK(first_epoch.size() == 48);  // 3 shards x 16, disjoint
  // Shards do not share their within-shard shuffles.
  CHECK(iters[0]->options().seed() != iters[1]->options().seed());
}

TEST_CASE("Datasets: get_batch stacks get - subsets and the LibTorch adapter", "[iterator]") {
  auto data = counting_dataset(6);
  const auto batch = data->get_batch({4, 1, 4});
  CHECK(to_vector(batch.target) == std::vector<std::int64_t>{4, 1, 4});
  CHECK(torch::equal(batch.data[1], data->get(1).data));
  CHECK_THROWS_WITH(data->get(6), Catch::Matchers::Contains("index 6 is out of range"));
  CHECK_THROWS_WITH(data->get_batch({0, -1}),
                    Catch::Matchers::Contains("indices[1] = -1 is out of range"));
  CHECK_THROWS_WITH(data->get_batch({0, 1}, std::vector<std::int64_t>{0}),
                    Catch::Matchers::Contains("2 indices but 1 epochs"));
  CHECK_THROWS_WITH(mpu::TensorDataset(torch::zeros({3, 2}), torch::zeros({4})),
                    Catch::Matchers::Contains("data has 3 examples (dim 0) but targets has 4"));

  mpu::SubsetDataset subset(data, {5, 0, 5});
  CHECK(subset.size() == 3);
  CHECK(to_vector(subset.get_batch({2, 1}).target) == std::vector<std::int64_t>{5, 0});
  CHECK_THROWS_AS(mpu::SubsetDataset(data, {6}), mpu::InvalidArgument);

  auto squares = mpu::make_dataset(SquaresDataset());
  CHECK(squares->size() == 6);
  const auto sq = squares->get_batch({3, 5});
  CHECK(to_vector(sq.target) == std::vector<std::int64_t>{3, 5});
  CHECK(torch::equal(sq.data, torch::tensor({9.0f, 9.0f, 25.0f, 25.0f}).view({2, 2})));
  mpu::Iterator it(squares, mpu::IteratorOptions(4).shuffle(false));
  CHECK(to_vector(it.next().target) == range(0, 4));
}

TEST_CASE("Iterator argument checks", "[iterator]") {
  CHECK_THROWS_WITH(mpu::Iterator(counting_dataset(3), 0),
                    Catch::Matchers::Contains("batch_size = 0"));
  CHECK_THROWS_AS(mpu::Iterator(nullptr, 4), mpu::InvalidArgument);
  auto empty = std::make_shared<mpu::TensorDataset>(torch::zeros({0, 2}), torch::zeros({0}));
  CHECK_THROWS_WITH(mpu::Iterator(empty, 4), Catch::Matchers::Contains("the dataset is empty"));
}

TEST_CASE("An iterator moved from keeps working in its new place", "[iterator]") {
  mpu::Iterator a(counting_dataset(10), mpu::IteratorOptions(4).shuffle(false));
  a.next();  // starts the prefetch thread
  mpu::Iterator b(std::move(a));
  CHECK(to_vector(b.next().target) == range(4, 8));
  mpu::Iterator c(counting_dataset(5), 2);
  c.next();
  c = std::move(b);  // joins c's thread
  CHECK(to_vector(c.next().target) == std::vector<std::int64_t>{8, 9, 0, 1});
}

namespace {

// Runs `body` in a forked child and returns its exit status (0 = passed). The child gives up
// after 30 s, so a hang fails the test instead of blocking it.
int in_child(const std::function<bool()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    at::set_num_threads(1);  // GNU OpenMP does not survive fork()
    ::alarm(30);
    int code = 2;
    try {
      code = body() ? 0 : 1;
    } catch (...) {
      code = 3;
    }
    ::_exit(code);
  }
  REQUIRE(pid > 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  INFO("child status " << status);
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

}  // namespace

TEST_CASE("Iterators survive fork(): before and after the prefetch thread started",
          "[iterator][multiprocess]") {
  auto data = counting_dataset(13);
  const auto options = mpu::IteratorOptions(5).seed(4);
  std::vector<std::vector<std::int64_t>> expected;
  {
    mpu::Iterator reference(data, mpu::IteratorOptions(options).prefetch(false));
    for (int k = 0; k < 8; ++k) expected.push_back(to_vector(reference.next().target));
  }
  auto serves_expected = [&expected](mpu::Iterator& it, std::size_t from) {
    for (std::size_t k = from; k < expected.size(); ++k) {
      if (to_vector(it.next().target) != expected[k]) return false;
    }
    return true;
  };

  SECTION("forked before the first next(), as MultiprocessParallelUpdater does") {
    auto it = std::make_unique<mpu::Iterator>(data, options);
    CHECK(in_child([&] {
            const bool ok = serves_expected(*it, 0);
            it.reset();  // joins the child's own thread
            return ok;
          }) == 0);
    CHECK(serves_expected(*it, 0));
  }
  SECTION("forked after the thread started: the child discards it and starts its own") {
    auto it = std::make_unique<mpu::Iterator>(data, options);
    CHECK(to_vector(it->next().target) == expected[0]);
    it->wait_idle();
    CHECK(in_child([&] {
            const bool ok = serves_expected(*it, 1);
            it.reset();
            return ok;
          }) == 0);
    CHECK(in_child([&] {
            it.reset();  // destroys the parent's thread state in the child: must not hang
            return true;
          }) == 0);
    CHECK(serves_expected(*it, 1));
  }
}

TEST_CASE("pin_memory returns pinned batches with the same values", "[iterator][cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("skipped: pinning needs CUDA, and no CUDA device is available");
    return;
  }
  auto data = counting_dataset(10);
  mpu::Iterator pinned(data, mpu::IteratorOptions(4).seed(1).pin_memory(true));
  mpu::Iterator plain(data, mpu::IteratorOptions(4).seed(1));
  for (int k = 0; k < 5; ++k) {
    const auto a = pinned.next();
    const auto b = plain.next();
    CHECK(a.data.is_pinned());
    CHECK(a.target.is_pinned());
    CHECK(torch::equal(a.data, b.data));
    CHECK(torch::equal(a.target, b.target));
  }
}
