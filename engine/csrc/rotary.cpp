// Rotary position embedding on the CPU (engine/models/layers.py RotaryEmbedding): one call rotates a layer's q
// and k heads, where PyTorch took six ops a layer (two table lookups, two multiplies, a roll and an add: 0.4 ms
// of a batch-1 step, 2.6 ms at batch 64). It computes what those ops compute, x * cos + roll(x, D / 2) * sin
// (the rotate-half signs folded into sin), with each product and the sum rounded to fp32 on its own: no fused
// multiply-add, which is why contraction is off here, so its results are PyTorch's bit for bit.
//
// Built and loaded by engine/native.py (plain C ABI through ctypes).
#pragma GCC optimize("fp-contract=off")

#include <cstdint>

// out (tokens, heads, D) from x, whose token rows lie row_stride floats apart (a slice of the qkv output), each
// token rotated by its position's row of the (positions, D) cos and sin tables.
extern "C" void kvserve_rotary_f32(float* out, const float* x, int64_t row_stride, const int64_t* positions,
                                   const float* cos, const float* sin, int64_t tokens, int64_t heads,
                                   int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + positions[t] * head_dim;
    const float* s = sin + positions[t] * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      const float* v = x + t * row_stride + h * head_dim;
      float* o = out + (t * heads + h) * head_dim;
      for (int64_t d = 0; d < half; ++d) o[d] = v[d] * c[d] + v[d + half] * s[d];
      for (int64_t d = half; d < head_dim; ++d) o[d] = v[d] * c[d] + v[d - half] * s[d];
    }
  }
}
