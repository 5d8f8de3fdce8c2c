// CpuWakeLatencyHold: what it writes to the PM QoS device, that it lets go of it, and the errors
// it gives. A regular file stands in for /dev/cpu_dma_latency (the kernel reads the same 4 bytes).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/cpu_wake_latency.h"
#include "core/error.h"

using moemesh::CpuWakeLatencyHold;
namespace fs = std::filesystem;

namespace {

// Whether this process has `path` open (its /proc/self/fd links).
bool holds_open(const fs::path& path) {
  for (const auto& fd : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (fs::read_symlink(fd.path(), ec) == path) return true;
  }
  return false;
}

}  // namespace

TEST(CpuWakeLatencyHold, WritesTheLimitAsA32BitIntegerAndHoldsTheFileUntilDestroyed) {
  const fs::path device = fs::path(::testing::TempDir()) / "moemesh_fake_cpu_dma_latency";
  for (int limit : {0, 75}) {
    { std::ofstream(device).flush(); }
    {
      CpuWakeLatencyHold hold(limit, device.string());
      EXPECT_EQ(hold.max_us(), limit);
      EXPECT_TRUE(holds_open(device));  // the kernel keeps the limit only while the file is open
      std::ifstream in(device, std::ios::binary);
      int32_t written = -1;
      in.read(reinterpret_cast<char*>(&written), sizeof written);
      EXPECT_EQ(in.gcount(), std::streamsize(sizeof written));
      EXPECT_EQ(written, limit);
      EXPECT_EQ(fs::file_size(device), sizeof written);
    }
    EXPECT_FALSE(holds_open(device));  // destroyed: the limit is let go
  }
  fs::remove(device);
}

TEST(CpuWakeLatencyHold, ErrorsNameTheDeviceAndTheReason) {
  try {
    CpuWakeLatencyHold hold(0, "/nonexistent-moemesh/cpu_dma_latency");
    FAIL() << "opened a device that does not exist";
  } catch (const moemesh::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("/nonexistent-moemesh/cpu_dma_latency"), std::string::npos) << what;
    EXPECT_NE(what.find("No such file"), std::string::npos) << what;
  }
  try {
    CpuWakeLatencyHold hold(-1, "/dev/null");
    FAIL() << "took a negative limit";
  } catch (const moemesh::Error& e) {
    EXPECT_NE(std::string(e.what()).find(">= 0"), std::string::npos) << e.what();
  }
}
