// Matmul over PyTorch's packed int4 weights (its AVX-512 layout): most of a decode step at any batch.
//
// PyTorch's `_weight_int4pack_mm_for_cpu` computes each output as a chain of fp32 FMAs over k, one per
// input column: w = (q - 8) * scale + zero (an FMA), acc = x[k] * w + acc (an FMA), then rounds acc to
// bf16. This kernel runs the same two FMAs per weight, in the same order, for each output, so every
// output is bitwise PyTorch's and a row's result never depends on the rows beside it; what differs is
// the layout of the work. With one input row PyTorch's keeps four chains in flight and waits on FMA
// latency: the few-row entry (1-4 rows) keeps 8-16. With more rows PyTorch's dequantizes each weight
// once per 4 rows: the many-row entry does it once per 8. Both take fp32 rows and return fp32 ones
// (rounded through bf16 on the way in and out as PyTorch's kernel does) and add the bias, which saves
// the three casts a call otherwise costs in dispatch.
//
// Layout (PyTorch's for AVX-512 CPUs, N a multiple of 64): weights in blocks of 64 outputs, each block
// K rows of 32 bytes; byte d < 16 holds outputs d (low nibble) and d + 32 (high), byte 16 + d outputs
// d + 16 and d + 48. Scales and zeros: (K / group, N, 2) bf16.
//
// Built and loaded by engine/native.py; engine/models/int4_matmul.py decides when to call it.
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int kBlockN = 64;
constexpr int kScalePrefetchGroups = 4;

// 16 outputs' (scale, zero) bf16 pairs -> a vector of their scales and one of their zeros, as fp32.
inline void load_pairs(const uint16_t* pairs, __m512& scale, __m512& zero) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512 lo = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs))), 16));
  const __m512 hi = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + 16))), 16));
  scale = _mm512_permutex2var_ps(lo, even, hi);
  zero = _mm512_permutex2var_ps(lo, odd, hi);
}

// Per output block: scale and zero of the current group, as fp32, for its 4 vectors of 16 outputs.
struct GroupParams {
  __m512 scale[4];
  __m512 zero[4];
};

inline void load_group(GroupParams& g, const uint16_t* scales_zeros) {
  for (int i = 0; i < 4; ++i) load_pairs(scales_zeros + 32 * i, g.scale[i], g.zero[i]);
}

// The weights of 16 outputs from their codes (a lane's low 4 bits): (q - 8) * scale + zero, one FMA.
inline __m512 dequantize(__m512i codes, __m512 scale, __m512 zero) {
  // q - 8 for q = 0..15, indexed by a lane's low 4 bits (permutexvar ignores the rest)
  const __m512 levels = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
  return _mm512_fmadd_ps(_mm512_permutexvar_ps(codes, levels), scale, zero);
}

inline __m512 bf16_round_trip(__m512 v) {  // fp32 -> bf16 (round to nearest even) -> fp32
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 16 outputs from their sums: rounded to bf16 as PyTorch's kernel returns them, then the bias added.
inline void store_outputs(float* out, __m512 acc, const float* bias, int64_t col) {
  __m512 y = bf16_round_trip(acc);
  if (bias != nullptr) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + col));
  _mm512_storeu_ps(out + col, y);
}

// The input rows rounded to bf16 and back, as PyTorch's kernel sees them (x.bfloat16()), in a buffer of the
// calling thread's that lives until its next call.
inline const float* rounded_rows(const float* x, int64_t count) {
  thread_local std::vector<float> rounded;
  rounded.resize(count);
  for (int64_t i = 0; i < count; ++i) rounded[i] = kvserve::to_float(kvserve::to_bf16(x[i]));
  return rounded.data();
}

// ROWS input rows against BLOCKS adjacent output blocks, k = 0..K-1 in order.
template <int ROWS, int BLOCKS>
void tile(float* out, const float* x, const uint8_t* packed, const uint16_t* scales_zeros, const float* bias,
          int64_t first_block, int64_t n, int64_t k_dim, int64_t group) {
  __m512 acc[ROWS][BLOCKS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b)
      for (int i = 0; i < 4; ++i) acc[r][b][i] = _mm512_setzero_ps();
  GroupParams params[BLOCKS];
  const uint8_t* weights[BLOCKS];
  for (int b = 0; b < BLOCKS; ++b) weights[b] = packed + (first_block + b) * k_dim * (kBlockN / 2);
  for (int64_t k = 0; k < k_dim; ++k) {
    if (k % group == 0) {
      for (int b = 0; b < BLOCKS; ++b) {
        const uint16_t* pairs = scales_zeros + (k / group) * n * 2 + (first_block + b) * kBlockN * 2;
        load_group(params[b], pairs);
        // A block's scales lie a whole row of scales apart from one group to the next, a stride the hardware
        // prefetcher does not follow: fetch those of a few groups ahead (measured: ~5% of a batch-1 step's matmuls).
        if (k + kScalePrefetchGroups * group < k_dim)
          for (int line = 0; line < 4; ++line)
            _mm_prefetch(reinterpret_cast<const char*>(pairs + kScalePrefetchGroups * n * 2) + 64 * line, _MM_HINT_T0);
      }
    }
    __m512 a[ROWS];
    for (int r = 0; r < ROWS; ++r) a[r] = _mm512_set1_ps(x[r * k_dim + k]);
    for (int b = 0; b < BLOCKS; ++b) {
      const uint8_t* row = weights[b] + k * (kBlockN / 2);
      _mm_prefetch(reinterpret_cast<const char*>(row + 64 * (kBlockN / 2)), _MM_HINT_T0);
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m512i low16 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes));
      const __m512i high16 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1));
      const GroupParams& p = params[b];
      const __m512 w[4] = {dequantize(low16, p.scale[0], p.zero[0]), dequantize(high16, p.scale[1], p.zero[1]),
                           dequantize(_mm512_srli_epi32(low16, 4), p.scale[2], p.zero[2]),
                           dequantize(_mm512_srli_epi32(high16, 4), p.scale[3], p.zero[3])};
      for (int r = 0; r < ROWS; ++r)
        for (int i = 0; i < 4; ++i) acc[r][b][i] = _mm512_fmadd_ps(a[r], w[i], acc[r][b][i]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b)
      for (int i = 0; i < 4; ++i) store_outputs(out + r * n, acc[r][b][i], bias, (first_block + b) * kBlockN + 16 * i);
}

