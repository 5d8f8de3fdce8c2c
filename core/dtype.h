// Element types of checkpoint tensors and the conversions the CPU kernels need.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace moemesh {

enum class DType : uint8_t { F32, F16, BF16, I8, I32, I64 };

size_t dtype_size(DType t);
// Safetensors spelling: "F32", "F16", "BF16", "I8", "I32", "I64".
std::string_view dtype_name(DType t);
// Throws moemesh::Error for an unknown name.
DType parse_dtype(std::string_view name);
// CLI / config spelling: "f32", "f16", "bf16" (also "float32", "float16", "bfloat16").
DType parse_float_dtype(std::string_view name);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);  // round to nearest even

// Converts n elements of type t at src to float.
void to_f32(DType t, const void* src, float* dst, size_t n);
// Converts n floats to type t (F32, F16 or BF16) at dst.
void from_f32(DType t, const float* src, void* dst, size_t n);

}  // namespace moemesh
