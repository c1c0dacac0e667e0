// Multi-rank tests: fork N ranks, run a lambda in each, and fail the Catch2 test with every
// failing rank's message.
//
// Inside a rank, Catch2's macros must not be used (the rank is a forked copy of the test process
// and leaves with _exit). Use MPU_EXPECT / MPU_EXPECT_EQ / MPU_EXPECT_THROWS instead: they record
// the failure text and go on; the rank then exits non-zero and its messages reach the parent.
//
//   mpu::test::run_ranks(3, [](const mpu::SpawnContext& ctx) {
//     auto comm = ctx.make_communicator();
//     auto t = torch::full({5}, ctx.rank + 1.0);
//     comm->allreduce(t);
//     MPU_EXPECT(t.eq(6).all().item<bool>(), "rank ", ctx.rank, " got ", t);
//   });
//
// Ranks run through mpu::spawn on CPU devices by default, with one intra-op thread each, a
// TCPStore served by the parent on a free port (so parallel ctest runs do not collide), and a
// time limit after which every rank is stopped and the test fails.
#pragma once

#include "catch_torch.h"

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "mpu/error.h"
#include "mpu/launch.h"

namespace mpu::test {

/// Failures recorded by MPU_EXPECT in this rank.
inline std::vector<std::string>& rank_failures() {
  static std::vector<std::string> failures;
  return failures;
}

template <typename... Args>
void record_failure(const char* file, int line, const char* what, const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": " << what;
  if constexpr (sizeof...(Args) > 0) {
    os << " -- ";
    (void)(os << ... << args);
  }
  rank_failures().push_back(os.str());
}

/// The first element where `a` and `b` differ, as text, or "" when equal in shape and value.
inline std::string first_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  if (actual.sizes() != expected.sizes()) {
    std::ostringstream os;
    os << "sizes " << actual.sizes() << " vs expected " << expected.sizes();
    return os.str();
  }
  if (actual.scalar_type() != expected.scalar_type()) {
    return std::string("dtype ") + c10::toString(actual.scalar_type()) + " vs expected " +
           c10::toString(expected.scalar_type());
  }
  const torch::Tensor a = actual.to(torch::kCPU).to(torch::kDouble).reshape({-1});
  const torch::Tensor b = expected.to(torch::kCPU).to(torch::kDouble).reshape({-1});
  const torch::Tensor diff = a.ne(b).nonzero();
  if (diff.numel() == 0) return "";
  const std::int64_t i = diff[0].item<std::int64_t>();
  std::ostringstream os;
  os << diff.size(0) << " of " << a.numel() << " elements differ; first at flat index " << i << ": "
     << a[i].item<double>() << " vs expected " << b[i].item<double>();
  return os.str();
}

struct RunOptions {
  /// One device per rank; empty: n CPU ranks.
  std::vector<torch::Device> devices;
  /// Every rank is stopped, and the test fails, after this long.
  std::chrono::milliseconds time_limit{120000};
  /// The collective timeout handed to the ranks.
  std::chrono::milliseconds timeout{60000};
};

/// Forks `n` ranks running `fn` and fails the current test (REQUIRE, with the failing ranks'
/// messages) unless every rank finishes cleanly.
inline void run_ranks(int n, const std::function<void(const SpawnContext&)>& fn,
                      RunOptions options = {}) {
  SpawnOptions spawn_options;
  spawn_options.devices = options.devices.empty()
                              ? std::vector<torch::Device>(static_cast<std::size_t>(n), torch::kCPU)
                              : options.devices;
  spawn_options.threads_per_rank = 1;
  spawn_options.time_limit = options.time_limit;
  spawn_options.timeout = options.timeout;
  spawn_options.grace = std::chrono::milliseconds(500);
  std::string failure;
  try {
    spawn(
        n,
        [&](const SpawnContext& context) {
          rank_failures().clear();
          fn(context);
          if (rank_failures().empty()) return;
          std::string text = std::to_string(rank_failures().size()) + " expectation(s) failed:";
          for (const std::string& f : rank_failures()) text += "\n    " + f;
          throw Error(text);
        },
        spawn_options);
  } catch (const Error& e) {
    failure = e.what();
  }
  INFO(failure);
  REQUIRE(failure.empty());
}

/// Runs `fn` in a forked child and returns the tensors it returned; fails the current test with
/// the child's error otherwise. On CUDA builds of LibTorch, a process that has run backward()
/// cannot fork processes that run backward() again ("Autograd-and-Fork"), so a test that forks
/// several times (a MultiprocessParallelUpdater, then a reference run) does each in its own
/// child, and the test process itself never runs autograd.
inline std::vector<torch::Tensor> run_isolated(
    const std::function<std::vector<torch::Tensor>()>& fn) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("mpu_isolated_" + std::to_string(::getpid()) + "_" +
                     std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  const auto error_path = path.string() + ".error";
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 0;
    try {
      torch::save(fn(), path.string());
    } catch (const std::exception& e) {
      std::FILE* f = std::fopen(error_path.c_str(), "w");
      if (f != nullptr) {
        std::fputs(e.what(), f);
        std::fclose(f);
      }
      code = 1;
    }
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::string error;
  if (std::FILE* f = std::fopen(error_path.c_str(), "r")) {
    char buf[4096];
    std::size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) error.append(buf, n);
    std::fclose(f);
    std::remove(error_path.c_str());
  }
  INFO("isolated child: wait status " << status << (error.empty() ? "" : ": ") << error);
  REQUIRE((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  std::vector<torch::Tensor> out;
  torch::load(out, path.string());
  std::remove(path.c_str());
  return out;
}

}  // namespace mpu::test

/// Records a failure when `cond` is false; the remaining arguments are streamed into the message.
#define MPU_EXPECT(cond, ...)                                                           \
  do {                                                                                  \
    if (!(cond)) ::mpu::test::record_failure(__FILE__, __LINE__, #cond, ##__VA_ARGS__); \
  } while (0)

/// Records a failure unless tensors `actual` and `expected` are equal in shape, dtype and value.
#define MPU_EXPECT_EQUAL(actual, expected, ...)                                            \
  do {                                                                                     \
    const std::string mpu_diff_ = ::mpu::test::first_difference((actual), (expected));     \
    if (!mpu_diff_.empty()) {                                                              \
      ::mpu::test::record_failure(__FILE__, __LINE__, #actual " == " #expected, mpu_diff_, \
                                  ##__VA_ARGS__);                                          \
    }                                                                                      \
  } while (0)

/// Records a failure unless `expr` throws `E` whose message contains `substring`.
#define MPU_EXPECT_THROWS(expr, E, substring)                                                \
  do {                                                                                       \
    std::string mpu_got_ = "nothing was thrown";                                             \
    try {                                                                                    \
      (void)(expr);                                                                          \
    } catch (const E& mpu_e_) {                                                              \
      const std::string mpu_what_ = mpu_e_.what();                                           \
      mpu_got_ = mpu_what_.find(substring) != std::string::npos                              \
                     ? std::string()                                                         \
                     : "the message lacks \"" + std::string(substring) + "\": " + mpu_what_; \
    } catch (const std::exception& mpu_e_) {                                                 \
      mpu_got_ = std::string("another exception: ") + mpu_e_.what();                         \
    }                                                                                        \
    if (!mpu_got_.empty()) {                                                                 \
      ::mpu::test::record_failure(__FILE__, __LINE__, #expr " throws " #E, mpu_got_);        \
    }                                                                                        \
  } while (0)
