#include "misc/env.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "mpu/error.h"

namespace mpu::detail {

namespace {
// About 31 million years: beyond it the milliseconds would overflow std::int64_t.
constexpr double kMaxSeconds = 1e15;
}  // namespace

std::optional<std::string> env_text(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

std::optional<std::chrono::milliseconds> env_seconds(const char* name) {
  const std::optional<std::string> text = env_text(name);
  if (!text) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(text->c_str(), &end);
  MPU_CHECK(errno == 0 && end != text->c_str() && *end == '\0' && std::isfinite(seconds) &&
                seconds > 0 && seconds < kMaxSeconds,
            name, "=\"", *text, "\" is not a positive number of seconds");
  return std::chrono::milliseconds(
      std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(seconds * 1000.0))));
}

}  // namespace mpu::detail
