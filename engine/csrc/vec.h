// Vector helpers the CPU kernels share: GCC vector types (one AVX-512 register, or two AVX2 ones, whatever
// -march gives), fp32/bf16 loads and conversions, and a lane sum in a fixed order.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvserve {

typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));

typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// Tensors hold fp32, or bf16 as its raw 16 bits (the top half of an fp32): read as fp32 either way.
inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16*>(p); }
inline vec16 load16(const uint16_t* p) {
  return (vec16)(__builtin_convertvector(*reinterpret_cast<const u16x16*>(p), u32x16) << 16);
}
inline float to_float(float x) { return x; }
inline float to_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &word, sizeof x);
  return x;
}
// Round to nearest even, as PyTorch's fp32 -> bf16 cast (inputs here are finite).
inline uint16_t to_bf16(float x) {
  uint32_t word;
  std::memcpy(&word, &x, sizeof word);
  return static_cast<uint16_t>((word + 0x7FFF + ((word >> 16) & 1)) >> 16);
}
inline void store16(float* p, vec16 v) { *reinterpret_cast<vec16*>(p) = v; }

// Lanes j and j + width added for width 8, 4, 2, 1: a fixed tree.
inline float sum16(vec16 v) {
  const vec8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

}  // namespace kvserve
