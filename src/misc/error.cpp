#include "mpu/error.h"

namespace mpu::detail {

std::string where(const char* file, int line) {
  // The last project directory in the path wins, so a checkout under ~/src/ still shortens.
  const std::string path(file);
  std::size_t best = std::string::npos;
  for (const char* dir : {"/src/", "/include/", "/cuda/", "/tests/", "/examples/", "/bench/"}) {
    const std::size_t pos = path.rfind(dir);
    if (pos != std::string::npos && (best == std::string::npos || pos > best)) best = pos;
  }
  return cat("[", best == std::string::npos ? path : path.substr(best + 1), ":", line, "] ");
}

std::string library_error(const char* file, int line, const char* lib, const char* call,
                          const std::string& name, const std::string& text) {
  return cat(where(file, line), lib, " error ", name, " (", text, ") in `", call, "`");
}

}  // namespace mpu::detail
