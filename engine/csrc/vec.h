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

// e^x for 16 lanes, within ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^6,
// times 2^n put into the exponent bits. Inputs below -87 give e^-87 (~1.6e-38, where a softmax weight is
// nothing beside its largest, which is 1). Shared by the paged attention's softmax (where the scalar std::exp
// took most of a decode row's time) and SiLU.
inline vec16 exp16(vec16 x) {
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  const vec16 lo = vec16{} - 87.0f, hi = vec16{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec16 shifter = vec16{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vec16 n = (x * 1.44269504088896341f + shifter) - shifter;
  const vec16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts, exact product first
  vec16 p = vec16{} + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32x16 scale = (__builtin_convertvector(n, i32x16) + 127) << 23;
  return p * (vec16)scale;
}

}  // namespace kvserve
