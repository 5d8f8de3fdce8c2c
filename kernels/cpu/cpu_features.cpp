#include "kernels/cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace moemesh::cpu {
namespace {

constexpr Isa kAll[] = {Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16};  // each a superset of the last

bool supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Portable:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return supports(Isa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    case Isa::Avx512Bf16:
      return supports(Isa::Avx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::Portable;
#endif
}

Isa initial_isa() {
  Isa isa = detected_isa();
  if (const char* env = std::getenv("MOEMESH_CPU_ISA")) {
    try {
      const Isa want = parse_isa(env);
      if (supports(want)) isa = want;
    } catch (const Error&) {
      // An unknown name keeps the detected ISA; the kernels must still run.
    }
  }
  return isa;
}

std::atomic<Isa>& current() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::Portable:
      return "portable";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx512Bf16:
      return "avx512bf16";
  }
  return "?";
}

Isa parse_isa(std::string_view name) {
  for (Isa isa : kAll)
    if (name == isa_name(isa)) return isa;
  throw Error("unknown CPU ISA \"" + std::string(name) + "\" (expected portable, avx2, avx512 or avx512bf16)");
}

Isa detected_isa() {
  static const Isa best = runnable_isas().back();
  return best;
}

std::vector<Isa> runnable_isas() {
  std::vector<Isa> out;
  for (Isa isa : kAll)
    if (supports(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() { return current().load(std::memory_order_relaxed); }

void force_isa(Isa isa) {
  if (!supports(isa)) throw Error("this CPU cannot run the " + std::string(isa_name(isa)) + " kernels");
  current().store(isa, std::memory_order_relaxed);
}

}  // namespace moemesh::cpu
