// The rendezvous store: a TCPStore server, or a client of one.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <string>

#include "comm/communicator_detail.h"
#include "mpu/error.h"
#include "mpu/launch.h"

namespace mpu {
namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

StoreServer serve_store(int port, std::chrono::milliseconds timeout) {
  MPU_CHECK(port >= 0 && port <= 65535, "serve_store: port ", port, " is out of range");
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = true;
  options.waitWorkers = false;
  options.timeout = timeout;
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
    const int bound = store->getPort();
    return StoreServer{store, bound};
  } catch (const std::exception& e) {
    MPU_THROW(CommError, "serve_store: could not start a TCPStore server on port ", port, ": ",
              detail::exception_text(e));
  }
}

StorePtr connect_store(const std::string& host, int port, std::chrono::milliseconds timeout) {
  MPU_CHECK(port > 0 && port <= 65535, "connect_store: port ", port, " is out of range");
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = false;
  options.timeout = timeout;
  const auto start = Clock::now();
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  } catch (const std::exception& e) {
    const std::string why = detail::exception_text(e);
    if (Clock::now() - start >= timeout * 9 / 10) {
      MPU_THROW(Timeout, "connect_store: no TCPStore server answered at ", host, ":", port,
                " within ", detail::seconds_text(timeout), ": ", why);
    }
    MPU_THROW(CommError, "connect_store: could not connect to the TCPStore at ", host, ":", port,
              ": ", why);
  }
}

}  // namespace mpu
