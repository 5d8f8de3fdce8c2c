// Builds the ComputeBackend named by `--device` (its own library, moemesh_backend, because the
// CUDA backend depends on moemesh_core and the CUDA kernels).
#pragma once
#include <memory>

#include "core/compute_backend.h"

namespace moemesh {

// cpu: the reference backend. cuda[:N]: the CUDA backend on device N; without a usable device
// (no driver, no GPU, N out of range, or a build without CUDA) a moemesh::Error that starts
// with "no CUDA device: " and says why.
std::shared_ptr<ComputeBackend> make_compute_backend(const DeviceSpec& device);

}  // namespace moemesh
