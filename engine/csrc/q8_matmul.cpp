// Matmul over 8-bit weights in groups of 32 with one scale each (GGUF Q8_0's layout): the LM head of a
// GGUF that stores it so (SmolLM2's). At batch 1 the LM head is a stream of weight reads, and 8 bits a
// weight is half of bf16's bytes; the codes are the file's own, where a bf16 copy rounds them.
//
// Each row is quantized to 16 bits per group of 32 inputs (csrc/int8_rows.h), and a group's products are
// summed in int32, byte half by byte half: with AVX-512 VNNI (4 products per lane and instruction), or
// from 8 rows on AMX tiles where the CPU has them. Integer sums are exact, so both give the same sums
// however the work is tiled; the fp32 part is one fixed chain per output,
// acc = fma(sum_g, row_scale_g * weight_scale_g, acc) over the groups in order. A row's result is thus
// the same bits whatever the number of rows in the call.
//
// VNNI multiplies unsigned by signed bytes, and both a row's high bytes and the weight codes are signed:
// the high bytes go in plus 128, and that half's sum is corrected by 128 * (the group's weight code sum),
// computed once when packing.
//
// Layout: blocks of 16 outputs; codes (n / 16, k_dim / 4, 16, 4) int8 (each lane: 4 consecutive inputs of
// one output), weight scales (n / 16, k_dim / 32, 16) fp32 and corrections (n / 16, k_dim / 32, 16) int32.
// Built and loaded by engine/native.py; engine/models/q8_matmul.py packs the weights and calls it.
#include <ATen/Parallel.h>

#include "int8_rows.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__)

namespace {

using namespace kvserve;

// One group's step for one row and 16 outputs: acc = fma(float(sum), row scale * weight scale, acc).
inline __m512 add_group(__m512 acc, __m512i sum, float row_scale, __m512 weight_scale) {
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(row_scale), weight_scale);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc);
}

// ROWS rows against BLOCKS adjacent blocks of outputs.
template <int ROWS, int BLOCKS>
void tile(float* out, const QuantizedRows& x, int64_t first_row, const int8_t* codes, const float* scales,
          const int32_t* corrections, int64_t first_block, int64_t n, int64_t k_dim) {
  const int64_t groups = k_dim / kGroup;
  __m512 acc[ROWS][BLOCKS];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i high_sums[ROWS][BLOCKS], low_sums[ROWS][BLOCKS];
    for (int r = 0; r < ROWS; ++r)
      for (int b = 0; b < BLOCKS; ++b) high_sums[r][b] = low_sums[r][b] = _mm512_setzero_si512();
    for (int quad = 0; quad < kGroup / 4; ++quad) {
      const int64_t k = g * kGroup + 4 * quad;
      for (int b = 0; b < BLOCKS; ++b) {
        // block (first_block + b), inputs k..k+3: 16 lanes of 4 codes, 64 bytes
        const int8_t* w = codes + (first_block + b) * k_dim * kBlock + k * kBlock;
        // The next tile's codes, scales and corrections into L2, as csrc/w4a16_matmul.cpp does. Prefetched 1 KB
        // ahead into L1 (T0) instead, SmolLM2's head (49152 x 576) took 20 ms at 64 rows where it now takes 12,
        // and 1.2 ms at one row where it now takes 0.9 (Zen 4, cold cache; the same bits).
        _mm_prefetch(reinterpret_cast<const char*>(w) + BLOCKS * k_dim * kBlock, _MM_HINT_T1);
        const __m512i wv = _mm512_loadu_si512(w);
        for (int r = 0; r < ROWS; ++r) {
          const int64_t at = (first_row + r) * k_dim + k;
          const __m512i high = _mm512_xor_si512(broadcast4(x.high.data() + at), _mm512_set1_epi8(-128));  // + 128
          high_sums[r][b] = _mm512_dpbusd_epi32(high_sums[r][b], high, wv);
          low_sums[r][b] = _mm512_dpbusd_epi32(low_sums[r][b], broadcast4(x.low.data() + at), wv);
        }
      }
    }
    for (int b = 0; b < BLOCKS; ++b) {
      const int64_t at = ((first_block + b) * groups + g) * kBlock;
      const __m512i correction = _mm512_loadu_si512(corrections + at);
      const __m512 weight_scale = _mm512_loadu_ps(scales + at);
      _mm_prefetch(reinterpret_cast<const char*>(corrections + at + BLOCKS * groups * kBlock), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(scales + at + BLOCKS * groups * kBlock), _MM_HINT_T1);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i sum = combine_halves(_mm512_sub_epi32(high_sums[r][b], correction), low_sums[r][b]);
        acc[r][b] = add_group(acc[r][b], sum, x.scales[(first_row + r) * groups + g], weight_scale);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) _mm512_storeu_ps(out + (first_row + r) * n + (first_block + b) * kBlock, acc[r][b]);
}

