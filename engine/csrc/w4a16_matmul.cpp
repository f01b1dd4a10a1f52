// Matmul over 4-bit weights (groups of 32, w = low + q * step, q in 0..15: GGUF Q4_0/Q4_1/Q4_K's grids) in
// integers: each row is quantized to 16 bits per group of 32 (csrc/int8_rows.h: within 1/65534 of the group's
// largest magnitude, finer than the bf16 rounding it replaces), and a group's products with the 4-bit codes
// are summed in int32, byte half by byte half: with AVX-512 VNNI (4 products per lane and instruction), or
// from 8 rows on AMX tiles where the CPU has them. Integer sums are exact, so both give the same sums. Then,
// per output, in group order: acc = fma(float(sum), row_scale * step, acc); acc = fma(row_sum, low, acc),
// where row_sum is the group's fp32 sum of x. So a row's result is the same bits whatever the number of rows
// in the call.
//
// Against PyTorch's arithmetic (csrc/int4_gemv.cpp: two fp32 FMAs a weight) this is ~3x fewer instructions a
// weight at one row, which a batch-1 step was bound by, and AMX takes the rows of large batches.
//
// Layout: blocks of 16 outputs; codes (n / 16, k_dim / 8, 16, 4) bytes: lane n's byte b of the j-th eight
// inputs holds q[n][8j + b] (low nibble) and q[n][8j + 4 + b] (high), so a 64-byte load gives two VNNI
// operands; steps and lows (n / 16, k_dim / 32, 16) fp16 (a Q4_0/Q4_1 file's own values; half the bytes of
// fp32, which batch 1 reads with the codes); bias (n) fp32 or null.
// Built and loaded by engine/native.py; engine/models/w4a16_matmul.py packs the weights and calls it.
#include <ATen/Parallel.h>

#include "int8_rows.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__)

namespace {

using namespace kvserve;

// One group's step for one row and 16 outputs.
inline __m512 add_group(__m512 acc, __m512i sum, float row_scale, float row_sum, __m512 step, __m512 low) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(row_scale), step), acc);
  return _mm512_fmadd_ps(_mm512_set1_ps(row_sum), low, acc);
}

inline void store_outputs(float* out, __m512 acc, const float* bias, int64_t col) {
  if (bias != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(bias + col));
  _mm512_storeu_ps(out + col, acc);
}

struct Weights {
  const uint8_t* codes;
  const uint16_t* steps;  // fp16
  const uint16_t* lows;   // fp16
  const float* bias;
};

