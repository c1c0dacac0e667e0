#include <sys/resource.h>
#include <unistd.h>
#include "catch_torch.h"
#include "messages.h"
#include "remove_tree.h"

#include <csignal>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "mpu/error.h"
#include "mpu/extensions.h"
#include "mpu/trainer.h"
#include "toy_updater.h"

namespace fs = std::filesystem;
using mpu_test::ToyOptions;
using mpu_test::ToyUpdater;

namespace {

// A fresh directory for one test, removed afterwards.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(fs::temp_directory_path() / ("mpu_test_" + std::to_string(::getpid()) + "_" + name)) {
    mpu::test::remove_tree(path_.string());
  }
  ~TempDir() { mpu::test::remove_tree(path_.string()); }
  std::string str() const { return path_.string(); }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

using mpu::test::message_of;

// Records the iterations at which it runs.
std::shared_ptr<mpu::Extension> recorder(std::vector<std::int64_t>& at, mpu::Trigger trigger) {
  return mpu::make_extension(
      "recorder", [&at](mpu::Trainer& t) { at.push_back(t.updater().iteration()); }, trigger);
}

std::vector<std::int64_t> multiples(std::int64_t step, std::int64_t last) {
  std::vector<std::int64_t> v;
  for (std::int64_t i = step; i <= last; i += step) v.push_back(i);
  return v;
}

}  // namespace

TEST_CASE("Interval triggers fire every N iterations or epochs, and the stop trigger ends the run",
          "[trainer]") {
  TempDir dir("triggers");
  ToyOptions opt;  // 12 samples, batch 4: 3 iterations per epoch
  const std::int64_t per_epoch = opt.samples / opt.batch_size;

  SECTION("iterations") {
    ToyUpdater updater(opt);
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(7), dir.str());
    std::vector<std::int64_t> every2;
    trainer.extend(recorder(every2, mpu::every_iterations(2)));
    trainer.run();
    CHECK(updater.iteration() == 7);
    CHECK(every2 == multiples(2, 7));
  }
  SECTION("epochs") {
    ToyUpdater updater(opt);
    mpu::Trainer trainer(updater, mpu::stop_after_epochs(4), dir.str());
    std::vector<std::int64_t> every_epoch;
    std::vector<std::int64_t> every_2_epochs;
    trainer.extend(recorder(every_epoch, mpu::every_epochs(1)));
    trainer.extend(recorder(every_2_epochs, mpu::every_epochs(2)));
    trainer.run();
    CHECK(updater.epoch() == 4);
    CHECK(updater.iteration() == 4 * per_epoch);
    CHECK(every_epoch == multiples(per_epoch, 4 * per_epoch));
    CHECK(every_2_epochs == multiples(2 * per_epoch, 4 * per_epoch));
    CHECK((trainer.extension_names() == std::vector<std::string>{"recorder", "recorder_1"}));
  }
  SECTION("a custom predicate") {
    ToyUpdater updater(opt);
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(6), dir.str());
    std::vector<std::int64_t> at;
    trainer.extend(
        recorder(at, [](const mpu::Trainer& t) { return t.updater().iteration() % 5 == 1; }));
    trainer.run();
    CHECK((at == std::vector<std::int64_t>{1, 6}));
  }
  CHECK_THROWS_AS(mpu::every_iterations(0), mpu::InvalidArgument);
  CHECK_THROWS_AS(mpu::stop_after_epochs(-1), mpu::InvalidArgument);
}

TEST_CASE("Extensions run by priority, see the iteration's observation, and run where they should",
          "[trainer]") {
  TempDir dir("order");
  std::vector<std::string> calls;
  auto named = [&calls](const std::string& name, int priority, bool all_ranks) {
    return mpu::make_extension(
        name,
        [&calls, name](mpu::Trainer& t) {
          calls.push_back(name + "@" + std::to_string(t.updater().iteration()) +
                          (t.observation().count("main/loss") ? "+loss" : ""));
        },
        mpu::every_iterations(1), priority, all_ranks);
  };

  SECTION("main process: all extensions, highest priority first, ties in order of extend") {
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(1), dir.str());
    trainer.extend(named("reader_a", mpu::kPriorityReader, false));
    trainer.extend(named("snapshotlike", mpu::kPrioritySnapshot, false));
    trainer.extend(named("writer", mpu::kPriorityWriter, false));
    trainer.extend(named("reader_b", mpu::kPriorityReader, false));
    trainer.extend(named("bumped", mpu::kPriorityReader, false), std::nullopt,
                   mpu::kPriorityWriter + 1);
    trainer.run();
    CHECK((calls == std::vector<std::string>{"bumped@1+loss", "writer@1+loss", "reader_a@1+loss",
                                             "reader_b@1+loss", "snapshotlike@1+loss"}));
    CHECK(fs::is_directory(dir.str()));
    CHECK(updater.finalize_calls == 1);
  }
  SECTION("another rank: only extensions that ask for all ranks; no output directory") {
    ToyOptions opt;
    opt.rank = 1;
    opt.world_size = 2;
    ToyUpdater updater(opt);
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(2), dir.str());
    trainer.extend(named("main_only", mpu::kPriorityReader, false));
    trainer.extend(named("everywhere", mpu::kPriorityReader, true));
    trainer.extend(mpu::LogReport(mpu::every_iterations(1)));
    trainer.run();
    CHECK((calls == std::vector<std::string>{"everywhere@1+loss", "everywhere@2+loss"}));
    CHECK_FALSE(fs::exists(dir.str()));
  }
}

