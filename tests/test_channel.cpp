// The worker channel (src/process/channel.h): frames round-trip, and a frame header that cannot
// be trusted is refused by name before anything is allocated.
#include "catch_torch.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "mpu/error.h"
#include "process/channel.h"

namespace {

using Catch::Matchers::Contains;
using mpu::detail::Channel;
using mpu::detail::MessageType;

struct Pair {
  Channel a;
  Channel b;
};

Pair socket_pair() {
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  return Pair{Channel(fds[0], "test channel a"), Channel(fds[1], "test channel b")};
}

// Writes a raw frame header (type byte, 8-byte length) to `fd`, bypassing Channel::send.
void write_header(int fd, std::uint8_t type, std::uint64_t length) {
  char header[9];
  header[0] = static_cast<char>(type);
  std::memcpy(header + 1, &length, sizeof length);
  REQUIRE(::write(fd, header, sizeof header) == static_cast<ssize_t>(sizeof header));
}

// The message of the CommError `fn` throws, or a text saying what happened instead.
template <typename Fn>
std::string comm_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const mpu::CommError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a CommError: ") + e.what();
  }
  return "nothing was thrown";
}

}  // namespace

TEST_CASE("Channel: frames round-trip, empty and binary payloads included", "[channel]") {
  Pair p = socket_pair();
  const std::string binary("a\0b\xff", 4);
  p.a.send(MessageType::kUpdate);
  p.a.send(MessageType::kLoadState, binary);
  auto first = p.b.receive();
  REQUIRE(first);
  CHECK(first->type == MessageType::kUpdate);
  CHECK(first->payload.empty());
  CHECK(p.b.receive(MessageType::kLoadState, "the test's state") == binary);
  p.a.close();
  CHECK_FALSE(p.b.receive());  // a clean end of stream between frames
}

// Before the channel, the master and worker read an untrusted uint64 length and allocated it:
// a corrupt header meant std::bad_alloc (or a huge allocation), not an error naming the frame.
TEST_CASE("Channel: a frame longer than kMaxChannelMessageBytes is refused, naming both",
          "[channel]") {
  Pair p = socket_pair();
  const std::uint64_t huge = std::uint64_t{1} << 62;
  write_header(p.a.fd(), static_cast<std::uint8_t>(MessageType::kIteratorState), huge);
  CHECK_THAT(comm_error_of([&] { (void)p.b.receive(); }),
             Contains("test channel b: the iterator state "
                      "message claims " +
                      std::to_string(huge) + " bytes") &&
                 Contains(std::to_string(mpu::detail::kMaxChannelMessageBytes)) &&
                 Contains("kMaxChannelMessageBytes"));
}

TEST_CASE("Channel: an unknown type, a cut header or a cut payload is a CommError", "[channel]") {
  SECTION("unknown type") {
    Pair p = socket_pair();
    write_header(p.a.fd(), 200, 3);
    CHECK_THAT(comm_error_of([&] { (void)p.b.receive(); }), Contains("unknown message type 200"));
  }
  SECTION("cut header") {
    Pair p = socket_pair();
    REQUIRE(::write(p.a.fd(), "\x02\x01", 2) == 2);
    p.a.close();
    CHECK_THAT(comm_error_of([&] { (void)p.b.receive(); }),
               Contains("the stream ended inside a message header (2 of 9"));
  }
  SECTION("cut payload") {
    Pair p = socket_pair();
    write_header(p.a.fd(), static_cast<std::uint8_t>(MessageType::kError), 10);
    REQUIRE(::write(p.a.fd(), "abc", 3) == 3);
    p.a.close();
    CHECK_THAT(comm_error_of([&] { (void)p.b.receive(); }),
               Contains("the stream ended inside the error message (3 of 10 bytes)"));
  }
  SECTION("sending to a closed peer") {
    Pair p = socket_pair();
    p.b.close();
    CHECK_THAT(comm_error_of([&] { (void)p.a.send(MessageType::kUpdate); }),
               Contains("test channel a: sending the update"));
    CHECK_FALSE(p.a.try_send(MessageType::kUpdate));
  }
}
