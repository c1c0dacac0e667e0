#include <catch2/catch.hpp>

#include "messages.h"

#include "mpu/error.h"

#if defined(MPU_TEST_HAVE_CUDA_HEADERS)
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace {

using mpu::test::message_of;

}  // namespace

TEST_CASE("MPU_CHECK throws InvalidArgument with file:line, message and condition", "[error]") {
  const int devices = 4;
  const int iterators = 3;
  const int line = __LINE__ + 2;
  auto fn = [&] {
    MPU_CHECK(iterators == devices, "MultiprocessParallelUpdater: ", iterators, " iterators for ",
              devices, " devices");
  };
  REQUIRE_THROWS_AS(fn(), mpu::InvalidArgument);
  const std::string msg = message_of(fn);
  CHECK(msg == "[tests/test_error.cpp:" + std::to_string(line) +
                   "] MultiprocessParallelUpdater: 3 iterators for 4 devices"
                   " (check `iterators == devices` failed)");
  CHECK_NOTHROW([&] { MPU_CHECK(devices == 4, "never"); }());
}

TEST_CASE("The exception tree: Timeout is a CommError is an Error", "[error]") {
  CHECK_THROWS_AS(MPU_THROW(mpu::Timeout, "reduce #7 took longer than ", 5, " s"), mpu::CommError);
  CHECK_THROWS_AS(MPU_THROW(mpu::CommError, "x"), mpu::Error);
  CHECK_THROWS_AS(MPU_THROW(mpu::InvalidArgument, "x"), std::runtime_error);
  CHECK_THROWS_WITH(MPU_THROW(mpu::Timeout, "reduce #7 took longer than ", 5, " s"),
                    Catch::Matchers::EndsWith("] reduce #7 took longer than 5 s"));
  CHECK_THROWS_WITH(MPU_THROW(mpu::Timeout, "x"),
                    Catch::Matchers::StartsWith("[tests/test_error.cpp:"));
}

TEST_CASE("detail::where shortens paths to the project directory", "[error]") {
  CHECK(mpu::detail::where("/home/me/src/torch-mpu/src/flat_buffer.cpp", 12) ==
        "[src/flat_buffer.cpp:12] ");
  CHECK(mpu::detail::where("elsewhere.cpp", 3) == "[elsewhere.cpp:3] ");
}

#if defined(MPU_TEST_HAVE_CUDA_HEADERS)
TEST_CASE("MPU_CUDA_CHECK names the call and CUDA's error name and text", "[error]") {
  const int line = __LINE__ + 1;
  auto fn = [] { MPU_CUDA_CHECK(cudaErrorInvalidValue); };
  REQUIRE_THROWS_AS(fn(), mpu::Error);
  CHECK(message_of(fn) == "[tests/test_error.cpp:" + std::to_string(line) +
                              "] CUDA error cudaErrorInvalidValue (invalid argument) in "
                              "`cudaErrorInvalidValue`");
  CHECK_NOTHROW([] { MPU_CUDA_CHECK(cudaSuccess); }());
}

TEST_CASE("MPU_NCCL_CHECK throws CommError with NCCL's error text", "[error]") {
  auto fn = [] { MPU_NCCL_CHECK(ncclInvalidArgument); };
  REQUIRE_THROWS_AS(fn(), mpu::CommError);
  const std::string msg = message_of(fn);
  CHECK_THAT(msg, Catch::Matchers::StartsWith("[tests/test_error.cpp:"));
  CHECK_THAT(msg, Catch::Matchers::Contains("NCCL error ncclResult 4 (invalid argument"));
  CHECK_THAT(msg, Catch::Matchers::EndsWith("in `ncclInvalidArgument`"));
  CHECK_NOTHROW([] { MPU_NCCL_CHECK(ncclSuccess); }());
}
#else
TEST_CASE("MPU_CUDA_CHECK and MPU_NCCL_CHECK messages", "[error][cuda]") {
  WARN("skipped: the CUDA toolkit and NCCL headers were not found at configure time");
}
#endif
