// Reading environment variables: one parser per kind of value, so that every variable of that
// kind is read, and refused, the same way.
#pragma once

#include <chrono>
#include <optional>
#include <string>

namespace mpu::detail {

/// The value of `name`, or nullopt when it is unset or empty (an empty value means "not set",
/// as `VAR= cmd` is the shell's way to clear one).
std::optional<std::string> env_text(const char* name);

/// `name` as a positive, finite number of seconds ("30", "2.5"), rounded up to whole
/// milliseconds (so at least 1 ms: a tiny value still means a deadline); nullopt when unset or
/// empty. Throws InvalidArgument naming the variable and its value otherwise.
std::optional<std::chrono::milliseconds> env_seconds(const char* name);

}  // namespace mpu::detail
