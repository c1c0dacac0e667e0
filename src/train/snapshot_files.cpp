#include "train/snapshot_files.h"

#include <algorithm>
#include <filesystem>
#include <regex>
#include <system_error>
#include <utility>

#include "mpu/error.h"
#include "mpu/trainer.h"

namespace mpu {
namespace detail {
namespace {

constexpr const char* kIterationField = "{iteration}";
constexpr const char* kEpochField = "{epoch}";

bool starts_with(const std::string& s, std::size_t pos, const char* prefix) {
  return s.compare(pos, std::char_traits<char>::length(prefix), prefix) == 0;
}

}  // namespace

void check_snapshot_pattern(const std::string& what, const std::string& pattern) {
  MPU_CHECK(!pattern.empty(), what, ": the snapshot file name pattern is empty");
  MPU_CHECK(pattern.find('/') == std::string::npos, what, ": the snapshot file name pattern '",
            pattern, "' contains '/'; it names a file in the trainer's output directory");
  MPU_CHECK(pattern[0] != '.', what, ": the snapshot file name pattern '", pattern,
            "' starts with '.', which is reserved for temporary files");
}

std::vector<SnapshotFile> list_snapshots(const std::string& dir, const std::string& pattern) {
  check_snapshot_pattern("list_snapshots", pattern);
  // The pattern as a regex: literal text escaped, each field a captured number.
  std::string re;
  std::vector<bool> field_is_iteration;
  for (std::size_t i = 0; i < pattern.size();) {
    if (starts_with(pattern, i, kIterationField)) {
      re += "([0-9]+)";
      field_is_iteration.push_back(true);
      i += std::char_traits<char>::length(kIterationField);
    } else if (starts_with(pattern, i, kEpochField)) {
      re += "([0-9]+)";
      field_is_iteration.push_back(false);
      i += std::char_traits<char>::length(kEpochField);
    } else {
      if (std::string(".^$|()[]{}*+?\\").find(pattern[i]) != std::string::npos) re += '\\';
      re += pattern[i++];
    }
  }
  const std::regex name_re(re);
  const bool has_iteration = std::find(field_is_iteration.begin(), field_is_iteration.end(),
                                       true) != field_is_iteration.end();
  const bool has_epoch = std::find(field_is_iteration.begin(), field_is_iteration.end(), false) !=
                         field_is_iteration.end();

  struct Found {
    SnapshotFile file;
    std::filesystem::file_time_type mtime;
  };
  std::vector<Found> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file(ec)) continue;
    const std::string name = entry.path().filename().string();
    std::smatch m;
    if (!std::regex_match(name, m, name_re)) continue;
    Found f;
    f.file.path = entry.path().string();
    for (std::size_t k = 0; k < field_is_iteration.size(); ++k) {
      const std::int64_t value = std::stoll(m[k + 1].str());
      (field_is_iteration[k] ? f.file.iteration : f.file.epoch) = value;
    }
    f.mtime = entry.last_write_time(ec);
    found.push_back(std::move(f));
  }
  std::sort(found.begin(), found.end(), [&](const Found& a, const Found& b) {
    if (has_iteration && a.file.iteration != b.file.iteration)
      return a.file.iteration < b.file.iteration;
    if (has_epoch && a.file.epoch != b.file.epoch) return a.file.epoch < b.file.epoch;
    if (a.mtime != b.mtime) return a.mtime < b.mtime;
    return a.file.path < b.file.path;
  });
  std::vector<SnapshotFile> files;
  files.reserve(found.size());
  for (auto& f : found) files.push_back(std::move(f.file));
  return files;
}

}  // namespace detail

std::string format_snapshot_name(const std::string& pattern, std::int64_t iteration,
                                 std::int64_t epoch) {
  std::string out;
  for (std::size_t i = 0; i < pattern.size();) {
    if (detail::starts_with(pattern, i, detail::kIterationField)) {
      out += std::to_string(iteration);
      i += std::char_traits<char>::length(detail::kIterationField);
    } else if (detail::starts_with(pattern, i, detail::kEpochField)) {
      out += std::to_string(epoch);
      i += std::char_traits<char>::length(detail::kEpochField);
    } else {
      out += pattern[i++];
    }
  }
  return out;
}

std::optional<std::string> find_latest_snapshot(const std::string& dir,
                                                const std::string& pattern) {
  auto files = detail::list_snapshots(dir, pattern);
  if (files.empty()) return std::nullopt;
  return files.back().path;
}

}  // namespace mpu
