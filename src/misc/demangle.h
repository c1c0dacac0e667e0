// Readable C++ type names for messages.
#pragma once

#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <typeinfo>

namespace mpu::detail {

/// The demangled name of a mangled type name (`typeid(x).name()`); the mangled name itself
/// where the ABI cannot demangle it.
inline std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                           std::free);
  return status == 0 && d ? std::string(d.get()) : std::string(mangled);
}

/// The demangled name of `t`.
inline std::string demangle(const std::type_info& t) {
  return demangle(t.name());
}

}  // namespace mpu::detail
