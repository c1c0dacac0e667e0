/// \file
/// Collectives between the ranks of a data-parallel job: the `Communicator` interface, its NCCL
/// and Gloo backends, and the factories that build them from a rendezvous store.
#pragma once

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mpu/config.h"
#include "mpu/defaults.h"

namespace mpu {

/// A key-value store all ranks reach: the rendezvous for Gloo and for the NCCL unique id.
/// c10d's `TCPStore`, `HashStore`, `FileStore` and `PrefixStore` all fit.
using StorePtr = c10::intrusive_ptr<c10d::Store>;

/// How a reduction combines the ranks' values.
enum class ReduceOp {
  kSum,  ///< Element-wise sum over the ranks.
  kAvg,  ///< Element-wise sum divided by `size()`, for floating dtypes only. NCCL uses
         ///< ncclAvg; Gloo sums, then divides.
};

/// "sum" or "avg".
const char* to_string(ReduceOp op);

/// Collectives among `size()` processes, one per rank.
///
/// Contract, for every backend:
/// - **Call order.** Every rank makes the same collective calls, in the same order, with the same
///   root, op, dtype and global element count. A rank that skips or reorders a call deadlocks the
///   others until the timeout. `sequence_number()` counts the calls and is the same on every rank
///   at the same point of the program; error messages name it ("allreduce #17").
/// - **Tensors.** Contiguous, on `device()`, of dtype float32, float16, bfloat16, float64, int32,
///   int64 or uint8 (bytes, for `broadcast_bytes` and `allgather_bytes`); the messages of
///   `mpu::InvalidArgument` name the op, the argument and the values seen. Every collective takes
///   every one of these dtypes; `ReduceOp::kAvg` takes only the floating ones (an integer average
///   would round), and integer sums wrap as the dtype does. A tensor with no elements makes the
///   call a no-op that still counts in `sequence_number()`, so all ranks stay in step. Results are
///   exact for the backend's arithmetic: sums of values representable in the dtype, whose partial
///   sums are representable too, come out exactly.
/// - **Sharding.** `reduce_scatter` and `allgather` split a flat tensor of N elements like
///   `torch::chunk`: every shard has ceil(N / size) elements except the last non-empty one, and
///   trailing ranks may get an empty shard. `shard_offset()` and `shard_numel()` say which
///   elements rank r owns. Any N works; the backend pads internally when size does not divide N.
/// - **Errors.** A peer that dies, an asynchronous backend error or a collective that outlives the
///   timeout aborts the communicator and throws `mpu::CommError` (or `mpu::Timeout`, a CommError)
///   from the call that notices it, and from every call after it.
/// - **Threads.** One thread at a time calls a communicator. `abort()` may come from any thread.
///
/// Streams, for CUDA backends (NCCL): each collective runs on the communicator's own CUDA stream.
/// The comm stream first waits for an event recorded on torch's current stream (so the
/// collective sees everything queued before the call), and torch's current stream then waits
/// for an event recorded on the comm stream after the collective (so everything queued after the
/// call sees its result). The `_async` collectives skip the second wait until `join()`, so that
/// compute queued after them overlaps the transfer. The host does not wait: collectives return
/// once enqueued, except `barrier()` and `synchronize()`. Tensors must be produced and consumed on
/// torch's current stream. A watchdog thread polls the collectives in flight and NCCL's
/// asynchronous error against the timeout; on expiry it calls `ncclCommAbort`, which releases the
/// GPU, and the next call on the host throws `mpu::Timeout`. Work queued on the current stream
/// after an aborted collective runs on whatever the buffer held.
///
/// CPU backends (Gloo) are synchronous: the result is in the tensor when the call returns, and a
/// collective that outlives the timeout throws `mpu::Timeout` from that call.
class Communicator {
 public:
  virtual ~Communicator();

  /// This process's rank, in [0, size()).
  virtual int rank() const = 0;
  /// The number of ranks.
  virtual int size() const = 0;
  /// The device every tensor passed in must be on.
  virtual torch::Device device() const = 0;
  /// "nccl" or "gloo".
  virtual std::string backend() const = 0;
  /// The number of collective calls made so far, empty and failed ones included.
  virtual std::uint64_t sequence_number() const = 0;

