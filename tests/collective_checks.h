// The collective checks run inside every rank, for any backend: rank-valued fills whose results
// have a closed form, exact in every dtype for up to 4 ranks (every value and partial sum is a
// small integer or half-integer, plus, for the wide dtypes, an offset that only they can carry).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "mpu/communicator.h"
#include "multiprocess.h"

namespace mpu::test {

/// Records a failure unless `actual` and `expected` agree exactly (see exact_difference).
#define MPU_EXPECT_EXACT(actual, expected, ...)                                              \
  do {                                                                                       \
    const std::string mpu_exact_diff_ = ::mpu::test::exact_difference((actual), (expected)); \
    MPU_EXPECT(mpu_exact_diff_.empty(), mpu_exact_diff_, " ", ##__VA_ARGS__);                \
  } while (0)

inline const std::vector<c10::ScalarType>& collective_dtypes() {
  static const std::vector<c10::ScalarType> dtypes{torch::kFloat,  torch::kHalf, torch::kBFloat16,
                                                   torch::kDouble, torch::kInt,  torch::kLong,
                                                   torch::kByte};
  return dtypes;
}

/// The reductions `dtype` takes: avg only for floating dtypes.
inline std::vector<ReduceOp> reduce_ops(c10::ScalarType dtype) {
  if (c10::isFloatingType(dtype)) return {ReduceOp::kSum, ReduceOp::kAvg};
  return {ReduceOp::kSum};
}

/// Element counts that exercise the edges for `n` ranks: empty, fewer elements than ranks,
/// multiples of n and sizes n does not divide.
inline std::vector<std::int64_t> collective_sizes(int n) {
  std::vector<std::int64_t> sizes{0, 1, n - 1, n, n + 1, 7 * n + 3, 1000 * n, 4099};
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

/// What every value of `dtype` is offset by, so that the results need the dtype's full width:
/// int64 2^53 + 1 (float64 cannot hold it), int32 2^24 + 1 (float32 cannot hold it). Summed over
/// up to 4 ranks, both stay far from overflow. uint8 gets none: its sums of up to 4 ranks stay
/// below 256 without.
inline std::int64_t integer_base(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kLong:
      return (std::int64_t{1} << 53) + 1;
    case torch::kInt:
      return (std::int64_t{1} << 24) + 1;
    default:
      return 0;
  }
}

/// As integer_base, for floating dtypes: float64 2^24 + 0.5, which float32 rounds away; every
/// sum and average of up to 4 ranks is still exact in float64. The narrower dtypes get none.
inline double floating_base(c10::ScalarType dtype) {
  return dtype == torch::kDouble ? 16777216.5 : 0.0;
}

/// (i mod 7) + 1 for i in [0, numel), as int64 on the CPU.
inline torch::Tensor pattern(std::int64_t numel) {
  return torch::arange(numel, torch::kLong).remainder(7).add(1);
}

/// `scale` * pattern + `count` * the dtype's base, computed exactly (int64 for integer dtypes,
/// float64 otherwise) and then cast to `dtype`.
inline torch::Tensor pattern_values(std::int64_t numel, double scale, int count,
                                    c10::ScalarType dtype) {
  if (c10::isIntegralType(dtype, /*includeBool=*/false)) {
    const auto factor = static_cast<std::int64_t>(scale);
    return pattern(numel).mul(factor).add(integer_base(dtype) * count).to(dtype);
  }
  return pattern(numel).to(torch::kDouble).mul(scale).add(floating_base(dtype) * count).to(dtype);
}

/// Rank r's contribution: (r + 1) * pattern + base.
inline torch::Tensor rank_values(std::int64_t numel, int rank, c10::ScalarType dtype,
                                 const torch::Device& device) {
  return pattern_values(numel, rank + 1, 1, dtype).to(device);
}

/// The reduction over n ranks of rank_values: pattern * n(n+1)/2 + n * base for a sum,
/// pattern * (n+1)/2 + base for an average.
inline torch::Tensor reduced_values(std::int64_t numel, int n, ReduceOp op, c10::ScalarType dtype) {
  const double sum = n * (n + 1) / 2.0;
  return op == ReduceOp::kSum ? pattern_values(numel, sum, n, dtype)
                              : pattern_values(numel, sum / n, 1, dtype);
}

/// A fill no result takes: -1, or 255 for uint8.
inline double sentinel(c10::ScalarType dtype) {
  return dtype == torch::kByte ? 255.0 : -1.0;
}

/// Where `actual` and `expected` differ, exactly: in int64 for integer dtypes (first_difference
/// compares in float64, which would hide an error in the last bits of an int64 beyond 2^53).
/// Empty when they agree in shape, dtype and value.
inline std::string exact_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  const std::string coarse = first_difference(actual, expected);
  if (!coarse.empty() || !c10::isIntegralType(actual.scalar_type(), /*includeBool=*/false)) {
    return coarse;
  }
  const torch::Tensor a = actual.to(torch::kCPU).to(torch::kLong).reshape({-1});
  const torch::Tensor b = expected.to(torch::kCPU).to(torch::kLong).reshape({-1});
  const torch::Tensor diff = a.ne(b).nonzero();
  if (diff.numel() == 0) return "";
  const std::int64_t i = diff[0].item<std::int64_t>();
  return detail::cat(diff.size(0), " of ", a.numel(), " elements differ; first at flat index ", i,
                     ": ", a[i].item<std::int64_t>(), " vs expected ", b[i].item<std::int64_t>());
}

inline std::string context(const Communicator& comm, const char* op, c10::ScalarType dtype,
                           std::int64_t numel, const std::string& extra = "") {
  return detail::cat("[", comm.backend(), " ", op, " rank ", comm.rank(), "/", comm.size(), " ",
                     c10::toString(dtype), " numel ", numel, extra.empty() ? "" : " ", extra, "]");
}

inline void check_allreduce(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      for (ReduceOp op : reduce_ops(dtype)) {
        torch::Tensor t = rank_values(numel, comm.rank(), dtype, comm.device());
        comm.allreduce(t, op);
        MPU_EXPECT_EXACT(t.cpu(), reduced_values(numel, n, op, dtype),
                         context(comm, "allreduce", dtype, numel, to_string(op)));
      }
    }
    // A 2-D tensor: only the element count matters.
    torch::Tensor t = rank_values(12, comm.rank(), dtype, comm.device()).view({3, 4});
    comm.allreduce(t);
    MPU_EXPECT_EXACT(t.cpu(), reduced_values(12, n, ReduceOp::kSum, dtype).view({3, 4}),
                     context(comm, "allreduce", dtype, 12, "3x4"));
  }
}

