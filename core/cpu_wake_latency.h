// Holds how long an idle CPU may take to wake, while a process serves (Linux PM QoS).
#pragma once
#include <string>

namespace moemesh {

// While one lives, the kernel keeps every idle core in idle states that wake within `max_us`
// microseconds: PM QoS keeps the lowest limit that any holder of /dev/cpu_dma_latency wrote, for
// as long as that holder keeps the file open (here: until the destructor, or the process's exit).
// 0 keeps idle cores polling instead of halting: the fastest wake-up, at the cost of the power an
// idle core would save. Why it matters: a cluster wakes a blocked thread at every hand-off of a
// step, and on a virtual machine whose idle cores halt (cpuidle haltpoll with guest polling off),
// waking a halted core goes through the hypervisor. On the machine of docs/performance.md a pipe
// round trip between two processes took 40-55 µs with the cores halting and 6-9 µs with the
// limit at 0; one request at a time, inter-token latency fell from 1.1-1.4 ms to 0.74-0.84 ms.
class CpuWakeLatencyHold {
 public:
  // Throws Error naming the device and the reason (writing it needs root, or write access to it).
  explicit CpuWakeLatencyHold(int max_us, const std::string& device = "/dev/cpu_dma_latency");
  ~CpuWakeLatencyHold();
  CpuWakeLatencyHold(const CpuWakeLatencyHold&) = delete;
  CpuWakeLatencyHold& operator=(const CpuWakeLatencyHold&) = delete;

  int max_us() const { return max_us_; }

 private:
  int fd_ = -1;
  int max_us_;
};

}  // namespace moemesh
