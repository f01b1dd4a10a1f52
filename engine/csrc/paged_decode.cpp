// Decode attention over the paged KV cache on the CPU: each query row reads its own sequence's keys and
// values where they lie in the block pool, instead of gathering every sequence's blocks into one padded
// tensor first (which reads and writes the whole context once more per layer, then reads it again).
//
// Batch invariance by construction: a (row, KV head) pair is computed start to end by one thread, in an
// order of operations fixed by that row's own length, so a row's result is the same bits whatever else is
// in the call and however the pairs are shared among threads. PyTorch's flash attention splits its work by
// the size of the call and so rounds a row differently in different batches (README: How it works).
//
// Built and loaded by engine/paged_decode.py (plain C ABI through ctypes; threads from PyTorch's pool).
// Queries, sums and output are fp32; the cache is fp32 or bf16 (a bf16 model's), widened as it is read.
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using namespace kvserve;

// a . b in a fixed order: four independent vector sums over 64-float strides (so the multiply-adds
// overlap), then 16-float strides, added pairwise and across lanes; a scalar tail for the last n % 16.
template <typename Cache>
inline float dot(const float* a, const Cache* b, int64_t n) {
  vec16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 += load16(a + i) * load16(b + i);
    acc1 += load16(a + i + 16) * load16(b + i + 16);
    acc2 += load16(a + i + 32) * load16(b + i + 32);
    acc3 += load16(a + i + 48) * load16(b + i + 48);
  }
  for (; i + 16 <= n; i += 16) acc0 += load16(a + i) * load16(b + i);
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * to_float(b[i]);
  return sum16((acc0 + acc1) + (acc2 + acc3)) + tail;
}

