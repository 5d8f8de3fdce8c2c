// Memory read bandwidth: the roofline that batch-1 decode is measured against (every active
// weight byte is read once per token, so tok/s <= read bandwidth / active bytes per token).
// A measurement, not a compute path: it starts its own threads.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moemesh::cpu {

// Sum of the n / 8 little-endian 64-bit words at p (unaligned is fine; a tail of n % 8 bytes is
// ignored), read with the widest vector loads this CPU has. Returning the sum keeps the reads
// from being optimised away; it also lets a caller check that every byte was read.
uint64_t read_sum(const void* p, size_t n);

struct ReadBandwidth {
  double bytes_per_s = 0;  // best repeat: buffer bytes / seconds
  double best_seconds = 0;
  size_t buffer_bytes = 0;
  int threads = 0;
  int repeats = 0;
};

// Fills a buffer of `bytes` (each thread first-touches its own slice), then `repeats` times has
// `threads` threads each read_sum their contiguous slice at once, timed from a common start to
// the last one's end. Throws moemesh::Error on bad arguments, a failed allocation, or a checksum
// that shows a byte was not read.
ReadBandwidth measure_read_bandwidth(size_t bytes, int threads, int repeats);

}  // namespace moemesh::cpu
