// `--device` parsing and the backend factory, on any machine: cpu is the reference backend, and a
// CUDA device that is not there is a clear "no CUDA device: ..." error, never a crash.
#include <gtest/gtest.h>

#include <string>

#include "core/backend_factory.h"
#include "core/error.h"

using namespace moemesh;

TEST(ComputeBackend, ParsesDevices) {
  EXPECT_EQ(parse_device("cpu").kind, DeviceSpec::Kind::Cpu);
  EXPECT_EQ(parse_device("cuda").kind, DeviceSpec::Kind::Cuda);
  EXPECT_EQ(parse_device("cuda").index, 0);
  EXPECT_EQ(parse_device("cuda:3").index, 3);
  EXPECT_EQ(parse_device("cuda:3").str(), "cuda:3");
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:1x", "CPU", ""}) {
    try {
      parse_device(bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("expected cpu, cuda or cuda:N"), std::string::npos) << e.what();
    }
  }
}

TEST(ComputeBackend, CpuIsTheReferenceBackend) {
  const auto b = make_compute_backend(parse_device("cpu"));
  EXPECT_EQ(b, cpu_backend());
  EXPECT_EQ(b->name(), "cpu");
  auto kv = b->make_kv_cache(2, 8, 4, {KvDType::Int8, 2});
  EXPECT_EQ(kv->dtype(), KvDType::Int8);
}

// No machine has 100 GPUs: whether CUDA is built in or not, the answer is the same kind of error.
TEST(ComputeBackend, MissingCudaDeviceIsAClearError) {
  try {
    make_compute_backend(parse_device("cuda:99"));
    FAIL() << "cuda:99 gave a backend";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("no CUDA device: ", 0), 0u) << e.what();
  }
}