// The lane sums of 16 vectors, as one vector: lane t holds the sum of a[t]'s lanes. Every vector is folded by
// the same tree (halves, then quarters, eighths and pairs of lanes), so a key's score does not depend on which
// lane it was given; 45 shuffles and adds for 16 sums, where sum16 takes about 10 for each.
inline vec16 transpose_sum16(const vec16* a) {
  vec16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: a[i] folded to 8 lanes; 8-15: a[i + 8]
    b[i] = __builtin_shufflevector(a[i], a[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[i], a[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // quads: a[i], a[i + 4], a[i + 8], a[i + 12]
    c[i] = __builtin_shufflevector(b[i], b[i + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[i], b[i + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // pairs: a[i], a[i + 2], a[i + 4], ... a[i + 14]
    d[i] = __builtin_shufflevector(c[i], c[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[i], c[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// scores[t] = q . keys[t] for `count` <= 16 keys, head_dim a multiple of 16: each key's products summed over
// 16-float strides in order, then across lanes by transpose_sum16 (the same tree for every key).
#if defined(__AVX512F__)
template <typename Cache>
inline void dot16(const float* q, const Cache* const* keys, int64_t count, int64_t head_dim, float* scores) {
  vec16 acc[16] = {};
  auto accumulate = [&](auto keys_here) {
    for (int64_t d = 0; d < head_dim; d += 16) {  // keys inner: 16 independent multiply-add chains
      const vec16 qd = load16(q + d);
      for (int64_t t = 0; t < keys_here; ++t) acc[t] += qd * load16(keys[t] + d);
    }
  };
  // Full tiles (all but a row's last) with the count known at compile time: the key loop unrolled, no checks.
  if (count == 16) accumulate(std::integral_constant<int64_t, 16>{});
  else accumulate(count);
  const vec16 sums = transpose_sum16(acc);
  for (int64_t t = 0; t < count; ++t) scores[t] = sums[t];
}
#else
// Without AVX-512 (vec.h: 16-lane vectors stay in memory there) the same sums on 8-lane halves, 4 keys at a
// time in AVX2's 16 registers: each lane's chain of multiply-adds and the tree across lanes are the AVX-512
// build's, so the same bits. (With 16-lane vectors a one-row decode call took 5x as long built for x86-64-v3.)
template <typename Cache>
inline void dot16(const float* q, const Cache* const* keys, int64_t count, int64_t head_dim, float* scores) {
  auto tile = [&](int64_t first, auto keys_here) {
    vec8 low[4] = {}, high[4] = {};  // lanes 0-7 and 8-15 of each key's 16-lane sums
    for (int64_t d = 0; d < head_dim; d += 16) {
      const vec8 q_low = load8(q + d), q_high = load8(q + d + 8);
      for (int64_t t = 0; t < keys_here; ++t) {
        low[t] += q_low * load8(keys[first + t] + d);
        high[t] += q_high * load8(keys[first + t] + d + 8);
      }
    }
    for (int64_t t = 0; t < keys_here; ++t) scores[first + t] = sum_halves(low[t], high[t]);
  };
  int64_t first = 0;
  for (; first + 4 <= count; first += 4) tile(first, std::integral_constant<int64_t, 4>{});
  if (first < count) tile(first, count - first);
}
#endif

// out = sum_t p[t] * rows[t] * inv_sum over n floats, the keys in order.
#if defined(__AVX512F__)
template <typename Cache>
inline void weighted_sum(const float* p, const Cache* const* rows, int64_t keys, int64_t n, float inv_sum,
                         float* out) {
  int64_t d = 0;
  for (; d + 64 <= n; d += 64) {
    // Even and odd keys in separate sums, added at the end: eight independent chains of multiply-adds
    // instead of four, which a chain's latency (not the multipliers) had limited.
    vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    int64_t t = 0;
    for (; t + 2 <= keys; t += 2) {
      const Cache* v = rows[t] + d;
      const Cache* w = rows[t + 1] + d;
      a0 += p[t] * load16(v);
      a1 += p[t] * load16(v + 16);
      a2 += p[t] * load16(v + 32);
      a3 += p[t] * load16(v + 48);
      b0 += p[t + 1] * load16(w);
      b1 += p[t + 1] * load16(w + 16);
      b2 += p[t + 1] * load16(w + 32);
      b3 += p[t + 1] * load16(w + 48);
    }
    if (t < keys) {
      const Cache* v = rows[t] + d;
      a0 += p[t] * load16(v);
      a1 += p[t] * load16(v + 16);
      a2 += p[t] * load16(v + 32);
      a3 += p[t] * load16(v + 48);
    }
    store16(out + d, (a0 + b0) * inv_sum);
    store16(out + d + 16, (a1 + b1) * inv_sum);
    store16(out + d + 32, (a2 + b2) * inv_sum);
    store16(out + d + 48, (a3 + b3) * inv_sum);
  }
  for (; d + 16 <= n; d += 16) {
    vec16 a = {};
    for (int64_t t = 0; t < keys; ++t) a += p[t] * load16(rows[t] + d);
    store16(out + d, a * inv_sum);
  }
  for (; d < n; ++d) {
    float a = 0.0f;
    for (int64_t t = 0; t < keys; ++t) a += p[t] * to_float(rows[t][d]);
    out[d] = a * inv_sum;
  }
}

#else
// The same sums on 8-lane halves (see dot16): each output's chain, even and odd keys apart, then added, as above.
template <typename Cache>
inline void weighted_sum(const float* p, const Cache* const* rows, int64_t keys, int64_t n, float inv_sum,
                         float* out) {
  int64_t d = 0;
  for (; d + 64 <= n; d += 64)
    for (int64_t quarter = 0; quarter < 64; quarter += 32) {  // the outputs of a0, a1 (then a2, a3) above
      vec8 a[4] = {}, b[4] = {};
      int64_t t = 0;
      for (; t + 2 <= keys; t += 2) {
        const Cache* v = rows[t] + d + quarter;
        const Cache* w = rows[t + 1] + d + quarter;
        const vec8 pv = vec8{} + p[t], pw = vec8{} + p[t + 1];
        for (int i = 0; i < 4; ++i) {
          a[i] += pv * load8(v + 8 * i);
          b[i] += pw * load8(w + 8 * i);
        }
      }
      if (t < keys) {
        const Cache* v = rows[t] + d + quarter;
        const vec8 pv = vec8{} + p[t];
        for (int i = 0; i < 4; ++i) a[i] += pv * load8(v + 8 * i);
      }
      for (int i = 0; i < 4; ++i) store8(out + d + quarter + 8 * i, (a[i] + b[i]) * inv_sum);
    }
  for (; d + 16 <= n; d += 16) {
    vec8 a[2] = {};
    for (int64_t t = 0; t < keys; ++t)
      for (int i = 0; i < 2; ++i) a[i] += (vec8{} + p[t]) * load8(rows[t] + d + 8 * i);
    for (int i = 0; i < 2; ++i) store8(out + d + 8 * i, a[i] * inv_sum);
  }
  for (; d < n; ++d) {
    float a = 0.0f;
    for (int64_t t = 0; t < keys; ++t) a += p[t] * to_float(rows[t][d]);
    out[d] = a * inv_sum;
  }
}
#endif

// Ask for `count` (maybe <= 0) cache rows of head_dim values each to be brought into the cache.
template <typename Cache>
inline void prefetch_rows(const Cache* const* rows, int64_t count, int64_t head_dim) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t byte = 0; byte < head_dim * static_cast<int64_t>(sizeof(Cache)); byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(rows[i]) + byte);
}

// A query head's scores w[0..keys) -> exp(w - max w), in place; returns their sum. The maximum is taken lane-wise over
// 16-score chunks, then across the lanes and the last keys % 16; the weights are summed lane-wise in key order,
// then across lanes by sum16's tree; the last few go through a vector padded with -inf (the same function for
// every weight).
#if defined(__AVX512F__)
inline float exponentiate(float* w, int64_t keys) {
  vec16 tops = vec16{} - std::numeric_limits<float>::infinity();
  int64_t t = 0;
  for (; t + 16 <= keys; t += 16) tops = max16(load16(w + t), tops);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < 16; ++i) top = std::max(top, tops[i]);
  for (; t < keys; ++t) top = std::max(top, w[t]);
  vec16 sums = {};
  const int64_t full = keys / 16 * 16;
  for (t = 0; t < full; t += 16) {
    const vec16 e = exp16(load16(w + t) - top);
    sums += e;
    store16(w + t, e);
  }
  if (const int64_t count = keys - full; count > 0) {  // copied in and out: a vector's lanes written one by one
    vec16 chunk = vec16{} - std::numeric_limits<float>::infinity();  // and read whole stall on the way
    std::memcpy(&chunk, w + full, count * sizeof(float));
    vec16 e = exp16(chunk - top);
    for (int64_t i = count; i < 16; ++i) e[i] = 0.0f;
    sums += e;
    std::memcpy(w + full, &e, count * sizeof(float));
  }
  return sum16(sums);
}
#else
// The same on 8-lane halves (lanes 0-7 and 8-15 of each chunk), so the same bits: with 16-lane vectors, which
// AVX2 keeps in memory, the running maximum and sums went through the stack lane by lane (~30% of a row's time).
inline float exponentiate(float* w, int64_t keys) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  vec8 tops_low = vec8{} - kInf, tops_high = vec8{} - kInf;
  int64_t t = 0;
  for (; t + 16 <= keys; t += 16) {
    const vec8 low = load8(w + t), high = load8(w + t + 8);
    tops_low = low > tops_low ? low : tops_low;
    tops_high = high > tops_high ? high : tops_high;
  }
  float top = -kInf;
  for (int i = 0; i < 8; ++i) top = std::max(top, tops_low[i]);
  for (int i = 0; i < 8; ++i) top = std::max(top, tops_high[i]);
  for (; t < keys; ++t) top = std::max(top, w[t]);
  vec8 sums_low = {}, sums_high = {};
  const int64_t full = keys / 16 * 16;
  for (t = 0; t < full; t += 16) {
    const vec8 low = exp_lanes(load8(w + t) - top), high = exp_lanes(load8(w + t + 8) - top);
    sums_low += low;
    sums_high += high;
    store8(w + t, low);
    store8(w + t + 8, high);
  }
  if (const int64_t count = keys - full; count > 0) {
    float chunk[16];
    std::fill(chunk, chunk + 16, -kInf);
    std::memcpy(chunk, w + full, count * sizeof(float));
    vec8 low = exp_lanes(load8(chunk) - top), high = exp_lanes(load8(chunk + 8) - top);
    for (int64_t i = count; i < 16; ++i) (i < 8 ? low[i] : high[i - 8]) = 0.0f;
    sums_low += low;
    sums_high += high;
    store8(chunk, low);
    store8(chunk + 8, high);
    std::memcpy(w + full, chunk, count * sizeof(float));
  }
  return sum_halves(sums_low, sums_high);
}
#endif

// One (row, KV head): the `group` query heads sharing it attend to `keys` keys; weights is scratch.
template <typename Cache>
void attend(const float* q_heads, float* out_heads, const Cache* const* k_rows, const Cache* const* v_rows,
            int64_t keys, int64_t group, int64_t head_dim, float scale, float softcap, std::vector<float>& weights) {
  weights.resize(group * keys);
  if (head_dim % 16 == 0) {
    for (int64_t t = 0; t < keys; t += 16) {  // 16 keys at a time, read from memory once for the group
      const int64_t count = std::min<int64_t>(16, keys - t);
      // The next tile's keys and this tile's values, fetched while these scores are computed: a head's row
      // is a few lines out of each position's, which the hardware prefetcher does not follow across blocks.
      prefetch_rows(k_rows + t + 16, std::min<int64_t>(16, keys - t - 16), head_dim);
      prefetch_rows(v_rows + t, count, head_dim);
      for (int64_t g = 0; g < group; ++g)
        dot16(q_heads + g * head_dim, k_rows + t, count, head_dim, weights.data() + g * keys + t);
    }
  } else {
    for (int64_t t = 0; t < keys; ++t)
      for (int64_t g = 0; g < group; ++g) weights[g * keys + t] = dot(q_heads + g * head_dim, k_rows[t], head_dim);
  }
  for (int64_t i = 0; i < group * keys; ++i) {
    float s = weights[i] * scale;
    if (softcap > 0.0f) s = softcap * std::tanh(s / softcap);
    weights[i] = s;
  }
  for (int64_t g = 0; g < group; ++g) {
    float* w = weights.data() + g * keys;
    weighted_sum(w, v_rows, keys, head_dim, 1.0f / exponentiate(w, keys), out_heads + g * head_dim);
  }
}

// rows[t] (head_dim bf16 values each) -> consecutive fp32 rows in `wide`, and pointers to them.
inline void widen_rows(const std::vector<const uint16_t*>& rows, std::vector<float>& wide,
                       std::vector<const float*>& pointers, int64_t head_dim) {
  wide.resize(rows.size() * head_dim);
  pointers.resize(rows.size());
  for (size_t t = 0; t < rows.size(); ++t) {
    float* dst = wide.data() + t * head_dim;
    int64_t d = 0;
    for (; d + 16 <= head_dim; d += 16) store16(dst + d, load16(rows[t] + d));
    for (; d < head_dim; ++d) dst[d] = to_float(rows[t][d]);
    pointers[t] = dst;
  }
}

template <typename Cache>
void paged_decode(
    float* out,                   // (rows, heads, head_dim)
    const float* q,               // (rows, heads, head_dim), rows q_row_stride floats apart
    int64_t q_row_stride,         // (a view of the rotary's q and k side by side is read in place)
    const Cache* k_cache,         // (blocks, block_size, kv_heads, head_dim)
    const Cache* v_cache,         // the same
    const int32_t* block_tables,  // (rows, max_blocks); a negative entry is a block given back: its keys are skipped
    const int32_t* context_lens,  // (rows,): the row's query sees keys 0 .. len - 1
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
    float scale,
    int64_t window,  // > 0: the query sees only its last `window` keys (itself included)
    float softcap) { // > 0: scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)
  const int64_t group = heads / kv_heads;  // query heads sharing one KV head
  // The (row, KV head) pairs in the order the threads take them: row by row, except that rows with the same
  // block table (a speculative step's draft rows: one sequence at consecutive positions) go KV head by KV
  // head, so a thread reads a head's keys and values from memory for the first of those rows and from its
  // cache for the next (a 4-row verify step at 400 keys took 161 µs a layer, reading them 4 times). Each
  // pair is still computed alone, so the order changes no bits.
  std::vector<int64_t> order;
  order.reserve(rows * kv_heads);
  for (int64_t first = 0; first < rows;) {
    int64_t last = first + 1;
    while (last < rows && std::memcmp(block_tables + last * max_blocks, block_tables + first * max_blocks,
                                      max_blocks * sizeof(int32_t)) == 0)
      ++last;
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head)
      for (int64_t row = first; row < last; ++row) order.push_back(row * kv_heads + kv_head);
    first = last;
  }
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<const Cache*> k_rows, v_rows;  // the visible keys' rows in the cache, in position order
    std::vector<float> weights;                // (group, keys): scores, then exp(score - max)
    std::vector<float> k_wide, v_wide;         // a bf16 cache's rows widened to fp32
    std::vector<const float*> k_wide_rows, v_wide_rows;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t item = order[index];
      const int64_t row = item / kv_heads, kv_head = item % kv_heads;
      const int64_t len = context_lens[row];
      const int32_t* table = block_tables + row * max_blocks;
      k_rows.clear();
      v_rows.clear();
      // Block by block: one division per block, not two per key (they took most of a short row's time).
      const int64_t stride = kv_heads * head_dim;  // from one position to the next within a block
      for (int64_t pos = window > 0 ? std::max<int64_t>(0, len - window) : 0; pos < len;) {
        const int64_t block = table[pos / block_size], first = pos % block_size;
        const int64_t count = std::min(block_size - first, len - pos);
        if (block >= 0) {
          int64_t offset = ((block * block_size + first) * kv_heads + kv_head) * head_dim;
          for (int64_t i = 0; i < count; ++i, offset += stride) {
            k_rows.push_back(k_cache + offset);
            v_rows.push_back(v_cache + offset);
          }
        }
        pos += count;
      }
      const int64_t keys = static_cast<int64_t>(k_rows.size());
      const float* q_heads = q + row * q_row_stride + kv_head * group * head_dim;
      float* out_heads = out + (row * heads + kv_head * group) * head_dim;
      if constexpr (sizeof(Cache) == 2) {
        if (group > 1) {
          // bf16: widen the rows to fp32 once here rather than once per query head in the sums (exact, so
          // the same bits; the conversions were most of a bf16 row's time)
          widen_rows(k_rows, k_wide, k_wide_rows, head_dim);
          widen_rows(v_rows, v_wide, v_wide_rows, head_dim);
          attend(q_heads, out_heads, k_wide_rows.data(), v_wide_rows.data(), keys, group, head_dim, scale, softcap,
                 weights);
          continue;
        }
      }
      attend(q_heads, out_heads, k_rows.data(), v_rows.data(), keys, group, head_dim, scale, softcap, weights);
    }
  });
}

}  // namespace

#define KVSERVE_PAGED_DECODE(NAME, CACHE)                                                                        \
  extern "C" void NAME(float* out, const float* q, int64_t q_row_stride, const CACHE* k_cache, const CACHE* v_cache, \
                       const int32_t* block_tables, const int32_t* context_lens, int64_t rows, int64_t heads,    \
                       int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale,  \
                       int64_t window, float softcap) {                                                          \
    paged_decode(out, q, q_row_stride, k_cache, v_cache, block_tables, context_lens, rows, heads, kv_heads, head_dim, \
                 block_size, max_blocks, scale, window, softcap);                                                \
  }

KVSERVE_PAGED_DECODE(kvserve_paged_decode_f32, float)      // an fp32 cache
KVSERVE_PAGED_DECODE(kvserve_paged_decode_bf16, uint16_t)  // a bf16 cache (queries and output stay fp32)

// The new tokens' keys and values into their cache slots (what two index_copy_ calls did, ~8 µs a layer of
// a decode step in PyTorch's dispatch): row t's slot_bytes bytes of K, at k + t * k_stride bytes, go to slot
// slots[t] of k_cache, and the same for V. A plain copy, so any cache dtype.
extern "C" void kvserve_write_kv(char* k_cache, char* v_cache, const char* k, const char* v, int64_t k_stride,
                                 int64_t v_stride, const int64_t* slots, int64_t rows, int64_t slot_bytes) {
  for (int64_t t = 0; t < rows; ++t) {
    std::memcpy(k_cache + slots[t] * slot_bytes, k + t * k_stride, slot_bytes);
    std::memcpy(v_cache + slots[t] * slot_bytes, v + t * v_stride, slot_bytes);
  }
}