inline void check_reduce(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      for (int root = 0; root < n; ++root) {
        for (ReduceOp op : reduce_ops(dtype)) {
          torch::Tensor t = rank_values(numel, comm.rank(), dtype, comm.device());
          comm.reduce(t, root, op);
          const torch::Tensor expected = comm.rank() == root
                                             ? reduced_values(numel, n, op, dtype)
                                             : rank_values(numel, comm.rank(), dtype, torch::kCPU);
          MPU_EXPECT_EXACT(t.cpu(), expected,
                           context(comm, "reduce", dtype, numel,
                                   detail::cat("root ", root, " ", to_string(op))));
        }
      }
    }
  }
}

inline void check_broadcast(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      for (int root = 0; root < n; ++root) {
        torch::Tensor t =
            comm.rank() == root
                ? rank_values(numel, root, dtype, comm.device())
                : torch::full({numel}, sentinel(dtype),
                              torch::TensorOptions().dtype(dtype).device(comm.device()));
        comm.broadcast(t, root);
        MPU_EXPECT_EXACT(t.cpu(), rank_values(numel, root, dtype, torch::kCPU),
                         context(comm, "broadcast", dtype, numel, detail::cat("root ", root)));
      }
    }
  }
}

inline void check_reduce_scatter(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      const std::int64_t offset = comm.shard_offset(numel);
      const std::int64_t shard = comm.shard_numel(numel);
      for (ReduceOp op : reduce_ops(dtype)) {
        const torch::Tensor expected = reduced_values(numel, n, op, dtype).narrow(0, offset, shard);
        torch::Tensor in = rank_values(numel, comm.rank(), dtype, comm.device());
        torch::Tensor out = torch::full({shard}, sentinel(dtype), in.options());
        comm.reduce_scatter(out, in, op);
        MPU_EXPECT_EXACT(out.cpu(), expected,
                         context(comm, "reduce_scatter", dtype, numel, to_string(op)));
        MPU_EXPECT_EXACT(in.cpu(), rank_values(numel, comm.rank(), dtype, torch::kCPU),
                         context(comm, "reduce_scatter leaves `in`", dtype, numel));
        // In place: `out` is this rank's shard of `in`.
        torch::Tensor in_place = rank_values(numel, comm.rank(), dtype, comm.device());
        torch::Tensor view = in_place.narrow(0, offset, shard);
        comm.reduce_scatter(view, in_place, op);
        MPU_EXPECT_EXACT(in_place.narrow(0, offset, shard).cpu(), expected,
                         context(comm, "reduce_scatter in place", dtype, numel, to_string(op)));
      }
    }
  }
}

