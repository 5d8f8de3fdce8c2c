// NCCL send/recv of dispatch payloads between one attention worker and one expert host (a
// two-rank communicator per peer pair). The unique id is made by one side (nccl_unique_id) and
// reaches the other over ZeroMQ through the coordinator; both then construct NcclTransport.
// The payloads are host rows today (the ComputeBackend interface returns host memory), so each
// side stages them through a device buffer; docs/gpu.md says what is left.
#pragma once
#include <memory>
#include <string>

#include "actors/transport.h"

namespace moemesh {

// A fresh ncclUniqueId as bytes (NCCL_UNIQUE_ID_BYTES), to carry over ZeroMQ.
std::string nccl_unique_id();

// rank 0 or 1 of the pair's communicator on CUDA device `device`; blocks until the peer joins.
// Throws moemesh::Error ("no CUDA device: ..." without a device; an NCCL error otherwise).
std::unique_ptr<actors::Transport> make_nccl_transport(const std::string& unique_id, int rank, int device);

}  // namespace moemesh
