// Logging to stderr, prefixed "[mpu <level> rank?]", filtered by MPU_LOG_LEVEL.
#pragma once

#include <string>

#include "mpu/error.h"

namespace mpu::detail {

enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

/// The level from MPU_LOG_LEVEL, read once; kInfo when unset or unrecognised.
LogLevel log_level();

/// Writes one line to stderr when `level` is enabled. Thread-safe; never throws.
void log_line(LogLevel level, const std::string& message) noexcept;

template <typename... Args>
void log(LogLevel level, const Args&... args) {
  if (level <= log_level()) log_line(level, cat(args...));
}

}  // namespace mpu::detail

#define MPU_LOG_WARN(...) ::mpu::detail::log(::mpu::detail::LogLevel::kWarn, __VA_ARGS__)
#define MPU_LOG_INFO(...) ::mpu::detail::log(::mpu::detail::LogLevel::kInfo, __VA_ARGS__)
#define MPU_LOG_DEBUG(...) ::mpu::detail::log(::mpu::detail::LogLevel::kDebug, __VA_ARGS__)
#define MPU_LOG_ERROR(...) ::mpu::detail::log(::mpu::detail::LogLevel::kError, __VA_ARGS__)
