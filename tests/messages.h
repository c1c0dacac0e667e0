// The text of the exception a call throws, for tests of error messages.
#pragma once

#include <exception>
#include <functional>
#include <string>

namespace mpu::test {

/// Runs `fn` and returns what() of the std::exception it throws, or "" when it throws nothing.
inline std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace mpu::test