TEST_CASE("Trainer::run finalizes extensions and the updater, also when an extension throws",
          "[trainer]") {
  TempDir dir("finalize");
  struct Counting : mpu::Extension {
    int* initialized;
    int* finalized;
    std::int64_t throw_at;
    Counting(int* i, int* f, std::int64_t t) : initialized(i), finalized(f), throw_at(t) {}
    std::string name() const override { return "counting"; }
    void initialize(mpu::Trainer&) override { ++*initialized; }
    void operator()(mpu::Trainer& t) override {
      if (t.updater().iteration() == throw_at)
        throw std::runtime_error("boom at " + std::to_string(throw_at));
    }
    void finalize() override { ++*finalized; }
  };
  int initialized = 0;
  int finalized = 0;
  ToyUpdater updater;
  mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
  trainer.extend(Counting(&initialized, &finalized, 4));
  CHECK_THROWS_WITH(trainer.run(), "boom at 4");
  CHECK(updater.iteration() == 4);
  CHECK(initialized == 1);
  CHECK(finalized == 1);
  CHECK(updater.finalize_calls == 1);
  CHECK_THROWS_WITH(trainer.run(), Catch::Contains("already run"));
  CHECK_THROWS_AS(trainer.extend(mpu::LogReport()), mpu::InvalidArgument);
}

TEST_CASE("LogReport writes Chainer's JSON log with the means of each interval", "[trainer]") {
  TempDir dir("log");
  ToyOptions opt;
  opt.samples = 10;  // batches of 4, 4 and 2: the last batch of each epoch is smaller
  ToyUpdater updater(opt);
  std::vector<float> losses;
  std::vector<std::int64_t> sizes;
  updater.on_loss = [&](float loss, std::int64_t size) {
    losses.push_back(loss);
    sizes.push_back(size);
  };
  const std::int64_t epochs = 3;
  const std::int64_t per_epoch = 3;
  mpu::Trainer trainer(updater, mpu::stop_after_epochs(epochs), dir.str());
  auto log = std::make_shared<mpu::LogReport>();
  trainer.extend(log);
  trainer.extend(mpu::LogReport({"main/loss"}, mpu::every_iterations(2), "log_every_2"));
  trainer.run();
  REQUIRE(losses.size() == static_cast<std::size_t>(epochs * per_epoch));

  // The means, in float64, in the order they were reported.
  auto mean_of = [](const auto& v, std::size_t begin, std::size_t end) {
    double sum = 0;
    for (std::size_t i = begin; i < end; ++i) sum += static_cast<double>(v[i]);
    return sum / static_cast<double>(end - begin);
  };

  const auto json = nlohmann::ordered_json::parse(read_file(dir / "log"));
  REQUIRE(json.is_array());
  REQUIRE(json.size() == static_cast<std::size_t>(epochs));
  double previous_time = 0;
  for (std::int64_t e = 0; e < epochs; ++e) {
    const auto& row = json[static_cast<std::size_t>(e)];
    std::vector<std::string> keys;
    for (const auto& [key, value] : row.items()) keys.push_back(key);
    CHECK((keys == std::vector<std::string>{"main/batch_size", "main/loss", "epoch", "iteration",
                                            "elapsed_time"}));
    const auto b = static_cast<std::size_t>(e * per_epoch);
    const auto end = b + static_cast<std::size_t>(per_epoch);
    CHECK(row["main/loss"].get<double>() == mean_of(losses, b, end));
    CHECK(row["main/batch_size"].get<double>() == mean_of(sizes, b, end));
    CHECK(row["epoch"].get<std::int64_t>() == e + 1);
    CHECK(row["iteration"].get<std::int64_t>() == (e + 1) * per_epoch);
    CHECK(row["elapsed_time"].get<double>() > previous_time);
    CHECK(row["elapsed_time"].get<double>() <= trainer.elapsed_time());
    previous_time = row["elapsed_time"].get<double>();
  }
  // The in-memory log is the file's content.
  REQUIRE(log->log().size() == static_cast<std::size_t>(epochs));
  CHECK(log->log()[1].values.at("main/loss") == json[1]["main/loss"].get<double>());
  CHECK(log->to_json() == read_file(dir / "log"));

  // A key filter and an iteration trigger; the last odd iteration stays unreported.
  const auto every2 = nlohmann::json::parse(read_file(dir / "log_every_2"));
  REQUIRE(every2.size() == losses.size() / 2);
  for (std::size_t r = 0; r < every2.size(); ++r) {
    CHECK(every2[r].size() == 4);
    CHECK(every2[r]["main/loss"].get<double>() == mean_of(losses, 2 * r, 2 * r + 2));
    CHECK(every2[r]["iteration"].get<std::int64_t>() == static_cast<std::int64_t>(2 * r + 2));
  }
  // No temporary files are left behind.
  for (const auto& entry : fs::directory_iterator(dir.str())) {
    CHECK(entry.path().filename().string()[0] != '.');
  }
}

