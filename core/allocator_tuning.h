// Keeps a process's freed heap memory instead of handing it back to the kernel at once.
#pragma once

namespace moemesh {

// glibc returns the top of the heap to the kernel once more than M_TRIM_THRESHOLD is free, and
// serves allocations above M_MMAP_THRESHOLD from fresh mappings. A step allocates and frees
// megabytes of activations (logits alone are batch x vocab floats), so by default every step
// faults its memory in again (with transparent huge pages, 2 MiB zeroed per fault): measured at
// up to 2x a decode step's time. Raising both thresholds keeps that memory in the process; what a
// process holds then stays near its peak. Call once, first thing in main().
void keep_freed_memory();

}  // namespace moemesh
