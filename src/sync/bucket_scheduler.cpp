#include "sync/bucket_scheduler.h"

#include <utility>

#include "mpu/error.h"

namespace mpu::detail {

BucketScheduler::BucketScheduler(std::vector<BucketEntry> entries, std::int64_t element_bytes,
                                 std::int64_t cap_bytes)
    : entries_(std::move(entries)) {
  MPU_CHECK(element_bytes > 0 && cap_bytes > 0, "BucketScheduler: element_bytes (", element_bytes,
            ") and cap_bytes (", cap_bytes, ") must be positive");
  bucket_of_entry_.assign(entries_.size(), 0);
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    if (buckets_.empty() || buckets_.back().numel * element_bytes >= cap_bytes) {
      buckets_.push_back(Bucket{e.offset, 0, {}});
    }
    Bucket& b = buckets_.back();
    MPU_CHECK(e.offset == b.offset + b.numel, "BucketScheduler: entry ", e.name, " at element ",
              e.offset, " does not follow the previous entry, which ends at ", b.offset + b.numel);
    b.numel += e.numel;
    if (e.expects_gradient) b.entries.push_back(i);
    bucket_of_entry_[i] = buckets_.size() - 1;
  }
  reset();
}

void BucketScheduler::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  ready_.assign(entries_.size(), 0);
  missing_.resize(buckets_.size());
  for (std::size_t b = 0; b < buckets_.size(); ++b) missing_[b] = buckets_[b].entries.size();
  next_ = 0;
}

std::vector<std::size_t> BucketScheduler::mark_ready(std::size_t entry) {
  std::lock_guard<std::mutex> lock(mutex_);
  MPU_CHECK(entry < entries_.size(), "BucketScheduler::mark_ready: entry ", entry, " of ",
            entries_.size());
  const std::size_t b = bucket_of_entry_[entry];
  MPU_CHECK(b >= next_, "gradient bucketing: the gradient of parameter '", entries_[entry].name,
            "' arrived again after its bucket (#", b,
            ") was sent; its sum across ranks would be stale. Two backward passes reached it "
            "in one armed micro-batch (retain_graph, or a double backward); run one backward per "
            "micro-batch, or set UpdaterOptions::bucket_bytes = 0 to reduce after backward");
  std::vector<std::size_t> launch;
  if (ready_[entry]) return launch;  // counted once: its accumulator fired again before the send
  ready_[entry] = 1;
  --missing_[b];
  while (next_ < buckets_.size() && missing_[next_] == 0) launch.push_back(next_++);
  return launch;
}

std::vector<std::size_t> BucketScheduler::take_remaining() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::size_t> out;
  while (next_ < buckets_.size()) out.push_back(next_++);
  return out;
}

}  // namespace mpu::detail
