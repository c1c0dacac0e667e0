// Shared by the communicator backends: argument checks with messages that name the op and the
// argument, store keys, and the text of exceptions that come from c10 or the backends.
#pragma once

#include <chrono>
#include <exception>
#include <string>

#include "mpu/communicator.h"

namespace mpu::detail {

/// "float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", or c10's name of
/// other dtypes.
std::string dtype_name(c10::ScalarType dtype);

/// True for the dtypes a communicator takes: float32, float16, bfloat16, float64, int32, int64 and
/// uint8.
bool is_collective_dtype(c10::ScalarType dtype);

/// "float16[3, 4] on cuda:1", or "an undefined tensor".
std::string describe(const torch::Tensor& t);

/// Seconds with up to 3 decimals: "5 s", "0.25 s".
std::string seconds_text(std::chrono::milliseconds d);

/// Checks that `t` is defined, contiguous, on `device` and of a dtype `is_collective_dtype` takes.
void check_tensor(const char* op, const char* arg, const torch::Tensor& t,
                  const torch::Device& device);

/// Checks that `reduce_op` suits `t`'s dtype: kAvg only for floating dtypes, since an integer
/// average would have to round.
void check_reduce_op(const char* op, ReduceOp reduce_op, const torch::Tensor& t);

/// Checks 0 <= root < size.
void check_root(const char* op, int root, int size);

/// Checks `out`/`in` of reduce_scatter: dtypes agree, `reduce_op` suits them, out has
/// shard_numel(in.numel()) elements, and out is either disjoint from in or exactly in's own shard.
void check_reduce_scatter(const Communicator& comm, const torch::Tensor& out,
                          const torch::Tensor& in, ReduceOp reduce_op);

/// Checks `out`/`in` of allgather: dtypes agree, in has shard_numel(out.numel()) elements, and
/// in is either disjoint from out or exactly out's own shard.
void check_allgather(const Communicator& comm, const torch::Tensor& out, const torch::Tensor& in);

/// True when the bytes of `a` and `b` overlap.
bool overlaps(const torch::Tensor& a, const torch::Tensor& b);

/// A store prefix unique to the next communicator this process creates: "mpu/comm/<k>/". Ranks
/// that create their communicators in the same order get the same prefixes.
std::string next_comm_prefix();

/// Makes writing to a socket whose peer has gone an error (EPIPE) instead of a SIGPIPE that kills
/// the process: Gloo's TCP transport writes without MSG_NOSIGNAL, so a rank that dies would take
/// down the peer that writes to it next, before it could report anything. Sets SIGPIPE to
/// ignored when it has its default disposition; a handler the program installed is left alone.
void ignore_sigpipe();

/// The message of an exception without c10's backtrace.
std::string exception_text(const std::exception& e);

/// The message of the exception in flight (call inside a catch block).
std::string current_exception_text();

}  // namespace mpu::detail