inline __m512 load_halves(const uint16_t* p) {  // 16 fp16 values as fp32 (exact)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// ROWS rows against BLOCKS adjacent blocks of outputs.
template <int ROWS, int BLOCKS>
void tile(float* out, const QuantizedRows& x, int64_t first_row, const Weights& w, int64_t first_block, int64_t n,
          int64_t k_dim) {
  const int64_t groups = k_dim / kGroup;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS][BLOCKS];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i high_sums[ROWS][BLOCKS], low_sums[ROWS][BLOCKS];
    for (int r = 0; r < ROWS; ++r)
      for (int b = 0; b < BLOCKS; ++b) high_sums[r][b] = low_sums[r][b] = _mm512_setzero_si512();
    for (int eight = 0; eight < kGroup / 8; ++eight) {
      const int64_t k = g * kGroup + 8 * eight;
      for (int b = 0; b < BLOCKS; ++b) {
        const uint8_t* bytes = w.codes + (first_block + b) * k_dim * (kBlock / 2) + k * (kBlock / 2);
        // The next tile's codes, into L2: into L1 (T0) they evicted this tile's (37 KB a tile of 8 blocks at
        // k = 576, L1 32 KB); one row took 2.55 ms instead of 3.07 over SmolLM2's 120 layers (Zen 4).
        _mm_prefetch(reinterpret_cast<const char*>(bytes) + BLOCKS * k_dim * (kBlock / 2), _MM_HINT_T1);
        const __m512i packed = _mm512_loadu_si512(bytes);
        const __m512i first4 = _mm512_and_si512(packed, nibble);  // inputs k..k+3
        const __m512i next4 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);  // k+4..k+7
        for (int r = 0; r < ROWS; ++r) {
          const int64_t at = (first_row + r) * k_dim + k;
          // VNNI multiplies unsigned by signed bytes: the weight codes (0..15) pass for either
          high_sums[r][b] = _mm512_dpbusd_epi32(high_sums[r][b], first4, broadcast4(x.high.data() + at));
          high_sums[r][b] = _mm512_dpbusd_epi32(high_sums[r][b], next4, broadcast4(x.high.data() + at + 4));
          low_sums[r][b] = _mm512_dpbusd_epi32(low_sums[r][b], broadcast4(x.low.data() + at), first4);
          low_sums[r][b] = _mm512_dpbusd_epi32(low_sums[r][b], broadcast4(x.low.data() + at + 4), next4);
        }
      }
    }
    for (int b = 0; b < BLOCKS; ++b) {
      const int64_t at = ((first_block + b) * groups + g) * kBlock;
      const __m512 step = load_halves(w.steps + at), low = load_halves(w.lows + at);
      // and its steps and lows, two more streams the hardware prefetcher follows less well (-5% at 1-16 rows)
      _mm_prefetch(reinterpret_cast<const char*>(w.steps + at + BLOCKS * groups * kBlock), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w.lows + at + BLOCKS * groups * kBlock), _MM_HINT_T1);
      for (int r = 0; r < ROWS; ++r) {
        const int64_t i = (first_row + r) * groups + g;
        acc[r][b] = add_group(acc[r][b], combine_halves(high_sums[r][b], low_sums[r][b]), x.scales[i], x.sums[i],
                              step, low);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) store_outputs(out + (first_row + r) * n, acc[r][b], w.bias, (first_block + b) * kBlock);
}

template <int ROWS, int BLOCKS>
void blocks_of(float* out, const QuantizedRows& x, int64_t first_row, const Weights& w, int64_t begin, int64_t end,
               int64_t n, int64_t k_dim) {
  int64_t block = begin;
  for (; block + BLOCKS <= end; block += BLOCKS) tile<ROWS, BLOCKS>(out, x, first_row, w, block, n, k_dim);
  if constexpr (BLOCKS > 1) blocks_of<ROWS, BLOCKS / 2>(out, x, first_row, w, block, end, n, k_dim);  // the rest
}

#if defined(KVSERVE_AMX_INT8)
// A block's codes unpacked to bytes, as AMX tiles take them: 4 inputs of an output side by side, 16 outputs a row.
void unpack_block(const uint8_t* codes, int64_t block, int64_t k_dim, std::vector<uint8_t>& unpacked) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const uint8_t* bytes = codes + block * k_dim * (kBlock / 2);
  unpacked.resize(k_dim * kBlock);
  for (int64_t eight = 0; eight < k_dim / 8; ++eight) {  // quads 2j (low nibbles) and 2j + 1 (high)
    const __m512i packed = _mm512_loadu_si512(bytes + 64 * eight);
    _mm512_storeu_si512(unpacked.data() + 128 * eight, _mm512_and_si512(packed, nibble));
    _mm512_storeu_si512(unpacked.data() + 128 * eight + 64, _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble));
  }
}

