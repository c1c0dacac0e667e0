#include "misc/log.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "mpu/defaults.h"

namespace mpu::detail {

LogLevel log_level() {
  static const LogLevel level = [] {
    const char* v = std::getenv(kEnvLogLevel);
    if (v == nullptr) return LogLevel::kInfo;
    if (std::strcmp(v, "error") == 0) return LogLevel::kError;
    if (std::strcmp(v, "warn") == 0) return LogLevel::kWarn;
    if (std::strcmp(v, "debug") == 0) return LogLevel::kDebug;
    return LogLevel::kInfo;
  }();
  return level;
}

void log_line(LogLevel level, const std::string& message) noexcept {
  static const char* const kNames[] = {"error", "warn", "info", "debug"};
  // One write() per line, so that lines from several processes do not interleave.
  std::string line = "[mpu ";
  line += kNames[static_cast<int>(level)];
  line += " pid ";
  line += std::to_string(::getpid());
  line += "] ";
  line += message;
  line += '\n';
  const ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

}  // namespace mpu::detail