// ROWS (up to 8) input rows against half of one output block: the 16 bytes of each k-row at byte offset
// 16 * half, which hold outputs 16 * half + 0..15 (low nibbles) and 32 + 16 * half + 0..15 (high). With
// more rows, a weight dequantized once serves 8 rows (PyTorch's kernel: 4), for the same FMAs per output.
template <int ROWS>
void half_tile(float* out, const float* x, const uint8_t* packed, const uint16_t* scales_zeros, const float* bias,
               int64_t block, int half, int64_t n, int64_t k_dim, int64_t group) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  __m512 scale[2], zero[2];
  const uint8_t* weights = packed + block * k_dim * (kBlockN / 2) + 16 * half;
  const int64_t cols[2] = {block * kBlockN + 16 * half, block * kBlockN + 32 + 16 * half};
  for (int64_t k = 0; k < k_dim; ++k) {
    if (k % group == 0) {
      for (int j = 0; j < 2; ++j) load_pairs(scales_zeros + (k / group) * n * 2 + cols[j] * 2, scale[j], zero[j]);
    }
    const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + k * 32)));
    const __m512 w0 = dequantize(lanes, scale[0], zero[0]);
    const __m512 w1 = dequantize(_mm512_srli_epi32(lanes, 4), scale[1], zero[1]);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * k_dim + k]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < 2; ++j) store_outputs(out + r * n, acc[r][j], bias, cols[j]);
}

// Blocks of output columns split between threads; each thread takes BLOCKS at a time while it can.
template <int ROWS, int BLOCKS>
void run(float* out, const float* x, const uint8_t* packed, const uint16_t* scales_zeros, const float* bias,
         int64_t n, int64_t k_dim, int64_t group) {
  const int64_t num_blocks = n / kBlockN;
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    int64_t block = begin;
    for (; block + BLOCKS <= end; block += BLOCKS)
      tile<ROWS, BLOCKS>(out, x, packed, scales_zeros, bias, block, n, k_dim, group);
    for (; block < end; ++block) tile<ROWS, 1>(out, x, packed, scales_zeros, bias, block, n, k_dim, group);
  });
}

}  // namespace

extern "C" int kvserve_int4_gemv_supported() { return 1; }

// out (rows, n) = round_bf16(round_bf16(x) @ w.T) + bias, for rows 1..4. x: (rows, k_dim) fp32.
extern "C" void kvserve_int4_gemv(float* out, const float* x, const uint8_t* packed, const uint16_t* scales_zeros,
                                  const float* bias, int64_t rows, int64_t n, int64_t k_dim, int64_t group) {
  if (rows < 1 || rows > 4) return;  // the Python side never asks for these
  const float* rounded = rounded_rows(x, rows * k_dim);
  switch (rows) {
    case 1: return run<1, 2>(out, rounded, packed, scales_zeros, bias, n, k_dim, group);
    case 2: return run<2, 2>(out, rounded, packed, scales_zeros, bias, n, k_dim, group);
    case 3: return run<3, 1>(out, rounded, packed, scales_zeros, bias, n, k_dim, group);
    default: return run<4, 1>(out, rounded, packed, scales_zeros, bias, n, k_dim, group);
  }
}

// The same for any number of rows: 8 at a time (the last few fewer) against half an output block each.
extern "C" void kvserve_int4_gemm(float* out, const float* x, const uint8_t* packed, const uint16_t* scales_zeros,
                                  const float* bias, int64_t rows, int64_t n, int64_t k_dim, int64_t group) {
  if (rows < 1) return;
  const float* rounded = rounded_rows(x, rows * k_dim);
  const int64_t chunks = (rows + 7) / 8, halves = 2 * (n / kBlockN);
  at::parallel_for(0, chunks * halves, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / halves, h = item % halves;
      const int64_t first = chunk * 8, count = std::min<int64_t>(8, rows - first);
      float* o = out + first * n;
      const float* a = rounded + first * k_dim;
      const int64_t block = h / 2;
      const int half = static_cast<int>(h % 2);
      switch (count) {
        case 1: half_tile<1>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        case 2: half_tile<2>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        case 3: half_tile<3>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        case 4: half_tile<4>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        case 5: half_tile<5>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        case 6: half_tile<6>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        case 7: half_tile<7>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
        default: half_tile<8>(o, a, packed, scales_zeros, bias, block, half, n, k_dim, group); break;
      }
    }
  });
}

#else

extern "C" int kvserve_int4_gemv_supported() { return 0; }
extern "C" void kvserve_int4_gemv(float*, const float*, const uint8_t*, const uint16_t*, const float*, int64_t,
                                  int64_t, int64_t, int64_t) {}

#endif
