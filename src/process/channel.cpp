#include "process/channel.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "misc/io.h"
#include "mpu/error.h"

namespace mpu::detail {
namespace {

constexpr std::size_t kHeaderBytes = 1 + sizeof(std::uint64_t);

bool is_known(std::uint8_t type) {
  return type >= static_cast<std::uint8_t>(MessageType::kRendezvous) &&
         type <= static_cast<std::uint8_t>(MessageType::kError);
}

// Reads exactly `n` bytes. Returns the bytes read before the stream ended (n when complete);
// throws CommError on a read error, naming it.
std::size_t read_all(int fd, void* data, std::size_t n, const std::string& name, const char* what) {
  char* p = static_cast<char*>(data);
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r = ::recv(fd, p + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) break;
    if (r < 0) {
      const int err = errno;
      MPU_THROW(CommError, name, ": reading ", what, " failed after ", got, " of ", n,
                " bytes: ", std::strerror(err));
    }
    got += static_cast<std::size_t>(r);
  }
  return got;
}

}  // namespace

const char* to_string(MessageType type) {
  switch (type) {
    case MessageType::kRendezvous:
      return "rendezvous";
    case MessageType::kUpdate:
      return "update";
    case MessageType::kLoadState:
      return "load state";
    case MessageType::kIteratorState:
      return "iterator state";
    case MessageType::kGatherState:
      return "gather state";
    case MessageType::kFinish:
      return "finish";
    case MessageType::kAbort:
      return "abort";
    case MessageType::kError:
      return "error";
  }
  return "unknown";
}

Channel::Channel(int fd, std::string name) noexcept : fd_(fd), name_(std::move(name)) {}

Channel::~Channel() {
  close();
}

Channel::Channel(Channel&& other) noexcept : fd_(other.fd_), name_(std::move(other.name_)) {
  other.fd_ = -1;
}

Channel& Channel::operator=(Channel&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = other.fd_;
    name_ = std::move(other.name_);
    other.fd_ = -1;
  }
  return *this;
}

void Channel::send(MessageType type, const std::string& payload) {
  MPU_CHECK(payload.size() <= kMaxChannelMessageBytes, name_, ": the ", to_string(type),
            " message of ", payload.size(), " bytes is above the limit of ",
            kMaxChannelMessageBytes, " bytes (kMaxChannelMessageBytes)");
  char header[kHeaderBytes];
  header[0] = static_cast<char>(type);
  const std::uint64_t length = payload.size();
  std::memcpy(header + 1, &length, sizeof length);
  int err = write_all(fd_, header, sizeof header);
  if (err == 0) err = write_all(fd_, payload.data(), payload.size());
  if (err != 0) {
    MPU_THROW(CommError, name_, ": sending the ", to_string(type), " message (", payload.size(),
              " bytes) failed: ", std::strerror(err));
  }
}

bool Channel::try_send(MessageType type, const std::string& payload) noexcept {
  try {
    send(type, payload);
    return true;
  } catch (...) {
    return false;
  }
}

std::optional<Message> Channel::receive() {
  char header[kHeaderBytes];
  const std::size_t got = read_all(fd_, header, sizeof header, name_, "a message header");
  if (got == 0) return std::nullopt;
  if (got < sizeof header) {
    MPU_THROW(CommError, name_, ": the stream ended inside a message header (", got, " of ",
              sizeof header, " bytes)");
  }
  const auto type = static_cast<std::uint8_t>(header[0]);
  std::uint64_t length = 0;
  std::memcpy(&length, header + 1, sizeof length);
  if (!is_known(type)) {
    MPU_THROW(CommError, name_, ": unknown message type ", static_cast<int>(type),
              " (payload length ", length, ")");
  }
  Message message;
  message.type = static_cast<MessageType>(type);
  if (length > kMaxChannelMessageBytes) {
    MPU_THROW(CommError, name_, ": the ", to_string(message.type), " message claims ", length,
              " bytes, above the limit of ", kMaxChannelMessageBytes,
              " bytes (kMaxChannelMessageBytes); the stream is corrupt");
  }
  message.payload.resize(static_cast<std::size_t>(length));
  const std::size_t body =
      read_all(fd_, message.payload.data(), message.payload.size(), name_, "a message payload");
  if (body < message.payload.size()) {
    MPU_THROW(CommError, name_, ": the stream ended inside the ", to_string(message.type),
              " message (", body, " of ", length, " bytes)");
  }
  return message;
}

std::string Channel::receive(MessageType type, const char* why) {
  std::optional<Message> message = receive();
  if (!message) {
    MPU_THROW(CommError, name_, ": the stream ended while waiting for the ", to_string(type),
              " message (", why, ")");
  }
  if (message->type != type) {
    MPU_THROW(CommError, name_, ": expected a ", to_string(type), " message (", why, "), got the ",
              to_string(message->type), " message");
  }
  return std::move(message->payload);
}

bool Channel::readable(std::chrono::milliseconds wait) const {
  pollfd p{fd_, POLLIN, 0};
  int ready = 0;
  do {
    ready = ::poll(&p, 1, static_cast<int>(wait.count()));
  } while (ready < 0 && errno == EINTR);
  return ready > 0;
}

void Channel::shutdown_write() noexcept {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
}

void Channel::close() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace mpu::detail
