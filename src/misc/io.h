// Raw file-descriptor I/O shared by the atomic file writer, spawn()'s message pipes and the
// worker channel.
#pragma once

#include <cstddef>

namespace mpu::detail {

/// Writes all `size` bytes of `data` to `fd`, retrying on EINTR and short writes. On a socket
/// it sends with MSG_NOSIGNAL, so that a vanished peer is an error (EPIPE) rather than a
/// SIGPIPE death. Returns 0, or the errno of the write that failed; callers name what they
/// were writing. noexcept, so that a forked child can use it on its way out.
int write_all(int fd, const void* data, std::size_t size) noexcept;

}  // namespace mpu::detail
