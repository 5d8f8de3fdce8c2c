#include "core/cpu_wake_latency.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "core/error.h"

namespace moemesh {

CpuWakeLatencyHold::CpuWakeLatencyHold(int max_us, const std::string& device) : max_us_(max_us) {
  if (max_us < 0) throw Error("CPU wake-up latency limit must be >= 0 µs, got " + std::to_string(max_us));
  fd_ = ::open(device.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd_ < 0)
    throw Error("cannot open " + device + " to hold the CPU wake-up latency: " + std::strerror(errno) +
                (errno == EACCES || errno == EPERM ? " (it needs root, or write access to it)" : ""));
  // The device takes the limit as a binary 32-bit integer.
  const int32_t value = max_us;
  if (::write(fd_, &value, sizeof value) != ssize_t(sizeof value)) {
    const int e = errno;
    ::close(fd_);
    fd_ = -1;
    throw Error("cannot write " + device + ": " + std::strerror(e));
  }
}

CpuWakeLatencyHold::~CpuWakeLatencyHold() {
  if (fd_ >= 0) ::close(fd_);  // the kernel drops this holder's limit with the file
}

}  // namespace moemesh
