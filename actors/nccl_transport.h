// NCCL send/recv of dispatch payloads between one attention worker and one expert host. The
// unique id is made by one side (nccl_unique_id) and reaches the other over ZeroMQ through the
// coordinator; both then construct the transport (make_nccl_transport).
// The payloads are host rows today (the ComputeBackend interface returns host memory), so each
// side stages them through device buffers; docs/gpu.md says what is left.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "actors/transport.h"

namespace moemesh {

// A fresh ncclUniqueId as bytes (NCCL_UNIQUE_ID_BYTES), to carry over ZeroMQ.
std::string nccl_unique_id();

// Rank 0 or 1 of the pair on CUDA device `device`. Waits for the peer to join for at most
// `join_timeout` (non-blocking init polled, aborted on timeout). Throws moemesh::Error ("no CUDA
// device: ..." without a device; "transport nccl: the peer did not join within N s"; an NCCL
// error otherwise). The transport is safe to use from several threads; its send never waits
// for the receiver (the payload is queued on the GPU before the header goes out), and each
// direction has a communicator of its own, so payloads in flight one way never hold up the other.
std::unique_ptr<actors::Transport> make_nccl_transport(const std::string& unique_id, int rank, int device,
                                                       std::chrono::milliseconds join_timeout);

// make_nccl_transport on `device`, as NcclPairOptions::join calls it.
inline auto nccl_join_on(int device) {
  return [device](const std::string& id, int rank, std::chrono::milliseconds timeout) {
    return std::shared_ptr<actors::Transport>(make_nccl_transport(id, rank, device, timeout));
  };
}

}  // namespace moemesh