/// What allgather's `out` holds at flat index i: (i mod 13) + 20 * (the rank owning i) + the
/// dtype's base, as `dtype`.
inline torch::Tensor gathered_values(std::int64_t numel, int n, c10::ScalarType dtype) {
  const std::int64_t chunk = (numel + n - 1) / n;
  torch::Tensor i = torch::arange(numel, torch::kLong);
  torch::Tensor owner = chunk == 0 ? i : i.div(chunk, "floor");
  torch::Tensor small = i.remainder(13) + owner * 20;
  if (c10::isIntegralType(dtype, /*includeBool=*/false)) {
    return small.add(integer_base(dtype)).to(dtype);
  }
  return small.to(torch::kDouble).add(floating_base(dtype)).to(dtype);
}

inline void check_allgather(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      const std::int64_t offset = comm.shard_offset(numel);
      const std::int64_t shard = comm.shard_numel(numel);
      const torch::Tensor expected = gathered_values(numel, n, dtype);
      const auto options = torch::TensorOptions().dtype(dtype).device(comm.device());
      torch::Tensor in = expected.narrow(0, offset, shard).to(comm.device());
      torch::Tensor out = torch::full({numel}, sentinel(dtype), options);
      comm.allgather(out, in);
      MPU_EXPECT_EXACT(out.cpu(), expected, context(comm, "allgather", dtype, numel));
      // In place: `in` is this rank's shard of `out`.
      torch::Tensor in_place = torch::full({numel}, sentinel(dtype), options);
      in_place.narrow(0, offset, shard).copy_(in);
      torch::Tensor view = in_place.narrow(0, offset, shard);
      comm.allgather(in_place, view);
      MPU_EXPECT_EXACT(in_place.cpu(), expected, context(comm, "allgather in place", dtype, numel));
    }
  }
}

/// reduce_scatter then allgather is an allreduce.
inline void check_round_trip(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      torch::Tensor in = rank_values(numel, comm.rank(), dtype, comm.device());
      torch::Tensor shard = torch::empty({comm.shard_numel(numel)}, in.options());
      comm.reduce_scatter(shard, in);
      torch::Tensor out = torch::empty({numel}, in.options());
      comm.allgather(out, shard);
      MPU_EXPECT_EXACT(out.cpu(), reduced_values(numel, n, ReduceOp::kSum, dtype),
                       context(comm, "reduce_scatter + allgather", dtype, numel));
    }
  }
}

/// allreduce_async and reduce_async, several in flight before one join(): the same results as
/// their joined forms, every call counted once.
inline void check_async(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      const std::uint64_t before = comm.sequence_number();
      torch::Tensor sum = rank_values(numel, comm.rank(), dtype, comm.device());
      torch::Tensor avg = rank_values(numel, comm.rank(), dtype, comm.device());
      std::vector<torch::Tensor> reduced;
      for (int root = 0; root < n; ++root) {
        reduced.push_back(rank_values(numel, comm.rank(), dtype, comm.device()));
      }
      comm.allreduce_async(sum, ReduceOp::kSum);
      for (int root = 0; root < n; ++root) comm.reduce_async(reduced[root], root, ReduceOp::kSum);
      const bool floating = c10::isFloatingType(dtype);
      if (floating) comm.allreduce_async(avg, ReduceOp::kAvg);
      comm.join();
      MPU_EXPECT_EXACT(sum.cpu(), reduced_values(numel, n, ReduceOp::kSum, dtype),
                       context(comm, "allreduce_async", dtype, numel, "sum"));
      if (floating) {
        MPU_EXPECT_EXACT(avg.cpu(), reduced_values(numel, n, ReduceOp::kAvg, dtype),
                         context(comm, "allreduce_async", dtype, numel, "avg"));
      }
      for (int root = 0; root < n; ++root) {
        const torch::Tensor expected = comm.rank() == root
                                           ? reduced_values(numel, n, ReduceOp::kSum, dtype)
                                           : rank_values(numel, comm.rank(), dtype, torch::kCPU);
        MPU_EXPECT_EXACT(reduced[root].cpu(), expected,
                         context(comm, "reduce_async", dtype, numel, detail::cat("root ", root)));
      }
      const std::uint64_t calls = static_cast<std::uint64_t>(n) + (floating ? 2 : 1);
      MPU_EXPECT(comm.sequence_number() == before + calls, "sequence number went from ", before,
                 " to ", comm.sequence_number(), " over ", calls, " async calls");
    }
  }
}

