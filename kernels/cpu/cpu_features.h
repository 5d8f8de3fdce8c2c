// Which SIMD kernels this CPU runs: detected once from CPUID, overridable for tests and
// comparisons (MOEMESH_CPU_ISA=portable|avx2|avx512|avx512bf16, or force_isa).
#pragma once
#include <string_view>
#include <vector>

namespace moemesh::cpu {

enum class Isa {
  Portable,  // plain C++ (what the compiler vectorises for the baseline target)
  Avx2,      // AVX2 + FMA + F16C
  Avx512,    // AVX-512 F/BW/VL (+ F16C)
  Avx512Bf16,  // the same + AVX512-BF16 (bf16 dot products for BF16 weights)
};

std::string_view isa_name(Isa isa);
// The best ISA this CPU supports.
Isa detected_isa();
// Every ISA this CPU can run, Portable first.
std::vector<Isa> runnable_isas();
// What the kernels use now: detected_isa(), or MOEMESH_CPU_ISA if set (lowered to what the CPU
// supports), or what force_isa set last.
Isa active_isa();
// Throws moemesh::Error when this CPU cannot run `isa`.
void force_isa(Isa isa);
// "portable", "avx2", "avx512" or "avx512bf16"; anything else is a moemesh::Error naming the choices.
Isa parse_isa(std::string_view name);

}  // namespace moemesh::cpu
