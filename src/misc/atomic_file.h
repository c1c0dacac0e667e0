// Files that appear whole or not at all: snapshots, the log, plot data.
#pragma once

#include <cstddef>
#include <functional>
#include <string>

namespace mpu::detail {

/// Appends bytes to the file being written; throws mpu::Error on a write error.
using ByteWriter = std::function<void(const void* data, std::size_t size)>;

/// Writes `path` atomically: `fill` writes the content through the ByteWriter it is given into a
/// temporary file in the same directory (".<name>.tmp-XXXXXX"), which is fsync'ed and renamed
/// over `path`; the directory is fsync'ed too. When `fill` or any step throws, the temporary
/// file is removed and `path` is left as it was. `what` names the caller in error messages.
void write_file_atomically(const std::string& path, const std::string& what,
                           const std::function<void(const ByteWriter&)>& fill);

/// The same, for a string.
void write_file_atomically(const std::string& path, const std::string& what,
                           const std::string& content);

}  // namespace mpu::detail
