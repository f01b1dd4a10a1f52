// RMSNorm on the CPU, one row at a time: y = x / sqrt(mean(x^2) + eps) * w, in fp32.
//
// PyTorch 2.13's CPU rms_norm is five elementwise passes and a reduction (8 µs for one 576-float row, 90 µs
// for 64 rows of a bf16 model, which also casts in and out): 61 of them made 8% of a decode step. Here a
// row is read twice and written once, with its sum of squares in a fixed order (so a row's result does not
// depend on the rows beside it). bf16 rows (a bf16 model's) are normalised in fp32, rounded to bf16, then
// scaled by the bf16 weight and rounded again, as the model's PyTorch code does.
//
// Built and loaded by engine/native.py (plain C ABI through ctypes; threads from PyTorch's pool).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));

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
inline float sum16(vec16 v) {
  const vec8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

template <typename T>
void rms_norm(T* out, const T* x, const T* weight, int64_t rows, int64_t dim, float eps) {
  // Small rows: a parallel region costs more than it saves below a few thousand floats.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* in = x + row * dim;
      T* o = out + row * dim;
      vec16 acc = {};
      int64_t i = 0;
      for (; i + 16 <= dim; i += 16) {
        vec16 v;
        for (int j = 0; j < 16; ++j) v[j] = to_float(in[i + j]);
        acc += v * v;
      }
      float tail = 0.0f;
      for (; i < dim; ++i) tail += to_float(in[i]) * to_float(in[i]);
      const float inv = 1.0f / std::sqrt((sum16(acc) + tail) / static_cast<float>(dim) + eps);
      for (int64_t k = 0; k < dim; ++k) {
        const float normed = to_float(in[k]) * inv;
        if constexpr (sizeof(T) == 2) {
          o[k] = to_bf16(to_float(to_bf16(normed)) * to_float(weight[k]));
        } else {
          o[k] = normed * weight[k];
        }
      }
    }
  });
}

}  // namespace

extern "C" void kvserve_rms_norm_f32(float* out, const float* x, const float* weight, int64_t rows, int64_t dim,
                                     float eps) {
  rms_norm(out, x, weight, rows, dim, eps);
}

extern "C" void kvserve_rms_norm_bf16(uint16_t* out, const uint16_t* x, const uint16_t* weight, int64_t rows,
                                      int64_t dim, float eps) {
  rms_norm(out, x, weight, rows, dim, eps);
}
