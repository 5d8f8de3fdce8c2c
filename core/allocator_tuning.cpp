#include "core/allocator_tuning.h"

#include <malloc.h>

namespace moemesh {

void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
}

}  // namespace moemesh
