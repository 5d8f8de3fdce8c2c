#include "core/backend_factory.h"

#include "core/error.h"
#ifdef MOEMESH_WITH_CUDA
#include "core/backends/cuda_backend.h"
#endif

namespace moemesh {

std::shared_ptr<ComputeBackend> make_compute_backend(const DeviceSpec& device) {
  if (device.kind == DeviceSpec::Kind::Cpu) return cpu_backend();
#ifdef MOEMESH_WITH_CUDA
  return make_cuda_backend(device.index);
#else
  throw Error("no CUDA device: this build has no CUDA backend (nvcc was not found when it was configured), " +
              device.str() + " cannot be used");
#endif
}

}  // namespace moemesh
