// The CUDA ComputeBackend (core/compute_backend.h): the model's work on one GPU with the kernels
// of kernels/cuda. Plain C++ header (no CUDA types), so core/backend_factory.cpp includes it.
//
// - Weights: each Weight is uploaded on first use (keyed by its host address) and kept.
// - KV: make_kv_cache returns a cache whose blocks live in one preallocated device pool
//   (f32 or INT8 + scales); the block tables stay on the host (KvCache's bookkeeping).
// - Scratch: device buffers grow to the largest step seen and are reused (no cudaMalloc in a
//   step once the largest batch has run).
// - Lanes: each call takes a free lane (its own stream, cuBLAS handle and scratch; made when none
//   is free, then reused), so calls from several threads (the engine's two micro-batches) run
//   side by side on the device, one's copies overlapping the other's kernels. Each call
//   synchronises its lane's stream before returning host rows.
#pragma once
#include <memory>

#include "core/compute_backend.h"

namespace moemesh {

// Throws moemesh::Error "no CUDA device: ..." when device `index` is not usable.
std::shared_ptr<ComputeBackend> make_cuda_backend(int index);

}  // namespace moemesh