TEST_CASE("Snapshot and resume continue exactly where the run stopped", "[trainer][snapshot]") {
  TempDir straight_dir("straight");
  TempDir split_dir("split");
  ToyOptions opt;
  opt.samples = 10;  // 3 iterations per epoch: iteration 10 is in the middle of epoch 4
  const std::int64_t total = 20;
  const std::int64_t first = 10;

  auto extend_all = [](mpu::Trainer& t, std::shared_ptr<mpu::LogReport> log) {
    t.extend(log);
    t.extend(mpu::Snapshot(), mpu::every_iterations(5));
  };

  ToyUpdater straight(opt);
  mpu::Trainer straight_trainer(straight, mpu::stop_after_iterations(total), straight_dir.str());
  auto straight_log = std::make_shared<mpu::LogReport>();
  extend_all(straight_trainer, straight_log);
  straight_trainer.run();

  double elapsed_at_snapshot = 0;
  {
    ToyUpdater part1(opt);
    mpu::Trainer trainer(part1, mpu::stop_after_iterations(first), split_dir.str());
    extend_all(trainer, std::make_shared<mpu::LogReport>());
    trainer.run();
    elapsed_at_snapshot = trainer.elapsed_time();
  }
  const auto latest = mpu::find_latest_snapshot(split_dir.str());
  REQUIRE(latest.has_value());
  CHECK(fs::path(*latest).filename() == "snapshot_iter_" + std::to_string(first));

  ToyUpdater part2(opt);  // a fresh model and optimizer, as after a restart
  CHECK_FALSE(torch::equal(part2.linear()->weight, straight.linear()->weight));
  mpu::Trainer trainer(part2, mpu::stop_after_iterations(total), split_dir.str());
  auto resumed_log = std::make_shared<mpu::LogReport>();
  extend_all(trainer, resumed_log);
  trainer.resume(*latest);
  CHECK(part2.iteration() == first);
  CHECK(trainer.elapsed_time() <= elapsed_at_snapshot);
  CHECK(trainer.elapsed_time() > 0);
  // The clock goes on from the snapshot's time. (Not from part 1's end: part 1 ran on after its
  // snapshot, so the resumed run may finish below that, as seen on a loaded GPU machine.)
  const double resumed_at = trainer.elapsed_time();
  trainer.run();

  CHECK(part2.iteration() == total);
  CHECK(part2.epoch() == straight.epoch());
  CHECK(torch::equal(part2.linear()->weight, straight.linear()->weight));
  CHECK(torch::equal(part2.linear()->bias, straight.linear()->bias));
  // The log, including the row whose interval straddles the snapshot, is the same.
  REQUIRE(resumed_log->log().size() == straight_log->log().size());
  REQUIRE_FALSE(straight_log->log().empty());
  for (std::size_t i = 0; i < straight_log->log().size(); ++i) {
    CHECK(resumed_log->log()[i].iteration == straight_log->log()[i].iteration);
    CHECK(resumed_log->log()[i].epoch == straight_log->log()[i].epoch);
    CHECK(resumed_log->log()[i].values == straight_log->log()[i].values);
  }
  CHECK(trainer.elapsed_time() > resumed_at);
}

TEST_CASE("Snapshot keeps the last k files and writes atomically", "[trainer][snapshot]") {
  TempDir dir("keep");
  ToyUpdater updater;
  mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
  auto snapshot = std::make_shared<mpu::Snapshot>("snap_{epoch}_{iteration}.pt", 3);
  trainer.extend(snapshot, mpu::every_iterations(2));
  trainer.run();
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir.str()))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  // Iterations 6, 8 and 10 (3 per epoch: epochs 2, 2 and 3) remain.
  CHECK((names == std::vector<std::string>{"snap_2_6.pt", "snap_2_8.pt", "snap_3_10.pt"}));
  CHECK(snapshot->last_path() == (dir / "snap_3_10.pt").string());
  CHECK(mpu::find_latest_snapshot(dir.str(), "snap_{epoch}_{iteration}.pt") ==
        snapshot->last_path());
  CHECK_FALSE(mpu::find_latest_snapshot(dir.str()).has_value());  // the default pattern
  CHECK(mpu::format_snapshot_name("s_{epoch}_{iteration}_{epoch}", 12, 3) == "s_3_12_3");
  CHECK_THROWS_AS(mpu::Snapshot("sub/snap"), mpu::InvalidArgument);
  CHECK_THROWS_AS(mpu::Snapshot("snap", -1), mpu::InvalidArgument);
}