// Rows [first, first + m) against one unpacked block, the tiles configured for m <= 16 rows: the same int32 sums
// as the VNNI tiles (exact), then the same fp32 steps, so the same bits.
void amx_chunk(float* out, const QuantizedRows& x, const Weights& w, const uint8_t* unpacked, int64_t first, int m,
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
    _tile_loadd(2, unpacked + g * kGroup * kBlock, 64);
    _tile_dpbsud(0, 1, 2);  // signed high bytes x unsigned weight codes
    _tile_dpbuud(3, 4, 2);  // unsigned low bytes x unsigned weight codes
    _tile_stored(0, high_sums, 64);
    _tile_stored(3, low_sums, 64);
    const int64_t at = (block * groups + g) * kBlock;
    const __m512 step = load_halves(w.steps + at), low = load_halves(w.lows + at);
    for (int r = 0; r < m; ++r) {
      const int64_t i = (first + r) * groups + g;
      const __m512i sum = combine_halves(_mm512_load_si512(high_sums + r * kBlock), _mm512_load_si512(low_sums + r * kBlock));
      acc[r] = add_group(acc[r], sum, x.scales[i], x.sums[i], step, low);
    }
  }
  for (int r = 0; r < m; ++r) store_outputs(out + (first + r) * n, acc[r], w.bias, block * kBlock);
}
#endif

}  // namespace

// 0: no kernel here; 1: VNNI; 2: VNNI, and AMX from kAmxRows rows.
extern "C" int kvserve_w4a16_matmul_supported() { return integer_kernel_kind(); }

// out (rows, n) = x (rows, k_dim) @ w.T + bias, w = low + q * step by groups of 32 inputs, x quantized to 16 bits
// per group; n % 16 == 0, k_dim % 32 == 0.
extern "C" void kvserve_w4a16_matmul(float* out, const float* x, const uint8_t* codes, const uint16_t* steps,
                                    const uint16_t* lows, const float* bias, int64_t rows, int64_t n, int64_t k_dim) {
  thread_local QuantizedRows quantized;  // read by every thread below
  quantize_rows(x, rows, k_dim, quantized);
  const QuantizedRows& q = quantized;
  const Weights w{codes, steps, lows, bias};
  thread_local std::vector<uint8_t> unpacked;  // the AMX path's current block (each thread its own)
  run_integer_kernel(
      TileBlocks<8, 4, 2, 1>{}, rows, n,
      [&](auto tile_rows, auto tile_blocks, int64_t first, int64_t from, int64_t to) {
        blocks_of<tile_rows, tile_blocks>(out, q, first, w, from, to, n, k_dim);
      },
      [&]([[maybe_unused]] int64_t block) {
#if defined(KVSERVE_AMX_INT8)
        unpack_block(w.codes, block, k_dim, unpacked);
#endif
      },
      [&]([[maybe_unused]] int64_t block, [[maybe_unused]] int64_t first, [[maybe_unused]] int m) {
#if defined(KVSERVE_AMX_INT8)
        amx_chunk(out, q, w, unpacked.data(), first, m, block, n, k_dim);
#endif
      });
}

#else

extern "C" int kvserve_w4a16_matmul_supported() { return 0; }
extern "C" void kvserve_w4a16_matmul(float*, const float*, const uint8_t*, const uint16_t*, const uint16_t*,
                                    const float*, int64_t, int64_t, int64_t) {}

#endif

// The codes in the layout kvserve_w4a16_matmul reads, from q (n, k_dim), one 4-bit code (0..15) a byte:
// codes (n / 16, k_dim / 8, 16, 4), where lane `lane` of block `b` holds, in byte `i` of eight inputs 8j..,
// q[16b + lane][8j + i] | q[16b + lane][8j + 4 + i] << 4. One pass (PyTorch's shifts and transposes took
// 60 ms of every start for SmolLM2's 120 layers).
extern "C" void kvserve_w4a16_pack(uint8_t* codes, const uint8_t* q, int64_t n, int64_t k_dim) {
  const int64_t eights = k_dim / 8;
  for (int64_t block = 0; block < n / 16; ++block)
    for (int64_t lane = 0; lane < 16; ++lane) {
      const uint8_t* row = q + (block * 16 + lane) * k_dim;
      uint8_t* dst = codes + (block * eights * 16 + lane) * 4;
      for (int64_t j = 0; j < eights; ++j, dst += 64)
        for (int64_t i = 0; i < 4; ++i) dst[i] = row[8 * j + i] | row[8 * j + 4 + i] << 4;
    }
}
