// Which gradient buckets may go out, and when: the bookkeeping of bucketed gradient
// communication, without autograd or a communicator, so that it can be tested on its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace mpu::detail {

/// One entry of the flat buffer, as the scheduler needs it.
struct BucketEntry {
  std::string name;
  std::int64_t offset = 0;  // elements
  std::int64_t numel = 0;
  bool expects_gradient = true;  // false: frozen, never marked
};

/// A contiguous range of the flat buffer sent by one collective.
struct Bucket {
  std::int64_t offset = 0;  // elements
  std::int64_t numel = 0;
  std::vector<std::size_t> entries;  // those that expect a gradient
};

/// Buckets over the flat entries (in flat order), and per-entry readiness.
///
/// A bucket is closed once it holds at least `cap_bytes` (elements x `element_bytes`), so a
/// bucket is never empty and an entry larger than the cap gets a bucket of its own. Readiness
/// is one flag per entry: an entry counts once however often it is marked before its bucket
/// went out, so a parameter whose accumulator fires twice cannot stand in for one that has not
/// fired. Buckets go out strictly in order, and a bucket only once every entry it expects is
/// ready, so every rank issues the same collectives in the same order whatever order its
/// gradients arrive in. Thread-safe: `mark_ready` may be called from autograd's threads.
class BucketScheduler {
 public:
  BucketScheduler() = default;
  /// `entries` in flat order, adjacent; `cap_bytes` > 0.
  BucketScheduler(std::vector<BucketEntry> entries, std::int64_t element_bytes,
                  std::int64_t cap_bytes);

  /// Starts a backward: no entry is ready and no bucket has gone out.
  void reset();
  /// Entry `entry`'s gradient is complete. Returns the buckets that may go out now, in order
  /// (possibly none). Throws `InvalidArgument` naming the parameter when its bucket has already
  /// gone out: its gradient changed after it was sent (a second backward through the same
  /// graph), and the ranks would step on a stale sum.
  std::vector<std::size_t> mark_ready(std::size_t entry);
  /// The buckets that have not gone out yet, in order, now marked as gone (finish() sends them
  /// whether or not their gradients all arrived: unused parameters, an unarmed backward).
  std::vector<std::size_t> take_remaining();

  const std::vector<Bucket>& buckets() const { return buckets_; }
  std::size_t size() const { return buckets_.size(); }
  bool empty() const { return buckets_.empty(); }
  /// The bucket holding `entry`.
  std::size_t bucket_of(std::size_t entry) const { return bucket_of_entry_.at(entry); }

 private:
  std::vector<BucketEntry> entries_;
  std::vector<Bucket> buckets_;
  std::vector<std::size_t> bucket_of_entry_;
  std::mutex mutex_;
  std::vector<char> ready_;           // per entry
  std::vector<std::size_t> missing_;  // per bucket: entries not ready yet
  std::size_t next_ = 0;              // the first bucket that has not gone out
};

}  // namespace mpu::detail