TEST_CASE("A failed snapshot write leaves the earlier snapshots untouched", "[trainer][snapshot]") {
  TempDir dir("failed_write");
  auto names_in = [](const std::string& d) {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(d))
      names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  };

  SECTION("the state cannot be serialised") {
    // Saves fine until iteration 4, then fails in the middle of Trainer::save.
    struct FailingState : mpu::Extension {
      std::int64_t fail_at;
      const mpu::Updater* updater = nullptr;
      explicit FailingState(std::int64_t f) : fail_at(f) {}
      std::string name() const override { return "failing"; }
      void initialize(mpu::Trainer& t) override { updater = &t.updater(); }
      void operator()(mpu::Trainer&) override {}
      void save(torch::serialize::OutputArchive& archive) const override {
        if (updater->iteration() == fail_at) throw std::runtime_error("state error (simulated)");
        archive.write("x", torch::ones({1}));
      }
    };
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(6), dir.str());
    trainer.extend(FailingState(4));
    trainer.extend(mpu::Snapshot("snap_{iteration}", 0), mpu::every_iterations(2));
    CHECK_THROWS_WITH(trainer.run(), "state error (simulated)");
    CHECK(names_in(dir.str()) == std::vector<std::string>{"snap_2"});

    ToyUpdater again;
    mpu::Trainer resumed(again, mpu::stop_after_iterations(6), dir.str());
    resumed.extend(FailingState(-1));
    resumed.resume((dir / "snap_2").string());
    CHECK(again.iteration() == 2);
  }
  SECTION("the disk refuses the bytes (a file size limit): the temporary file is removed") {
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(6), dir.str());
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
    auto saved_handler = std::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG
    std::string first_bytes;
    // After the first snapshot, allow only a fraction of its size.
    trainer.extend(mpu::make_extension(
        "limit",
        [&](mpu::Trainer&) {
          first_bytes = read_file(dir / "snap_2");
          rlimit lim = saved;
          lim.rlim_cur = first_bytes.size() / 3;
          REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
        },
        [](const mpu::Trainer& t) { return t.updater().iteration() == 3; }));
    trainer.extend(mpu::Snapshot("snap_{iteration}", 0), mpu::every_iterations(2));
    const std::string msg = message_of([&] { trainer.run(); });
    ::setrlimit(RLIMIT_FSIZE, &saved);
    std::signal(SIGXFSZ, saved_handler);
    CHECK_THAT(msg, Catch::Contains("Trainer::save_snapshot: writing '") &&
                        Catch::Contains(".snap_4.tmp-") && Catch::Contains("File too large"));
    CHECK(names_in(dir.str()) == std::vector<std::string>{"snap_2"});
    CHECK(read_file(dir / "snap_2") == first_bytes);
    CHECK(updater.iteration() == 4);
  }
}

TEST_CASE("A corrupt snapshot gives a clear error and the previous snapshot still loads",
          "[trainer][snapshot]") {
  TempDir dir("corrupt");
  {
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
    trainer.extend(mpu::LogReport(mpu::every_iterations(5)));
    trainer.extend(mpu::Snapshot(), mpu::every_iterations(5));
    trainer.run();
  }
  const auto good = dir / "snapshot_iter_5";
  const auto bad = dir / "snapshot_iter_10";
  const std::string good_bytes = read_file(good);
  const auto full_size = fs::file_size(bad);
  fs::resize_file(bad, full_size / 2);

  ToyUpdater updater;
  mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
  trainer.extend(mpu::LogReport(mpu::every_iterations(5)));
  trainer.extend(mpu::Snapshot(), mpu::every_iterations(5));
  REQUIRE(mpu::find_latest_snapshot(dir.str()) == bad.string());
  CHECK_THROWS_AS(trainer.resume(bad.string()), mpu::InvalidArgument);
  const std::string msg = message_of([&] { trainer.resume(bad.string()); });
  CHECK_THAT(msg, Catch::Contains("snapshot '" + bad.string() + "'") &&
                      Catch::Contains(std::to_string(full_size / 2) + " bytes") &&
                      Catch::Contains("truncated or corrupt"));
  CHECK(updater.iteration() == 0);  // nothing was loaded

  // Not a file at all, and random bytes.
  CHECK_THROWS_WITH(trainer.resume((dir / "missing").string()),
                    Catch::Contains("cannot read snapshot"));
  {
    std::ofstream junk(dir / "junk", std::ios::binary);
    junk << "this is not a zip archive";
  }
  CHECK_THROWS_WITH(trainer.resume((dir / "junk").string()),
                    Catch::Contains("truncated or corrupt"));

  // The earlier snapshot is untouched and loads.
  CHECK(read_file(good) == good_bytes);
  CHECK(fs::file_size(bad) == full_size / 2);
  trainer.resume(good.string());
  CHECK(updater.iteration() == 5);
  trainer.run();
  CHECK(updater.iteration() == 10);
}

