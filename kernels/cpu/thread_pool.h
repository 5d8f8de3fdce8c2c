// The process's compute threads: one persistent pool that every CPU kernel splits its work over.
//
// parallel_for hands out task indices to the pool's workers and to the calling thread, which
// works too, so a pool of N threads keeps N cores busy with N-1 workers. Several threads may
// call parallel_for at once (two micro-batches, an expert host's batches, a kernel inside a
// task): each call is a section of its own, workers help whichever has work left, and every
// caller finishes its own section, so nesting cannot deadlock. Idle workers spin briefly (the
// next kernel of a step usually follows within microseconds), then sleep on a futex, so a
// waiting process does not take cores from its neighbours in a local cluster.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

namespace moemesh::cpu {

// Threads computing, the caller included. Default: the CPUs this process may run on
// (sched_getaffinity), or MOEMESH_COMPUTE_THREADS when set.
int compute_threads();
// Resizes the pool (n >= 1; 1 computes on the calling thread only). Call at start-up, not while
// kernels run. Throws moemesh::Error for n < 1.
void set_compute_threads(int n);

namespace detail {
void run_section(int64_t n, void (*call)(void*, int64_t), void* ctx);
}

// Runs fn(i) for every i in [0, n), in any order and on any of the pool's threads; returns when
// all have returned. fn must not throw.
template <class Fn>
void parallel_for(int64_t n, Fn&& fn) {
  using F = std::remove_reference_t<Fn>;
  detail::run_section(
      n, [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); }, const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace moemesh::cpu
