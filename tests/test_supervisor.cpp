// The process supervisor (src/process/supervisor.h): how a child ended, in words, and stopping
// children that ignore SIGTERM.
#include "catch_torch.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "process/supervisor.h"

using Catch::Matchers::Contains;
using mpu::detail::Supervisor;

TEST_CASE("Supervisor: exit codes and signals are described in one way", "[supervisor]") {
  Supervisor children;
  const auto exits = children.fork("exit 3", [] { return 3; });
  const auto killed = children.fork("killed", []() -> int {
    ::signal(SIGKILL, SIG_DFL);
    ::raise(SIGKILL);
    return 0;
  });
  REQUIRE(children.reap(exits, std::chrono::seconds(10)));
  REQUIRE(children.reap(killed, std::chrono::seconds(10)));
  CHECK(mpu::detail::describe_wait_status(children.status(exits)) == "exited with status 3");
  CHECK_THAT(mpu::detail::describe_wait_status(children.status(killed)),
             Contains("was killed by signal 9 ("));
  CHECK(mpu::detail::describe_wait_status(children.status(exits), [](int code) {
          return code == 3 ? " (three)" : "";
        }) == "exited with status 3 (three)");
}

TEST_CASE("Supervisor: stop() kills a child that ignores SIGTERM after the grace, and reaps it",
          "[supervisor]") {
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  Supervisor children;
  const auto stubborn = children.fork("stubborn", [&]() -> int {
    ::signal(SIGTERM, SIG_IGN);
    (void)!::write(ready[1], "x", 1);
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  });
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);  // SIGTERM is ignored from here on
  ::close(ready[0]);
  ::close(ready[1]);
  const pid_t pid = children.pid(stubborn);
  const auto start = std::chrono::steady_clock::now();
  children.stop(std::chrono::milliseconds(300));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  REQUIRE(children.reaped(stubborn));
  CHECK(WIFSIGNALED(children.status(stubborn)));
  CHECK(WTERMSIG(children.status(stubborn)) == SIGKILL);
  CHECK(::kill(pid, 0) == -1);  // reaped: not even a zombie
}

// A child leaves through _exit, which flushes nothing; the supervisor flushes first.
TEST_CASE("Supervisor: a child's buffered output is flushed when it exits", "[supervisor]") {
  const std::string path = "/tmp/mpu_supervisor_" + std::to_string(::getpid()) + ".txt";
  {
    Supervisor children;
    const auto child = children.fork("printer", [&]() -> int {
      if (std::freopen(path.c_str(), "w", stdout) == nullptr) return 1;
      std::printf("no newline, no flush");
      return 0;
    });
    REQUIRE(children.reap(child, std::chrono::seconds(10)));
    CHECK(children.status(child) == 0);
  }
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str() == "no newline, no flush");
  std::remove(path.c_str());
}