TEST_CASE("A snapshot of another model is rejected, naming what does not fit",
          "[trainer][snapshot]") {
  TempDir dir("other_model");
  {
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(2), dir.str());
    trainer.extend(mpu::make_extension("needs_state", [](mpu::Trainer&) {}));  // saves nothing
    trainer.extend(mpu::Snapshot(), mpu::every_iterations(2));
    trainer.run();
  }
  const auto path = (dir / "snapshot_iter_2").string();

  SECTION("a parameter of another shape") {
    ToyOptions opt;
    opt.outputs = 2;
    {
      ToyUpdater updater(opt);
      mpu::Trainer trainer(updater, mpu::stop_after_iterations(4), dir.str());
      CHECK_THROWS_AS(trainer.resume(path), mpu::InvalidArgument);
    }
    ToyUpdater updater(opt);
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(4), dir.str());
    const std::string msg = message_of([&] { trainer.resume(path); });
    CHECK_THAT(msg, Catch::Contains("snapshot '" + path + "' does not fit this trainer") &&
                        Catch::Contains("parameter 'bias' is [2] Float, but the snapshot holds "
                                        "[1] Float; the snapshot is of a different model"));
  }
  SECTION("an extension the snapshot has no state for starts afresh; a missing key is named") {
    struct NeedsState : mpu::Extension {
      std::string name() const override { return "needs_state"; }
      void operator()(mpu::Trainer&) override {}
      void load(torch::serialize::InputArchive& archive) override {
        torch::Tensor t;
        archive.read("counter", t);
      }
    };
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(4), dir.str());
    trainer.extend(NeedsState());
    const std::string msg = message_of([&] { trainer.resume(path); });
    CHECK_THAT(msg, Catch::Contains("snapshot '" + path + "' does not fit this trainer") &&
                        Catch::Contains("counter"));
    ToyUpdater updater2;
    mpu::Trainer trainer2(updater2, mpu::stop_after_iterations(4), dir.str());
    trainer2.extend(mpu::LogReport());  // the snapshot has no LogReport state: it starts afresh
    CHECK_NOTHROW(trainer2.resume(path));
    CHECK(updater2.iteration() == 2);
  }
  SECTION("a torch archive that is not a snapshot") {
    torch::serialize::OutputArchive archive;
    archive.write("weight", torch::ones({1}));
    archive.save_to((dir / "plain.pt").string());
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(4), dir.str());
    CHECK_THROWS_WITH(trainer.resume((dir / "plain.pt").string()),
                      Catch::Contains("not a torch-mpu snapshot"));
  }
}

TEST_CASE("Evaluator averages over batches weighted by size, in eval mode without gradients",
          "[trainer][evaluator]") {
  TempDir dir("evaluator");
  ToyUpdater updater;
  const auto data = mpu_test::toy_dataset(10, 3);
  // Batches of 4, 4 and 2.
  std::vector<mpu::Batch> batches;
  for (std::int64_t b = 0; b < 10; b += 4) {
    const std::int64_t n = std::min<std::int64_t>(4, 10 - b);
    batches.push_back({data.data.narrow(0, b, n), data.target.narrow(0, b, n)});
  }
  std::vector<bool> training_seen;
  std::vector<bool> grad_seen;
  auto loss_fn = [&](const mpu::Batch& b) {
    training_seen.push_back(updater.model().is_training());
    grad_seen.push_back(torch::GradMode::is_enabled());
    return updater.loss(b);
  };
  auto evaluator = std::make_shared<mpu::Evaluator>(mpu::VectorBatchSource(batches), loss_fn);
  mpu::Trainer trainer(updater, mpu::stop_after_epochs(2), dir.str());
  trainer.extend(evaluator);
  auto log = std::make_shared<mpu::LogReport>();
  trainer.extend(log);

  // The expected means after each epoch, from the model as it is then.
  std::vector<double> expected_loss;
  trainer.extend(mpu::make_extension(
      "expect",
      [&](mpu::Trainer&) {
        torch::NoGradGuard no_grad;
        double sum = 0;
        for (const auto& b : batches) {
          const double n = static_cast<double>(b.data.size(0));
          sum += static_cast<double>(
                     torch::mse_loss(updater.linear()->forward(b.data), b.target).item<float>()) *
                 n;
        }
        expected_loss.push_back(sum / 10.0);
      },
      mpu::every_epochs(1), mpu::kPriorityWriter + 1));
  trainer.run();

  REQUIRE(log->log().size() == 2);
  for (std::size_t e = 0; e < 2; ++e) {
    const auto& values = log->log()[e].values;
    CHECK(values.at("validation/main/loss") == expected_loss[e]);
    CHECK(values.at("validation/main/batch_size") == (4.0 * 4 + 4.0 * 4 + 2.0 * 2) / 10.0);
    CHECK(values.count("main/loss") == 1);
  }
  REQUIRE(training_seen.size() == 2 * batches.size());
  CHECK(std::none_of(training_seen.begin(), training_seen.end(), [](bool b) { return b; }));
  CHECK(std::none_of(grad_seen.begin(), grad_seen.end(), [](bool b) { return b; }));
  CHECK(updater.model().is_training());
  CHECK(torch::GradMode::is_enabled());
  CHECK(evaluator->evaluate(updater).at("validation/main/loss") > 0);
}

