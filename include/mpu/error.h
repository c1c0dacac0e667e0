/// \file
/// The exceptions torch-mpu throws, and the checking macros that build their messages.
///
/// Every message starts with `[file:line]` of the check that failed, then says what was being
/// done and the values seen, then, for CUDA and NCCL, the failing call and the library's own
/// error name and text.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace mpu {

/// Base of every exception torch-mpu throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An argument, configuration or input the caller passed is not usable. Fix the call.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A collective or a peer process failed: a rank died, NCCL reported an asynchronous error, or
/// a pipe or store connection broke. The job cannot continue.
class CommError : public Error {
 public:
  using Error::Error;
};

/// A collective or a wait did not finish within its deadline. A `Timeout` is a `CommError`, so
/// one handler catches both.
class Timeout : public CommError {
 public:
  using CommError::CommError;
};

/// `Trainer::run()` stopped because the process received SIGINT or SIGTERM. Thrown after every
/// worker has stopped and any snapshot asked for has been written; `signal()` says which signal.
/// A `main()` that lets it escape dies by std::terminate; catch it and return `128 + signal()`,
/// the status a shell reports for a process killed by that signal.
class Interrupted : public Error {
 public:
  /// `what` is the message; `signal` the number of the signal received (SIGINT or SIGTERM).
  Interrupted(const std::string& what, int signal) : Error(what), signal_(signal) {}
  /// The signal that stopped the training.
  int signal() const noexcept { return signal_; }

 private:
  int signal_;
};

namespace detail {

/// Streams every argument into one string; `cat()` is "".
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (void)(os << ... << args);
  return os.str();
}

/// "[file:line] " with the file shortened to the part after the last "src/", "include/",
/// "cuda/", "tests/", "examples/" or "bench/" directory, so that messages stay readable.
std::string where(const char* file, int line);

/// Throws `E` with "[file:line] <what>". Never returns.
template <typename E, typename... Args>
[[noreturn]] void raise(const char* file, int line, const Args&... what) {
  throw E(where(file, line) + cat(what...));
}

/// The message of a failed library call: "[file:line] <lib> error <name> (<text>) in `<call>`".
std::string library_error(const char* file, int line, const char* lib, const char* call,
                          const std::string& name, const std::string& text);

}  // namespace detail
}  // namespace mpu

/// Throws `mpu::InvalidArgument` when `cond` is false. The remaining arguments are streamed into
/// the message; write them for the user: what was being done, which argument, the values seen.
/// The condition's text is appended: "... (check `n > 0` failed)".
#define MPU_CHECK(cond, ...)                                                        \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ::mpu::detail::raise<::mpu::InvalidArgument>(__FILE__, __LINE__, __VA_ARGS__, \
                                                   " (check `" #cond "` failed)");  \
    }                                                                               \
  } while (0)

/// Throws `E` (an `mpu::Error` subclass) with a message streamed from the arguments.
#define MPU_THROW(E, ...) ::mpu::detail::raise<E>(__FILE__, __LINE__, __VA_ARGS__)

/// Evaluates a CUDA runtime call and throws `mpu::Error` when it returns anything but
/// `cudaSuccess`. Needs <cuda_runtime_api.h> at the point of use.
#define MPU_CUDA_CHECK(call)                                                             \
  do {                                                                                   \
    const cudaError_t mpu_status_ = (call);                                              \
    if (mpu_status_ != cudaSuccess) {                                                    \
      (void)cudaGetLastError();                                                          \
      throw ::mpu::Error(::mpu::detail::library_error(__FILE__, __LINE__, "CUDA", #call, \
                                                      cudaGetErrorName(mpu_status_),     \
                                                      cudaGetErrorString(mpu_status_))); \
    }                                                                                    \
  } while (0)

/// Evaluates an NCCL call and throws `mpu::CommError` when it returns anything but
/// `ncclSuccess` (or `ncclInProgress`, for non-blocking communicators). The message carries
/// `ncclGetErrorString` and NCCL's last error text. Needs <nccl.h> at the point of use.
#define MPU_NCCL_CHECK(call)                                                                       \
  do {                                                                                             \
    const ncclResult_t mpu_status_ = (call);                                                       \
    if (mpu_status_ != ncclSuccess && mpu_status_ != ncclInProgress) {                             \
      const char* mpu_last_ = ncclGetLastError(nullptr);                                           \
      throw ::mpu::CommError(::mpu::detail::library_error(                                         \
          __FILE__, __LINE__, "NCCL", #call, ::mpu::detail::cat("ncclResult ", mpu_status_),       \
          ::mpu::detail::cat(ncclGetErrorString(mpu_status_),                                      \
                             (mpu_last_ && *mpu_last_) ? ": " : "", mpu_last_ ? mpu_last_ : ""))); \
    }                                                                                              \
  } while (0)
