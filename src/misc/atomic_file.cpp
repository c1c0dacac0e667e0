#include "misc/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "misc/io.h"
#include "misc/log.h"
#include "mpu/error.h"

namespace mpu::detail {
namespace {

std::string errno_text(int err) {
  return cat(std::strerror(err), " (errno ", err, ")");
}

// Owns the temporary file until it has been renamed.
class TempFile {
 public:
  TempFile(const std::string& dir, const std::string& name, const std::string& what) {
    std::string templ = (std::filesystem::path(dir) / ("." + name + ".tmp-XXXXXX")).string();
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    fd_ = ::mkstemp(buf.data());
    if (fd_ < 0) {
      const int err = errno;
      MPU_THROW(Error, what, ": cannot create a temporary file in '", dir, "' to write '", name,
                "': ", errno_text(err));
    }
    path_ = buf.data();
    // mkstemp creates 0600; a snapshot or log is as readable as any other output file.
    (void)::fchmod(fd_, 0644);
  }
  ~TempFile() noexcept {
    if (fd_ >= 0) ::close(fd_);
    if (!path_.empty() && ::unlink(path_.c_str()) != 0 && errno != ENOENT) {
      MPU_LOG_WARN("could not remove the temporary file '", path_, "': ", errno_text(errno));
    }
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  void close(const std::string& what) {
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      const int err = errno;
      MPU_THROW(Error, what, ": closing '", path_, "' failed: ", errno_text(err));
    }
  }
  // After a successful rename there is nothing left to remove.
  void release() { path_.clear(); }

 private:
  int fd_ = -1;
  std::string path_;
};

void write_all(int fd, const void* data, std::size_t size, const std::string& path,
               const std::string& what) {
  if (const int err = detail::write_all(fd, data, size); err != 0) {
    MPU_THROW(Error, what, ": writing '", path, "' failed: ", errno_text(err));
  }
}

}  // namespace

void write_file_atomically(const std::string& path, const std::string& what,
                           const std::function<void(const ByteWriter&)>& fill) {
  const std::filesystem::path target(path);
  MPU_CHECK(target.has_filename(), what, ": '", path, "' names no file");
  std::string dir = target.parent_path().string();
  if (dir.empty()) dir = ".";
  TempFile tmp(dir, target.filename().string(), what);
  fill([&](const void* data, std::size_t size) {
    write_all(tmp.fd(), data, size, tmp.path(), what);
  });
  if (::fsync(tmp.fd()) != 0) {
    const int err = errno;
    MPU_THROW(Error, what, ": fsync of '", tmp.path(), "' failed: ", errno_text(err));
  }
  tmp.close(what);
  if (std::rename(tmp.path().c_str(), path.c_str()) != 0) {
    const int err = errno;
    MPU_THROW(Error, what, ": renaming '", tmp.path(), "' to '", path,
              "' failed: ", errno_text(err));
  }
  tmp.release();
  // The rename is durable only once the directory entry is on disk. A failure here loses no
  // data the caller can act on, so it is a warning.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || ::fsync(dfd) != 0) {
    MPU_LOG_WARN(what, ": fsync of directory '", dir, "' failed: ", errno_text(errno));
  }
  if (dfd >= 0) ::close(dfd);
}

void write_file_atomically(const std::string& path, const std::string& what,
                           const std::string& content) {
  write_file_atomically(path, what,
                        [&](const ByteWriter& write) { write(content.data(), content.size()); });
}

}  // namespace mpu::detail
