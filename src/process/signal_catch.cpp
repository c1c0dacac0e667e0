#include "process/signal_catch.h"

#include <signal.h>

#include <atomic>

namespace mpu::detail {
namespace {

constexpr int kSignals[] = {SIGINT, SIGTERM};
std::atomic<int> g_caught{0};
static_assert(std::atomic<int>::is_always_lock_free, "the handler needs a lock-free atomic");
struct sigaction g_previous[2];
bool g_installed[2] = {false, false};

extern "C" void on_signal(int signal) {
  g_caught.store(signal);
}

}  // namespace

SignalCatch::SignalCatch() {
  g_caught.store(0);
  for (int i = 0; i < 2; ++i) {
    g_installed[i] = false;
    struct sigaction current {};
    if (::sigaction(kSignals[i], nullptr, &current) != 0) continue;
    const bool has_handler = (current.sa_flags & SA_SIGINFO) != 0 ||
                             (current.sa_handler != SIG_DFL);  // includes SIG_IGN
    if (has_handler) continue;
    struct sigaction ours {};
    ours.sa_handler = on_signal;
    sigemptyset(&ours.sa_mask);
    ours.sa_flags = SA_RESTART | SA_RESETHAND;
    if (::sigaction(kSignals[i], &ours, &g_previous[i]) == 0) g_installed[i] = true;
  }
}

SignalCatch::~SignalCatch() {
  for (int i = 0; i < 2; ++i) {
    if (g_installed[i]) ::sigaction(kSignals[i], &g_previous[i], nullptr);
    g_installed[i] = false;
  }
}

int SignalCatch::caught() const {
  return g_caught.load();
}

}  // namespace mpu::detail
