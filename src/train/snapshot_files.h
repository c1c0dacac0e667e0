// Snapshot file names: formatting a pattern, and finding the files a pattern produced.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mpu::detail {

struct SnapshotFile {
  std::string path;
  std::int64_t iteration = -1;  // -1 when the pattern has no "{iteration}"
  std::int64_t epoch = -1;      // -1 when the pattern has no "{epoch}"
};

/// Throws mpu::InvalidArgument when `pattern` is empty or names a directory.
void check_snapshot_pattern(const std::string& what, const std::string& pattern);

/// The files in `dir` whose names `pattern` could have produced, oldest first: by iteration when
/// the pattern has "{iteration}", else by epoch, else by modification time. Empty when `dir`
/// does not exist.
std::vector<SnapshotFile> list_snapshots(const std::string& dir, const std::string& pattern);

}  // namespace mpu::detail
