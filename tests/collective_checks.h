// The collective checks run inside every rank, for any backend: rank-valued fills whose results
// have a closed form, exact in float32, float16 and bfloat16 for up to 4 ranks (every value and
// partial sum is a small integer or half-integer).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "mpu/communicator.h"
#include "multiprocess.h"

namespace mpu::test {

inline const std::vector<c10::ScalarType>& collective_dtypes() {
  static const std::vector<c10::ScalarType> dtypes{torch::kFloat, torch::kHalf, torch::kBFloat16};
  return dtypes;
}

/// Element counts that exercise the edges for `n` ranks: empty, fewer elements than ranks,
/// multiples of n and sizes n does not divide.
inline std::vector<std::int64_t> collective_sizes(int n) {
  std::vector<std::int64_t> sizes{0, 1, n - 1, n, n + 1, 7 * n + 3, 1000 * n, 4099};
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

/// (i mod 7) + 1 for i in [0, numel), as float64 on the CPU.
inline torch::Tensor pattern(std::int64_t numel) {
  return torch::arange(numel, torch::kLong).remainder(7).add(1).to(torch::kDouble);
}

/// Rank r's contribution: (r + 1) * pattern.
inline torch::Tensor rank_values(std::int64_t numel, int rank, c10::ScalarType dtype,
                                 const torch::Device& device) {
  return (pattern(numel) * (rank + 1)).to(dtype).to(device);
}

/// The reduction over n ranks of rank_values: pattern * n(n+1)/2 for a sum, pattern * (n+1)/2
/// for an average.
inline torch::Tensor reduced_values(std::int64_t numel, int n, ReduceOp op, c10::ScalarType dtype) {
  const double sum = n * (n + 1) / 2.0;
  return (pattern(numel) * (op == ReduceOp::kSum ? sum : sum / n)).to(dtype);
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
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
        torch::Tensor t = rank_values(numel, comm.rank(), dtype, comm.device());
        comm.allreduce(t, op);
        MPU_EXPECT_EQUAL(t.cpu(), reduced_values(numel, n, op, dtype),
                         context(comm, "allreduce", dtype, numel, to_string(op)));
      }
    }
    // A 2-D tensor: only the element count matters.
    torch::Tensor t = rank_values(12, comm.rank(), dtype, comm.device()).view({3, 4});
    comm.allreduce(t);
    MPU_EXPECT_EQUAL(t.cpu(), reduced_values(12, n, ReduceOp::kSum, dtype).view({3, 4}),
                     context(comm, "allreduce", dtype, 12, "3x4"));
  }
}

inline void check_reduce(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      for (int root = 0; root < n; ++root) {
        for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
          torch::Tensor t = rank_values(numel, comm.rank(), dtype, comm.device());
          comm.reduce(t, root, op);
          const torch::Tensor expected = comm.rank() == root
                                             ? reduced_values(numel, n, op, dtype)
                                             : rank_values(numel, comm.rank(), dtype, torch::kCPU);
          MPU_EXPECT_EQUAL(t.cpu(), expected,
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
                : torch::full({numel}, -1.0,
                              torch::TensorOptions().dtype(dtype).device(comm.device()));
        comm.broadcast(t, root);
        MPU_EXPECT_EQUAL(t.cpu(), rank_values(numel, root, dtype, torch::kCPU),
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
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
        const torch::Tensor expected = reduced_values(numel, n, op, dtype).narrow(0, offset, shard);
        torch::Tensor in = rank_values(numel, comm.rank(), dtype, comm.device());
        torch::Tensor out = torch::full({shard}, -1.0, in.options());
        comm.reduce_scatter(out, in, op);
        MPU_EXPECT_EQUAL(out.cpu(), expected,
                         context(comm, "reduce_scatter", dtype, numel, to_string(op)));
        MPU_EXPECT_EQUAL(in.cpu(), rank_values(numel, comm.rank(), dtype, torch::kCPU),
                         context(comm, "reduce_scatter leaves `in`", dtype, numel));
        // In place: `out` is this rank's shard of `in`.
        torch::Tensor in_place = rank_values(numel, comm.rank(), dtype, comm.device());
        torch::Tensor view = in_place.narrow(0, offset, shard);
        comm.reduce_scatter(view, in_place, op);
        MPU_EXPECT_EQUAL(in_place.narrow(0, offset, shard).cpu(), expected,
                         context(comm, "reduce_scatter in place", dtype, numel, to_string(op)));
      }
    }
  }
}

/// What allgather's `out` holds at flat index i: (i mod 13) + 20 * (the rank owning i).
inline torch::Tensor gathered_values(std::int64_t numel, int n) {
  const std::int64_t chunk = (numel + n - 1) / n;
  torch::Tensor i = torch::arange(numel, torch::kLong);
  torch::Tensor owner = chunk == 0 ? i : i.div(chunk, "floor");
  return (i.remainder(13) + owner * 20).to(torch::kDouble);
}

inline void check_allgather(Communicator& comm) {
  const int n = comm.size();
  for (auto dtype : collective_dtypes()) {
    for (std::int64_t numel : collective_sizes(n)) {
      const std::int64_t offset = comm.shard_offset(numel);
      const std::int64_t shard = comm.shard_numel(numel);
      const torch::Tensor expected = gathered_values(numel, n).to(dtype);
      const auto options = torch::TensorOptions().dtype(dtype).device(comm.device());
      torch::Tensor in = expected.narrow(0, offset, shard).to(comm.device());
      torch::Tensor out = torch::full({numel}, -1.0, options);
      comm.allgather(out, in);
      MPU_EXPECT_EQUAL(out.cpu(), expected, context(comm, "allgather", dtype, numel));
      // In place: `in` is this rank's shard of `out`.
      torch::Tensor in_place = torch::full({numel}, -1.0, options);
      in_place.narrow(0, offset, shard).copy_(in);
      torch::Tensor view = in_place.narrow(0, offset, shard);
      comm.allgather(in_place, view);
      MPU_EXPECT_EQUAL(in_place.cpu(), expected, context(comm, "allgather in place", dtype, numel));
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
      MPU_EXPECT_EQUAL(out.cpu(), reduced_values(numel, n, ReduceOp::kSum, dtype),
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
      comm.allreduce_async(avg, ReduceOp::kAvg);
      comm.join();
      MPU_EXPECT_EQUAL(sum.cpu(), reduced_values(numel, n, ReduceOp::kSum, dtype),
                       context(comm, "allreduce_async", dtype, numel, "sum"));
      MPU_EXPECT_EQUAL(avg.cpu(), reduced_values(numel, n, ReduceOp::kAvg, dtype),
                       context(comm, "allreduce_async", dtype, numel, "avg"));
      for (int root = 0; root < n; ++root) {
        const torch::Tensor expected = comm.rank() == root
                                           ? reduced_values(numel, n, ReduceOp::kSum, dtype)
                                           : rank_values(numel, comm.rank(), dtype, torch::kCPU);
        MPU_EXPECT_EQUAL(reduced[root].cpu(), expected,
                         context(comm, "reduce_async", dtype, numel, detail::cat("root ", root)));
      }
      const std::uint64_t calls = static_cast<std::uint64_t>(n) + 2;
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
  MPU_EXPECT_EQUAL(all.cpu(), torch::full({n}, static_cast<double>(before + 6), torch::kFloat),
                   "[every rank's sequence number after the same calls]");
}

}  // namespace mpu::test
