// The framed message channel between a MultiprocessParallelUpdater's master and each of its
// workers, over one end of a Unix socket pair.
//
// A frame is a one-byte MessageType, an 8-byte payload length (host order: both ends are forks
// of one process) and the payload. A length above kMaxChannelMessageBytes, or an unknown type,
// is refused with CommError before anything is allocated: the socket is trusted no further
// than the frame header.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace mpu::detail {

/// Master -> worker: kRendezvous (NCCL unique id, or the TCPStore port), kUpdate, kLoadState
/// (iterator state, then optimizer state, then the iteration: three frames), kIteratorState
/// (send yours), kGatherState (join the gather of the sharded optimizer state), kFinish, kAbort
/// (finish without finalising the communicator: the master is failing and aborted its own).
/// Worker -> master: kIteratorState replies, and kError with its text before it exits.
enum class MessageType : std::uint8_t {
  kRendezvous = 1,
  kUpdate,
  kLoadState,
  kIteratorState,
  kGatherState,
  kFinish,
  kAbort,
  kError,
};

/// "rendezvous", "update", ...; "unknown" for a value outside the enum.
const char* to_string(MessageType type);

/// The largest payload a frame may carry: 4 GiB, above the largest message, the optimizer
/// state that load() sends (fp32 Adam state of a model of about 500 M parameters).
inline constexpr std::uint64_t kMaxChannelMessageBytes = std::uint64_t{1} << 32;

struct Message {
  MessageType type = MessageType::kError;
  std::string payload;
};

/// Owns one socket end. Move-only; the destructor closes it and never throws. Errors are
/// CommError naming the channel (`name`, e.g. "worker 2 channel"), the message and errno.
class Channel {
 public:
  Channel() = default;
  Channel(int fd, std::string name) noexcept;
  ~Channel();
  Channel(Channel&& other) noexcept;
  Channel& operator=(Channel&& other) noexcept;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  int fd() const { return fd_; }
  bool is_open() const { return fd_ >= 0; }

  /// Sends one frame; CommError when the peer is gone or the payload is too long.
  void send(MessageType type, const std::string& payload = {});
  /// Sends one frame and reports failure instead of throwing: for the way out.
  bool try_send(MessageType type, const std::string& payload = {}) noexcept;
  /// Receives one frame; nullopt on a clean end of stream before a frame starts. CommError on a
  /// frame cut short, an unknown type or a length above kMaxChannelMessageBytes.
  std::optional<Message> receive();
  /// Receives one frame, expecting `type`; CommError naming both otherwise.
  std::string receive(MessageType type, const char* why);
  /// True when a frame (or the end of stream) can be read within `wait`.
  bool readable(std::chrono::milliseconds wait) const;

  /// Stops sending (the peer reads end of stream); receiving still works.
  void shutdown_write() noexcept;
  void close() noexcept;

 private:
  int fd_ = -1;
  std::string name_;
};

}  // namespace mpu::detail