/// Every call counts once in sequence_number(), empty ones too, and all ranks agree.
inline void check_sequence_numbers(Communicator& comm) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat).device(comm.device());
  const std::uint64_t before = comm.sequence_number();
  torch::Tensor empty = torch::empty({0}, options);
  torch::Tensor one = torch::ones({1}, options);
  comm.allreduce(empty);
  comm.broadcast(empty, 0);
  comm.reduce(one, comm.size() - 1);
  comm.reduce_scatter(empty, empty);
  comm.allgather(empty, empty);
  comm.barrier();
  MPU_EXPECT(comm.sequence_number() == before + 6, "sequence number went from ", before, " to ",
             comm.sequence_number(), " over 6 calls");
  const int n = comm.size();
  torch::Tensor mine = torch::full({1}, static_cast<double>(comm.sequence_number()), options);
  torch::Tensor all = torch::empty({n}, options);
  comm.allgather(all, mine);
  MPU_EXPECT_EXACT(all.cpu(), torch::full({n}, static_cast<double>(before + 6), torch::kFloat),
                   "[every rank's sequence number after the same calls]");
}

/// broadcast_bytes from every root and allgather_bytes: binary content with '\0' inside and at
/// the ends, lengths that differ between ranks, empty strings on some ranks and on all of them.
/// Each call is two collectives.
inline void check_bytes(Communicator& comm) {
  const int n = comm.size();
  // Rank r's string: r + 1 copies of "\0" "r" "\xff", then r '\0's; rank 1's is empty.
  const auto bytes_of = [](int r) {
    if (r == 1) return std::string();
    std::string s;
    for (int k = 0; k <= r; ++k) {
      s.push_back('\0');
      s.push_back(static_cast<char>('0' + r));
      s.push_back('\xff');
    }
    s.append(static_cast<std::size_t>(r), '\0');
    return s;
  };
  const std::uint64_t before = comm.sequence_number();
  for (int root = 0; root < n; ++root) {
    const std::string mine = comm.rank() == root ? bytes_of(root) : std::string("ignored");
    const std::string got = comm.broadcast_bytes(mine, root);
    MPU_EXPECT(got == bytes_of(root), "[", comm.backend(), " broadcast_bytes rank ", comm.rank(),
               " root ", root, "] got ", got.size(), " bytes, expected ", bytes_of(root).size());
  }
  const std::vector<std::string> all = comm.allgather_bytes(bytes_of(comm.rank()));
  MPU_EXPECT(all.size() == static_cast<std::size_t>(n), "allgather_bytes returned ", all.size(),
             " strings for ", n, " ranks");
  for (int r = 0; r < n && r < static_cast<int>(all.size()); ++r) {
    MPU_EXPECT(all[r] == bytes_of(r), "[", comm.backend(), " allgather_bytes rank ", comm.rank(),
               "] rank ", r, "'s string has ", all[r].size(), " bytes, expected ",
               bytes_of(r).size());
  }
  const std::string empty = comm.broadcast_bytes(std::string(), n - 1);
  MPU_EXPECT(empty.empty(), "broadcast_bytes of an empty string returned ", empty.size(), " bytes");
  const std::vector<std::string> empties = comm.allgather_bytes(std::string());
  MPU_EXPECT(empties == std::vector<std::string>(static_cast<std::size_t>(n)),
             "allgather_bytes of empty strings returned something else");
  const std::uint64_t calls = 2 * (static_cast<std::uint64_t>(n) + 3);
  MPU_EXPECT(comm.sequence_number() == before + calls, "sequence number went from ", before, " to ",
             comm.sequence_number(), " over ", calls, " collectives of bytes");
}

}  // namespace mpu::test
