// Removes a directory tree with nftw(3). The tests use it instead of
// std::filesystem::remove_all, which crashed intermittently (SIGSEGV) on the GPU machine's
// toolchain (g++ 13 headers against the system's newer libstdc++), 2026-11-27.
#pragma once

#include <ftw.h>

#include <cstdio>
#include <string>

namespace mpu::test {

inline void remove_tree(const std::string& path) noexcept {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) {
        return std::remove(p) == 0 ? 0 : 0;
      },
      16, FTW_DEPTH | FTW_PHYS);
}

}  // namespace mpu::test