  /// In place: on `root`, `t` becomes the reduction of every rank's `t`. On other ranks `t` is
  /// left unchanged.
  virtual void reduce(torch::Tensor& t, int root, ReduceOp op = ReduceOp::kSum) = 0;
  /// In place: every rank's `t` becomes `root`'s `t`.
  virtual void broadcast(torch::Tensor& t, int root) = 0;
  /// In place: every rank's `t` becomes the reduction of every rank's `t`.
  virtual void allreduce(torch::Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  /// As `allreduce`, but torch's current stream does not wait for the result: work queued on it
  /// after the call runs alongside the collective, and must not touch `t` until `join()` (or a
  /// later collective without the suffix on a non-empty tensor, which joins everything issued
  /// before it). Freeing `t` meanwhile is safe: the caching allocator is told that the comm stream
  /// uses it, and hands its memory out again only once the collective is done. Gradient buckets go
  /// out this way during backward. CPU backends: the same as `allreduce`.
  virtual void allreduce_async(torch::Tensor& t, ReduceOp op = ReduceOp::kSum);
  /// As `reduce`, with the result joined like `allreduce_async`'s.
  virtual void reduce_async(torch::Tensor& t, int root, ReduceOp op = ReduceOp::kSum);
  /// Makes torch's current stream wait for every collective issued so far; the host does not
  /// wait. A no-op for synchronous backends, apart from the failure check.
  virtual void join();
  /// `in` has the same numel N on every rank. `out` receives this rank's shard of the reduction
  /// of every rank's `in`: elements [shard_offset(N), shard_offset(N) + shard_numel(N)). `out`
  /// must have exactly shard_numel(N) elements and `in`'s dtype. `in` is left unchanged. `out`
  /// may not overlap `in`, except by being exactly `in`'s own shard (in-place).
  virtual void reduce_scatter(torch::Tensor& out, const torch::Tensor& in,
                              ReduceOp op = ReduceOp::kSum) = 0;
  /// The inverse of `reduce_scatter`'s split: `out` has the same numel N on every rank, `in` has
  /// shard_numel(N) elements, and every rank's `out` becomes the concatenation of the ranks' `in`
  /// in rank order. `in` may be exactly `out`'s own shard (in-place); no other overlap.
  virtual void allgather(torch::Tensor& out, const torch::Tensor& in) = 0;
  /// Returns when every rank has entered `barrier()` and this rank's earlier collectives have
  /// finished on the device. Blocks the host.
  virtual void barrier() = 0;
  /// Blocks the host until this rank's collectives issued so far have finished, or throws
  /// `mpu::CommError`/`mpu::Timeout`. A no-op for synchronous backends, apart from the check.
  virtual void synchronize() = 0;
  /// Tears the communicator down without waiting for the other ranks: NCCL kernels in flight
  /// are released, and a Gloo collective blocked in another thread throws `mpu::CommError`
  /// within about 50 ms. Every later call throws `mpu::CommError`. Safe from any thread;
  /// idempotent.
  virtual void abort() noexcept = 0;

  /// On every rank: returns `root`'s `bytes` (the other ranks' argument is ignored). Two
  /// collectives, both counted in `sequence_number()`: the length (int64), then the bytes (uint8),
  /// on `device()`. Blocks the host until the bytes have arrived. Binary content ('\0' included)
  /// and empty strings travel as they are.
  std::string broadcast_bytes(const std::string& bytes, int root);
  /// On every rank: every rank's `mine`, in rank order; lengths may differ between ranks. Two
  /// collectives, both counted in `sequence_number()`: an allgather of the lengths (int64), then
  /// one of the bytes (uint8, each rank's padded to the longest), on `device()`. Blocks the host.
  std::vector<std::string> allgather_bytes(const std::string& mine);

  /// Offset of `rank`'s shard of a flat tensor of `numel` elements (see the class comment).
  std::int64_t shard_offset(std::int64_t numel) const;
  /// Number of elements of `rank`'s shard of a flat tensor of `numel` elements.
  std::int64_t shard_numel(std::int64_t numel) const;
};

/// Offset of rank `rank`'s shard when `numel` elements are split over `size` ranks like
/// `torch::chunk`: min(rank * ceil(numel / size), numel).
std::int64_t shard_offset(std::int64_t numel, int size, int rank);
/// Number of elements of that shard: min(ceil(numel / size), numel - shard_offset).
std::int64_t shard_numel(std::int64_t numel, int size, int rank);

/// The collective timeout: MPU_COMM_TIMEOUT_SEC (seconds, fractions allowed) when set, else
/// `kDefaultCommTimeout`. Throws `mpu::InvalidArgument` when the variable is not a positive number.
std::chrono::milliseconds comm_timeout();

/// Size of an NCCL unique id (NCCL_UNIQUE_ID_BYTES).
inline constexpr std::size_t kNcclUniqueIdBytes = 128;
/// The bytes of an `ncclUniqueId`, to pass between processes (a pipe, a store).
using NcclUniqueId = std::array<char, kNcclUniqueIdBytes>;

/// A fresh id from `ncclGetUniqueId`, made by exactly one rank and shared with the others. It
/// does not initialise CUDA, so it is safe before `fork()`. Throws `mpu::InvalidArgument` when
/// this build has no NCCL.
NcclUniqueId nccl_unique_id();

/// The NCCL communicator of `rank` among `size` ranks on GPU `device_index`. Every rank passes
/// the same `id`. Blocks until all ranks have joined, or throws `mpu::Timeout` after `timeout`.
/// Throws `mpu::InvalidArgument` when this build has no NCCL.
std::shared_ptr<Communicator> make_nccl_communicator(
    const NcclUniqueId& id, int rank, int size, int device_index,
    std::chrono::milliseconds timeout = comm_timeout());

/// As above, with the unique id made by rank 0 and shared through `store`. Every rank creates its
/// communicators in the same order (the store keys are numbered by creation).
std::shared_ptr<Communicator> make_nccl_communicator(
    const StorePtr& store, int rank, int size, int device_index,
    std::chrono::milliseconds timeout = comm_timeout());

/// The Gloo communicator (c10d's ProcessGroupGloo) of `rank` among `size` ranks, for CPU
/// tensors, meeting the others through `store`. The network interface is GLOO_SOCKET_IFNAME
/// when set, else the one the host name resolves to. Blocks until all ranks have joined, or
/// throws `mpu::Timeout`. Every rank creates its communicators in the same order. Throws
/// `mpu::InvalidArgument` when this build has no Gloo.
std::shared_ptr<Communicator> make_gloo_communicator(
    const StorePtr& store, int rank, int size, std::chrono::milliseconds timeout = comm_timeout());

/// A communicator of one rank on `device` (backend "local"): every collective leaves its data as
/// it is, and nothing is sent. What StandardUpdater steps through for the precision policies.
std::shared_ptr<Communicator> make_local_communicator(const torch::Device& device);

/// NCCL for a CUDA `device`, Gloo for the CPU.
std::shared_ptr<Communicator> make_communicator(const torch::Device& device, const StorePtr& store,
                                                int rank, int size,
                                                std::chrono::milliseconds timeout = comm_timeout());

}  // namespace mpu
