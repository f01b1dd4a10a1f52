// Elementwise steps of a decoder layer on the CPU, in fp32: SwiGLU's middle and the residual add.
//
// kvserve_silu_mul_f32: out = silu(gate) * up, with gate and up the two halves of each row of the fused
// gate_up projection's output (rows, 2 * width) -> (rows, width).
//
// In PyTorch that is a chunk, a silu and a mul: three dispatches and a temporary (11 µs a row at SmolLM2's
// width of 1536, 63 µs for 64 rows, 30 times a decode step); here one pass. silu(g) = g / (1 + e^-g) as
// PyTorch computes it, with exp16 (vec.h, within ~2 ulp) for the exponential, so within a few ulp of
// PyTorch's result; each element alone, so a row's result never depends on the rows beside it.
//
// Built and loaded by engine/native.py (plain C ABI through ctypes; threads from PyTorch's pool).
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace kvserve;

inline float silu_times(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

}  // namespace

extern "C" void kvserve_silu_mul_f32(float* out, const float* gate_up, int64_t rows, int64_t width) {
  // A parallel region costs more than it saves below a few thousand elements.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* gate = gate_up + row * 2 * width;
      const float* up = gate + width;
      float* o = out + row * width;
      int64_t i = 0;
      for (; i + 16 <= width; i += 16) {
#if defined(__AVX512F__)
        const vec16 g = load16(gate + i);
        store16(o + i, g / (1.0f + exp16(-g)) * load16(up + i));
#else  // in 8-lane halves, which stay in registers without AVX-512 (vec.h): the same operations on each lane
        for (int64_t half = i; half < i + 16; half += 8) {
          const vec8 g = load8(gate + half);
          store8(o + half, g / (1.0f + exp_lanes(-g)) * load8(up + half));
        }
#endif
      }
      for (; i < width; ++i) o[i] = silu_times(gate[i], up[i]);
    }
  });
}

// out = a + b over n floats: the residual add after a layer's MLP, as one kernel call (so that a decode step is
// kernel calls only, which engine/decode_graph.py can record), the same IEEE sums as PyTorch's add.
extern "C" void kvserve_add_f32(float* out, const float* a, const float* b, int64_t n) {
  const int64_t grain = 1 << 16;  // a parallel region costs more than it saves below that
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
  });
}
