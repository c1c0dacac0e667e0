#include "misc/io.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace mpu::detail {

int write_all(int fd, const void* data, std::size_t size) noexcept {
  const char* p = static_cast<const char*>(data);
  bool socket = true;
  while (size > 0) {
    ssize_t n = socket ? ::send(fd, p, size, MSG_NOSIGNAL) : ::write(fd, p, size);
    if (n < 0 && socket && errno == ENOTSOCK) {
      socket = false;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EIO;  // a write of a non-zero size that wrote nothing: give up
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  return 0;
}

}  // namespace mpu::detail