// ROWS rows against blocks [begin, end), BLOCKS at a time.
template <int ROWS, int BLOCKS>
void blocks_of(float* out, const QuantizedRows& x, int64_t first_row, const int8_t* codes, const float* scales,
               const int32_t* corrections, int64_t begin, int64_t end, int64_t n, int64_t k_dim) {
  int64_t block = begin;
  for (; block + BLOCKS <= end; block += BLOCKS)
    tile<ROWS, BLOCKS>(out, x, first_row, codes, scales, corrections, block, n, k_dim);
  if constexpr (BLOCKS > 1)  // the rest
    blocks_of<ROWS, BLOCKS / 2>(out, x, first_row, codes, scales, corrections, block, end, n, k_dim);
}

#if defined(KVSERVE_AMX_INT8)
// Rows [first, first + m) against one block, the tiles configured for m <= 16 rows: the same int32 sums as the
// VNNI tiles (exact), then the same fp32 steps, so the same bits.
void amx_chunk(float* out, const QuantizedRows& x, const int8_t* codes, const float* scales, int64_t first, int m,
               int64_t block, int64_t n, int64_t k_dim) {
  const int64_t groups = k_dim / kGroup;
  alignas(64) int32_t high_sums[16 * kBlock], low_sums[16 * kBlock];
  __m512 acc[16];
  for (int r = 0; r < m; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    _tile_zero(0);
    _tile_zero(3);
    _tile_loadd(1, x.high.data() + first * k_dim + g * kGroup, k_dim);
    _tile_loadd(4, x.low.data() + first * k_dim + g * kGroup, k_dim);
    _tile_loadd(2, codes + block * k_dim * kBlock + g * kGroup * kBlock, 64);
    _tile_dpbssd(0, 1, 2);  // signed high bytes x signed codes: no correction needed
    _tile_dpbusd(3, 4, 2);  // unsigned low bytes x signed codes
    _tile_stored(0, high_sums, 64);
    _tile_stored(3, low_sums, 64);
    const __m512 weight_scale = _mm512_loadu_ps(scales + (block * groups + g) * kBlock);
    for (int r = 0; r < m; ++r) {
      const __m512i sum = combine_halves(_mm512_load_si512(high_sums + r * kBlock), _mm512_load_si512(low_sums + r * kBlock));
      acc[r] = add_group(acc[r], sum, x.scales[(first + r) * groups + g], weight_scale);
    }
  }
  for (int r = 0; r < m; ++r) _mm512_storeu_ps(out + (first + r) * n + block * kBlock, acc[r]);
}
#endif

}  // namespace

// 0: no kernel here; 1: VNNI; 2: VNNI, and AMX from kAmxRows rows.
extern "C" int kvserve_q8_matmul_supported() { return integer_kernel_kind(); }

// out (rows, n) = x (rows, k_dim) @ w.T for w = codes * scales by groups of 32 inputs, x quantized to 16 bits per
// group; n % 16 == 0, k_dim % 32 == 0.
extern "C" void kvserve_q8_matmul(float* out, const float* x, const int8_t* codes, const float* scales,
                                  const int32_t* corrections, int64_t rows, int64_t n, int64_t k_dim) {
  thread_local QuantizedRows quantized;  // read by every thread below
  quantize_rows(x, rows, k_dim, quantized);
  const QuantizedRows& q = quantized;
  run_integer_kernel(
      TileBlocks<8, 2, 1, 1>{}, rows, n,
      [&](auto tile_rows, auto tile_blocks, int64_t first, int64_t from, int64_t to) {
        blocks_of<tile_rows, tile_blocks>(out, q, first, codes, scales, corrections, from, to, n, k_dim);
      },
      [](int64_t) {},
      [&]([[maybe_unused]] int64_t block, [[maybe_unused]] int64_t first, [[maybe_unused]] int m) {
#if defined(KVSERVE_AMX_INT8)
        amx_chunk(out, q, codes, scales, first, m, block, n, k_dim);
#endif
      });
}

#else

extern "C" int kvserve_q8_matmul_supported() { return 0; }
extern "C" void kvserve_q8_matmul(float*, const float*, const int8_t*, const float*, const int32_t*, int64_t, int64_t,
                                  int64_t) {}

#endif

// The codes and corrections in the layout kvserve_q8_matmul reads, from q (n, k_dim) int8: codes (n / 16,
// k_dim / 4, 16, 4), lane `lane` of block `b` holding inputs 4j..4j+3 of output 16b + lane; corrections
// (n / 16, k_dim / 32, 16) int32, 128 times the sum of each group of 32 codes (the kernel feeds codes + 128
// to VNNI's unsigned operand). One pass (PyTorch's transposes and integer sums took 60-80 ms of a start).
extern "C" void kvserve_q8_pack(int8_t* codes, int32_t* corrections, const int8_t* q, int64_t n, int64_t k_dim) {
  const int64_t quads = k_dim / 4, groups = k_dim / 32;
  for (int64_t block = 0; block < n / 16; ++block)
    for (int64_t lane = 0; lane < 16; ++lane) {
      const int8_t* row = q + (block * 16 + lane) * k_dim;
      int8_t* dst = codes + (block * quads * 16 + lane) * 4;
      for (int64_t j = 0; j < quads; ++j) std::memcpy(dst + j * 64, row + 4 * j, 4);
      int32_t* sums = corrections + block * groups * 16 + lane;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t i = 0; i < 32; ++i) sum += row[32 * g + i];
        sums[g * 16] = 128 * sum;
      }
    }
}
