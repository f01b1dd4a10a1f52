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

// The same on 8 lanes: without AVX-512, GCC keeps a 16-lane vector in memory (no register holds one) and a hot
// loop over them runs through loads and stores, so such loops there use 8-lane halves.
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
inline vec8 load8(const float* p) { return *reinterpret_cast<const vec8*>(p); }
inline vec8 load8(const uint16_t* p) {
  return (vec8)(__builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16);
}
inline void store8(float* p, vec8 v) { *reinterpret_cast<vec8*>(p) = v; }

// The lanes of 16 given as halves (lanes 0-7, 8-15), lanes j and j + width added for width 8, 4, 2, 1: a fixed tree.
inline float sum_halves(vec8 low, vec8 high) {
  const vec8 s8 = low + high;
  const vec4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// The two 8-lane halves of 16 lanes, and back.
inline vec8 low_half(vec16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
inline vec8 high_half(vec16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
inline vec16 join(vec8 low, vec8 high) {
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

inline float sum16(vec16 v) { return sum_halves(low_half(v), high_half(v)); }

// e^x lane by lane (V: vec8 or vec16), within ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
// series to r^6, times 2^n put into the exponent bits. Inputs below -87 give e^-87 (~1.6e-38, where a softmax
// weight is nothing beside its largest, which is 1).
template <typename V>
inline V exp_lanes(V x) {
  typedef int32_t I __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V shifter = V{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts, exact product first
  V p = V{} + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I scale = (__builtin_convertvector(n, I) + 127) << 23;
  return p * (V)scale;
}

// Without AVX-512 GCC turns a select (a < b ? a : b) on 16 lanes into 16 scalar compares and blends, so there
// the 16-lane helpers below work on the 8-lane halves AVX2 selects in one instruction: the same operations on
// every lane, so the same bits. (Built for x86-64-v3, the scalar selects made the paged attention 3.4x and
// SiLU 4.8x slower at batch 64.)

// e^x for 16 lanes: shared by the paged attention's softmax (where the scalar std::exp took most of a decode
// row's time) and SiLU.
inline vec16 exp16(vec16 x) {
#if defined(__AVX512F__)
  return exp_lanes(x);
#else
  return join(exp_lanes(low_half(x)), exp_lanes(high_half(x)));
#endif
}

// Lane by lane, a > b ? a : b.
inline vec16 max16(vec16 a, vec16 b) {
#if defined(__AVX512F__)
  return a > b ? a : b;
#else
  const vec8 low = low_half(a) > low_half(b) ? low_half(a) : low_half(b);
  const vec8 high = high_half(a) > high_half(b) ? high_half(a) : high_half(b);
  return join(low, high);
#endif
}

}  // namespace kvserve