TEST_CASE("Evaluator under a multi-rank updater gives every rank the global mean",
          "[trainer][evaluator]") {
  // Two ranks played by threads (the reporter is per thread); allreduce_sum sums through a
  // shared slot. Rank 0 evaluates 4 + 4 samples, rank 1 evaluates 2.
  struct Exchange {
    std::mutex m;
    std::condition_variable cv;
    std::vector<torch::Tensor> slots{2};
    int arrived = 0;
    int generation = 0;
    torch::Tensor result;
    void allreduce(int rank, torch::Tensor& t) {
      std::unique_lock<std::mutex> lock(m);
      slots[static_cast<std::size_t>(rank)] = t.clone();
      const int gen = generation;
      if (++arrived == 2) {
        result = slots[0] + slots[1];
        arrived = 0;
        ++generation;
        cv.notify_all();
      } else {
        cv.wait(lock, [&] { return generation != gen; });
      }
      t.copy_(result);
    }
  } exchange;

  const auto data = mpu_test::toy_dataset(10, 3);
  auto batch = [&](std::int64_t begin, std::int64_t n) {
    return mpu::Batch{data.data.narrow(0, begin, n), data.target.narrow(0, begin, n)};
  };
  const std::vector<std::vector<mpu::Batch>> shards = {{batch(0, 4), batch(4, 4)}, {batch(8, 2)}};
  TempDir dir("evaluator_ranks");
  std::vector<std::map<std::string, double>> results(2);
  std::vector<double> expected(2);
  std::vector<bool> log_written(2);
  std::vector<std::string> errors(2);

  auto rank_main = [&](int rank) {
    try {
      ToyOptions opt;
      opt.rank = rank;
      opt.world_size = 2;
      opt.allreduce = [&exchange, rank](torch::Tensor& t) { exchange.allreduce(rank, t); };
      ToyUpdater updater(opt);
      const auto out = (dir / ("rank" + std::to_string(rank))).string();
      mpu::Trainer trainer(updater, mpu::stop_after_iterations(3), out);
      trainer.extend(mpu::Evaluator(mpu::VectorBatchSource(shards[static_cast<std::size_t>(rank)]),
                                    [&updater](const mpu::Batch& b) { return updater.loss(b); }),
                     mpu::every_iterations(3));
      trainer.extend(mpu::LogReport(mpu::every_iterations(3)));
      trainer.extend(mpu::make_extension(
          "capture",
          [&, rank](mpu::Trainer& t) {
            for (const auto& [k, v] : t.observation()) {
              if (k.rfind("validation/", 0) == 0)
                results[static_cast<std::size_t>(rank)][k] = v.item<double>();
            }
            // Both ranks hold the same model (same start, same data): the global mean over all
            // 10 samples in closed form.
            torch::NoGradGuard no_grad;
            double sum = 0;
            for (const auto& shard : shards) {
              for (const auto& b : shard) {
                sum +=
                    static_cast<double>(torch::mse_loss(updater.linear()->forward(b.data), b.target)
                                            .item<float>()) *
                    static_cast<double>(b.data.size(0));
              }
            }
            expected[static_cast<std::size_t>(rank)] = sum / 10.0;
          },
          mpu::every_iterations(3), mpu::kPriorityReader, /*all_ranks=*/true));
      trainer.run();
      log_written[static_cast<std::size_t>(rank)] = fs::exists(fs::path(out) / "log");
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
  };
  std::thread r1(rank_main, 1);
  rank_main(0);
  r1.join();
  CHECK((errors == std::vector<std::string>{"", ""}));
  for (int rank = 0; rank < 2; ++rank) {
    const auto& r = results[static_cast<std::size_t>(rank)];
    REQUIRE(r.count("validation/main/loss") == 1);
    CHECK(r.at("validation/main/loss") == expected[static_cast<std::size_t>(rank)]);
    CHECK(r.at("validation/main/batch_size") == (4.0 * 4 + 4.0 * 4 + 2.0 * 2) / 10.0);
  }
  CHECK(results[0] == results[1]);
  CHECK((log_written == std::vector<bool>{true, false}));  // LogReport: rank 0 only
}

TEST_CASE("Evaluator under a multi-rank updater fails clearly when ranks report different keys",
          "[trainer][evaluator]") {
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;
  torch::Tensor total;
  std::vector<torch::Tensor> parts(2);
  auto allreduce = [&](int rank, torch::Tensor& t) {
    std::unique_lock<std::mutex> lock(m);
    parts[static_cast<std::size_t>(rank)] = t.clone();
    if (++arrived == 2) {
      total = parts[0] + parts[1];
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return arrived == 2; });
    }
    t.copy_(total);
  };
  const auto data = mpu_test::toy_dataset(4, 3);
  std::vector<std::string> errors(2);
  auto rank_main = [&](int rank) {
    ToyOptions opt;
    opt.rank = rank;
    opt.world_size = 2;
    opt.allreduce = [&allreduce, rank](torch::Tensor& t) { allreduce(rank, t); };
    ToyUpdater updater(opt);
    mpu::Evaluator evaluator(mpu::VectorBatchSource({mpu::Batch{data.data, data.target}}),
                             [rank](const mpu::Batch&) {
                               mpu::report(rank == 0 ? "loss" : "other", 1.0);
                               return torch::zeros({});
                             });
    errors[static_cast<std::size_t>(rank)] = message_of([&] { evaluator.evaluate(updater); });
  };
  std::thread r1(rank_main, 1);
  rank_main(0);
  r1.join();
  CHECK_THAT(
      errors[0],
      Catch::Contains("ranks reported different keys (rank 0 reported validation/main/loss)"));
  CHECK_THAT(errors[1], Catch::Contains("(rank 1 reported validation/main/other)"));

  // An updater with ranks and a communicator that cannot aggregate says so.
  struct NoAllreduce : ToyUpdater {
    using ToyUpdater::ToyUpdater;
    // Any non-null pointer will do: the Communicator is only compared with nullptr.
    mpu::Communicator* communicator() override {
      return reinterpret_cast<mpu::Communicator*>(this);
    }
  };
  ToyOptions opt;
  opt.world_size = 2;
  NoAllreduce updater(opt);
  mpu::Evaluator evaluator(mpu::VectorBatchSource({mpu::Batch{data.data, data.target}}),
                           [&updater](const mpu::Batch& b) { return updater.loss(b); });
  CHECK_THROWS_WITH(evaluator.evaluate(updater),
                    Catch::Contains("does not override allreduce_sum"));
}

