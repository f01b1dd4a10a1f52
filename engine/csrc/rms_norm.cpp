// RMSNorm on the CPU, one row at a time: y = x / sqrt(mean(x^2) + eps) * w, in fp32; optionally of a residual
// sum x + r, which it also writes (kvserve_add_rms_norm_*).
//
// PyTorch 2.13's CPU rms_norm is five elementwise passes and a reduction (8 µs for one 576-float row, 90 µs
// for 64 rows of a bf16 model, which also casts in and out): 61 of them made 8% of a decode step. Here a
// row is read twice and written once, with its sum of squares in a fixed order (so a row's result does not
// depend on the rows beside it). bf16 rows (a bf16 model's) are normalised in fp32, rounded to bf16, then
// scaled by the bf16 weight and rounded again, as the model's PyTorch code does.
//
// Built and loaded by engine/native.py (plain C ABI through ctypes; threads from PyTorch's pool).
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace kvserve;

// With `residual`, the row normalised is x + residual (rounded to T, as PyTorch's add would), which is also
// written to `sum`: a decoder layer's residual add and the next norm in one pass instead of two dispatches.
template <typename T>
void rms_norm(T* out, const T* x, const T* weight, int64_t rows, int64_t dim, float eps,
              const T* residual = nullptr, T* sum = nullptr) {
  // Small rows: a parallel region costs more than it saves below a few thousand floats.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* in = x + row * dim;
      T* o = out + row * dim;
      if (residual != nullptr) {
        T* s = sum + row * dim;
        const T* r = residual + row * dim;
        for (int64_t k = 0; k < dim; ++k) {
          if constexpr (sizeof(T) == 2) {
            s[k] = to_bf16(to_float(in[k]) + to_float(r[k]));
          } else {
            s[k] = in[k] + r[k];
          }
        }
        in = s;
      }
      // 16 lanes of squares, each summed in order, then across lanes by sum16's tree; as two 8-lane halves,
      // which stay in registers without AVX-512 too (vec.h), with the same sums
      vec8 low = {}, high = {};
      int64_t i = 0;
      for (; i + 16 <= dim; i += 16) {
        const vec8 a = load8(in + i), b = load8(in + i + 8);
        low += a * a;
        high += b * b;
      }
      float tail = 0.0f;
      for (; i < dim; ++i) tail += to_float(in[i]) * to_float(in[i]);
      const float inv = 1.0f / std::sqrt((sum_halves(low, high) + tail) / static_cast<float>(dim) + eps);
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

extern "C" void kvserve_add_rms_norm_f32(float* out, float* sum, const float* x, const float* residual,
                                         const float* weight, int64_t rows, int64_t dim, float eps) {
  rms_norm(out, x, weight, rows, dim, eps, residual, sum);
}

extern "C" void kvserve_add_rms_norm_bf16(uint16_t* out, uint16_t* sum, const uint16_t* x, const uint16_t* residual,
                                          const uint16_t* weight, int64_t rows, int64_t dim, float eps) {
  rms_norm(out, x, weight, rows, dim, eps, residual, sum);
}