TEST_CASE("PrintReport prints the chosen columns of each new log row", "[trainer]") {
  TempDir dir("print");
  ToyUpdater updater;
  std::ostringstream out;
  mpu::Trainer trainer(updater, mpu::stop_after_epochs(3), dir.str());
  auto log = std::make_shared<mpu::LogReport>();
  const std::vector<std::string> columns = {"epoch", "iteration", "main/loss", "not/reported",
                                            "elapsed_time"};
  // Added before the LogReport on purpose: LogReport's priority makes the row visible anyway.
  trainer.extend(mpu::PrintReport(columns, "LogReport", &out));
  trainer.extend(log);
  trainer.run();

  // The expected text, built with iostreams (default float format: %g).
  std::ostringstream expected;
  for (std::size_t i = 0; i < columns.size(); ++i) {
    expected << std::left
             << std::setw(static_cast<int>(std::max<std::size_t>(10, columns[i].size())))
             << columns[i] << (i + 1 < columns.size() ? "  " : "\n");
  }
  for (const auto& row : log->log()) {
    for (const auto& c : columns) {
      const int w = static_cast<int>(std::max<std::size_t>(10, c.size()));
      expected << std::left << std::setw(w);
      if (c == "epoch") {
        expected << row.epoch;
      } else if (c == "iteration") {
        expected << row.iteration;
      } else if (c == "elapsed_time") {
        expected << row.elapsed_time;
      } else if (row.values.count(c)) {
        expected << row.values.at(c);
      } else {
        expected << "";
      }
      expected << "  ";
    }
    expected << "\n";
  }
  REQUIRE(log->log().size() == 3);
  CHECK(out.str() == expected.str());

  mpu::Trainer without_log(updater, mpu::stop_after_epochs(4), dir.str());
  without_log.extend(mpu::PrintReport({"epoch"}, "LogReport", &out));
  CHECK_THROWS_WITH(without_log.run(), Catch::Contains("no LogReport named 'LogReport'"));
}

TEST_CASE("ProgressBar prints periodic lines, or a bar redrawn in place on a terminal",
          "[trainer]") {
  TempDir dir("progress");
  SECTION("not a terminal: one line per update_interval iterations, and one at the end") {
    ToyUpdater updater;
    std::ostringstream out;
    mpu::Trainer trainer(updater, mpu::stop_after_iterations(10), dir.str());
    trainer.extend(mpu::ProgressBar(4).output(out, false));
    trainer.run();
    std::vector<std::string> lines;
    std::istringstream in(out.str());
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    REQUIRE(lines.size() == 3);  // iterations 4 and 8, and the end
    CHECK_THAT(lines[0], Catch::Contains(" 40.00%  iteration 4/10  epoch 1.33  ") &&
                             Catch::Contains(" iters/sec  ETA "));
    CHECK_THAT(lines[1], Catch::Contains(" 80.00%  iteration 8/10  epoch 2.67  "));
    CHECK_THAT(lines[2], Catch::Contains("100.00%  iteration 10/10  epoch 3.33  "));
    CHECK(out.str().find('\r') == std::string::npos);
  }
  SECTION("a terminal: a bar, carriage returns, and a final newline") {
    ToyUpdater updater;
    std::ostringstream out;
    mpu::Trainer trainer(updater, mpu::stop_after_epochs(2), dir.str());
    trainer.extend(mpu::ProgressBar(3, 10).output(out, true));
    trainer.run();
    const std::string s = out.str();
    CHECK_THAT(s, Catch::Contains("\r[#####.....]  50.00%  iteration 3  epoch 1.00/2  "));
    CHECK_THAT(s, Catch::Contains("\r[##########] 100.00%  iteration 6  epoch 2.00/2  "));
    std::size_t bars = 0;
    for (auto pos = s.find("\r["); pos != std::string::npos; pos = s.find("\r[", pos + 1)) ++bars;
    CHECK(bars == 2);  // iterations 3 and 6; the end was already shown
    CHECK(std::count(s.begin(), s.end(), '\n') == 1);
    CHECK(s.back() == '\n');
  }
}

TEST_CASE("PlotReport draws a PNG with gnuplot, and says so in one line when gnuplot is missing",
          "[trainer][plot]") {
  TempDir dir("plot");
  auto run_with_plot = [&](const std::string& out) {
    ToyUpdater updater;
    mpu::Trainer trainer(updater, mpu::stop_after_epochs(3), out);
    auto plot =
        std::make_shared<mpu::PlotReport>(std::vector<std::string>{"main/loss", "main/batch_size"});
    trainer.extend(plot);
    trainer.run();
    return plot;
  };
  const auto data_rows = [](const fs::path& path) {
    std::vector<std::string> rows;
    std::istringstream in(read_file(path));
    for (std::string line; std::getline(in, line);) rows.push_back(line);
    return rows;
  };

  if (mpu::PlotReport::gnuplot_available()) {
    const auto out = dir / "with";
    auto plot = run_with_plot(out.string());
    CHECK(plot->drawn());
    const std::string png = read_file(out / "plot.png");
    REQUIRE(png.size() > 8);
    CHECK(png.substr(1, 3) == "PNG");
    CHECK(data_rows(out / "plot.dat").size() == 4);  // header + 3 epochs
    CHECK(fs::exists(out / "plot.gp"));
  } else {
    WARN("gnuplot is not installed: the drawing half of this test is skipped");
  }

  // No gnuplot on PATH: a one-line notice on stderr, the data still written, no PNG.
  const std::string saved_path = std::getenv("PATH") ? std::getenv("PATH") : "";
  ::setenv("PATH", (dir / "empty_bin").string().c_str(), 1);
  const auto stderr_file = dir / "stderr.txt";
  fs::create_directories(dir.str());
  std::fflush(stderr);
  const int saved_stderr = ::dup(STDERR_FILENO);
  std::FILE* capture = std::fopen(stderr_file.c_str(), "w");
  ::dup2(::fileno(capture), STDERR_FILENO);
  std::shared_ptr<mpu::PlotReport> plot;
  const auto out = dir / "without";
  std::string error;
  try {
    plot = run_with_plot(out.string());
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::fflush(stderr);
  ::dup2(saved_stderr, STDERR_FILENO);
  ::close(saved_stderr);
  std::fclose(capture);
  ::setenv("PATH", saved_path.c_str(), 1);

  CHECK(error.empty());
  REQUIRE(plot != nullptr);
  CHECK_FALSE(plot->drawn());
  CHECK_FALSE(fs::exists(out / "plot.png"));
  CHECK(data_rows(out / "plot.dat").size() == 4);
  const auto notice = data_rows(stderr_file);
  REQUIRE(notice.size() == 1);
  CHECK_THAT(notice[0], Catch::Contains("PlotReport: gnuplot is not on PATH") &&
                            Catch::Contains((out / "plot.png").string()));
}
