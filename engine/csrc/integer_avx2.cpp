// The integer matmuls of csrc/w4a16_matmul.cpp (4-bit layers) and csrc/q8_matmul.cpp (a Q8_0 LM head) for CPUs
// with AVX2 but not AVX-512 VNNI (AMD Zen 2/3, Intel before Ice Lake): the same weight layouts, the same rows
// quantized to 16 bits per group of 32, the same exact int32 sums and the same fp32 steps after them, so the
// same bits as the VNNI kernels (tests/unit/test_w4a16_matmul.py and test_q8_matmul.py compare the two builds
// where both run).
//
// Sums without VNNI's byte dot product:
// - 4-bit codes: _mm256_maddubs_epi16 (unsigned x signed bytes, pairs summed into int16) cannot saturate here:
//   codes are 0..15, so a pair is at most 2 * 15 * 128 with the high bytes and 2 * 15 * 255 with the low ones.
//   High pairs gather in int16 over a whole group (8 pairs of pairs: 30720 at most), low ones over half a group
//   (30600), and _mm256_madd_epi16 widens them to int32 (times 256 for the high half), exactly. From 16 rows
//   the same sums come from fp32 FMAs over the codes as floats instead, exact too (four_bit_fma).
// - 8-bit codes: maddubs would saturate (2 * 255 * 127), so the 16-bit row codes meet the codes sign-extended
//   to 16 bits in _mm256_madd_epi16 (int16 x int16, pairs summed into int32): exact, below 2^27 a group.
// A block's 16 outputs are two 8-lane halves here; the tiles (TileBlocks, run_row_tiles) are csrc/int8_rows.h's,
// one block wide for any row count and, with 16 vector registers, at most 2 rows tall (in_pairs): bigger tiles
// spilled (2 blocks at one row took SmolLM2's four int4 layer shapes 0.091 ms against 0.080 on a 2-core Zen 4;
// 4 x 2 at 1-4 rows was slower still, and so were wider tiles of the 8-bit head).
// Also here: the 4-bit layers with the rows quantized to 8 bits instead (--quantization int4-a8, w4a8_tile), for
// every x86 CPU with AVX2: one build, so the same bits on every CPU.
// Built with the other kernels by engine/native.py (-march=native: where the CPU lacks AVX2, stubs say so).
#include "int8_rows.h"
#include "vec.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <cstring>

namespace {

using namespace kvserve;

struct Rows16 {
  std::vector<int16_t> codes;  // (rows, k_dim): round(x / scale)
  std::vector<uint8_t> low;    // (rows, k_dim): their low bytes (unsigned)
  std::vector<int8_t> high;    // (rows, k_dim): their high bytes (signed)
  std::vector<float> scales;   // (rows, k_dim / 32)
  std::vector<float> sums;     // (rows, k_dim / 32): the group's fp32 sum of x
};

inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return std::max(_mm_cvtss_f32(m), _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1)));
}

// A group of 32 values of a row: loaded, its scale for codes up to largest_code (NaN where the group holds an inf
// or a NaN), its fp32 sum, and the divisor that turns a value into its code.
struct Group {
  __m256 v[4];
  float scale, sum;
  __m256 divisor;
};

inline Group load_group(const float* x, float largest_code) {
  Group group;
  __m256* v = group.v;
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
  const float top = max8(_mm256_max_ps(_mm256_max_ps(abs8(v[0]), abs8(v[1])), _mm256_max_ps(abs8(v[2]), abs8(v[3]))));
  const __m256 differences = _mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(v[0], v[0]), _mm256_sub_ps(v[1], v[1])),
                                           _mm256_add_ps(_mm256_sub_ps(v[2], v[2]), _mm256_sub_ps(v[3], v[3])));
  group.scale = top / largest_code + nonfinite_mark(sum_halves(differences, _mm256_setzero_ps()));
  // the VNNI kernels add x[i] + x[i + 16] first, then reduce those 16 lanes with GCC's _mm512_reduce_add_ps,
  // whose tree (halves, quarters, lanes 0 + 2 and 1 + 3, then those two) is vec.h's sum_halves
  group.sum = sum_halves(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3]));
  group.divisor = _mm256_set1_ps(group.scale > 0.0f ? group.scale : 1.0f);
  return group;
}

// Every group of every row: its scale and fp32 sum into `scales` and `sums`, then write_codes(group, at) puts its
// codes at offset `at` (the group's first input) of the caller's code arrays.
template <typename WriteCodes>
void quantize_groups(const float* x, int64_t rows, int64_t k_dim, float largest_code, std::vector<float>& scales,
                     std::vector<float>& sums, WriteCodes write_codes) {
  const int64_t groups = k_dim / kGroup;
  scales.resize(rows * groups);
  sums.resize(rows * groups);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = r * k_dim + g * kGroup;
      const Group group = load_group(x + at, largest_code);
      scales[r * groups + g] = group.scale;
      sums[r * groups + g] = group.sum;
      write_codes(group, at);
    }
}

// csrc/int8_rows.h's quantize_rows, with 8-lane vectors: the same scales, sums and codes.
void quantize_rows(const float* x, int64_t rows, int64_t k_dim, Rows16& q) {
  q.codes.resize(rows * k_dim);
  q.low.resize(rows * k_dim);
  q.high.resize(rows * k_dim);
  quantize_groups(x, rows, k_dim, 32767.0f, q.scales, q.sums, [&](const Group& group, int64_t at) {
    const __m256* v = group.v;
    const __m256 divisor = group.divisor;
    for (int i = 0; i < 4; i += 2) {  // round to nearest even (the default rounding mode); |code| <= 32767
      const __m256i first = _mm256_cvtps_epi32(_mm256_div_ps(v[i], divisor));
      const __m256i second = _mm256_cvtps_epi32(_mm256_div_ps(v[i + 1], divisor));
      // packs works within 128-bit lanes (first 0-3, second 0-3, first 4-7, second 4-7): put them in order
      const __m256i codes = _mm256_permute4x64_epi64(_mm256_packs_epi32(first, second), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.codes.data() + at + 8 * i), codes);
      // each code's low byte (unsigned) and high byte (signed: code >> 8): even and odd bytes, per 128-bit lane
      const __m256i split = _mm256_shuffle_epi8(codes, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
      const __m256i bytes = _mm256_permute4x64_epi64(split, 0xD8);  // 16 low bytes, then 16 high bytes
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.low.data() + at + 8 * i), _mm256_castsi256_si128(bytes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.high.data() + at + 8 * i), _mm256_extracti128_si256(bytes, 1));
    }
  });
}

inline __m256i broadcast4(const void* bytes) {  // 4 bytes (one lane's inputs) into every 32-bit lane
  int32_t four;
  std::memcpy(&four, bytes, 4);
  return _mm256_set1_epi32(four);
}

inline __m256i broadcast8(const void* bytes) {  // 8 bytes (four 16-bit codes) into every 64-bit lane
  int64_t eight;
  std::memcpy(&eight, bytes, 8);
  return _mm256_set1_epi64x(eight);
}

inline __m256 load_halves(const uint16_t* p) {  // 8 fp16 values as fp32 (exact)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// ---- 4-bit weights (csrc/w4a16_matmul.cpp's layout and fp32 steps) ----

struct FourBitWeights {
  const uint8_t* codes;
  const uint16_t* steps;  // fp16
  const uint16_t* lows;   // fp16
  const float* bias;
};

// ROWS rows against one block of 16 outputs, HALVES vectors of 8.
template <int ROWS>
void four_bit_tile(float* out, const Rows16& x, int64_t first_row, const FourBitWeights& w, int64_t block,
                   int64_t n, int64_t k_dim) {
  constexpr int HALVES = 2;
  const int64_t groups = k_dim / kGroup;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), times256 = _mm256_set1_epi16(256);
  __m256 acc[ROWS][HALVES];
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < HALVES; ++h) acc[r][h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[ROWS][HALVES], high[ROWS][HALVES], low[ROWS][HALVES];
    for (int r = 0; r < ROWS; ++r)
      for (int h = 0; h < HALVES; ++h) sums[r][h] = high[r][h] = low[r][h] = _mm256_setzero_si256();
    for (int eight = 0; eight < kGroup / 8; ++eight) {
      const int64_t k = g * kGroup + 8 * eight;
      for (int h = 0; h < HALVES; ++h) {
        const uint8_t* bytes = w.codes + block * k_dim * (kBlock / 2) + k * (kBlock / 2) + 32 * h;
        _mm_prefetch(reinterpret_cast<const char*>(bytes) + k_dim * (kBlock / 2), _MM_HINT_T1);  // the next block's
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
        const __m256i first4 = _mm256_and_si256(packed, nibble);                         // inputs k..k+3
        const __m256i next4 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);  // k+4..k+7
        for (int r = 0; r < ROWS; ++r) {
          const int64_t at = (first_row + r) * k_dim + k;
          high[r][h] = _mm256_add_epi16(high[r][h], _mm256_maddubs_epi16(first4, broadcast4(x.high.data() + at)));
          high[r][h] = _mm256_add_epi16(high[r][h], _mm256_maddubs_epi16(next4, broadcast4(x.high.data() + at + 4)));
          low[r][h] = _mm256_add_epi16(low[r][h], _mm256_maddubs_epi16(broadcast4(x.low.data() + at), first4));
          low[r][h] = _mm256_add_epi16(low[r][h], _mm256_maddubs_epi16(broadcast4(x.low.data() + at + 4), next4));
          if (eight % 2 == 1) {  // half a group of low pairs: widen before int16 could overflow
            sums[r][h] = _mm256_add_epi32(sums[r][h], _mm256_madd_epi16(low[r][h], ones));
            low[r][h] = _mm256_setzero_si256();
          }
        }
      }
    }
    for (int h = 0; h < HALVES; ++h) {
      const int64_t at = (block * groups + g) * kBlock + 8 * h;
      const __m256 step = load_halves(w.steps + at), offset = load_halves(w.lows + at);
      for (int r = 0; r < ROWS; ++r) {
        const int64_t i = (first_row + r) * groups + g;
        const __m256i sum = _mm256_add_epi32(sums[r][h], _mm256_madd_epi16(high[r][h], times256));
        // acc = fma(float(sum), row_scale * step, acc); acc = fma(row_sum, low, acc), as the VNNI kernel
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(_mm256_set1_ps(x.scales[i]), step), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(x.sums[i]), offset, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < HALVES; ++h) {
      const int64_t col = block * kBlock + 8 * h;
      __m256 result = acc[r][h];
      if (w.bias != nullptr) result = _mm256_add_ps(result, _mm256_loadu_ps(w.bias + col));
      _mm256_storeu_ps(out + (first_row + r) * n + col, result);
    }
}

// ---- 4-bit weights from kFmaRows rows: the same sums in fp32 FMAs ----
//
// A group's products of a row's 16-bit codes (|code| <= 32768) and the 4-bit codes (0..15) are integers below
// 2^19, and the 32 of a group sum below 2^24, where fp32 holds every integer: FMAs over the codes as floats add
// them exactly, in any order, to the int32 sums four_bit_tile makes, and the same fp32 steps follow, so the same
// bits. From kFmaRows rows that is the faster way where the build has 16 vector registers (x86-64-v3, an
// AVX2-only CPU's native build): an FMA takes 8 products, against ~9 integer instructions for 64 above, whose
// tiles then spill; each block's codes are unpacked to floats once a call for every row to read. SmolLM2's four
// int4 layer shapes, old and new code alternated 5x in separate processes at 2 threads (2-core Zen 4 running the
// x86-64-v3 build): 1.1-1.15x faster at 48-128 rows (64: 3.10 -> 2.77 ms), even at 16-32, against the 4-row
// integer tiles of then. Since the integer tiles take 2 rows (in_pairs) they are ahead below 48 rows and level to
// 96 (the two alternated 40-60 times in one process, the four shapes at 2 threads: 32 rows 1527 -> 1372 µs and
// 1822 -> 1583 in two runs, 16 rows level; 48, 64 and 96 level), and the FMAs ahead at 128 (7.7 against 10.4 ms),
// hence from 48 rows. Where the compiler has AVX-512VL (a native build on an AVX-512 CPU without VNNI, such as
// Skylake-SP), these 256-bit loops get 32 registers, the integer tiles stop spilling and beat the FMAs (64 rows:
// 2.43 against 3.21 ms, the same alternation built for Zen 4), so there the integer path runs at every row count.
#if defined(__AVX512VL__)
constexpr int64_t kFmaRows = INT64_MAX;
#else
constexpr int64_t kFmaRows = 48;
#endif
constexpr int kFmaTileRows = 6;  // 12 accumulators, 2 weight vectors and a broadcast row code: 15 of 16 registers

// A block's codes as floats, (k_dim, 16): input k's 16 outputs side by side.
void unpack_block_floats(const uint8_t* codes, int64_t block, int64_t k_dim, float* weights) {
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  const uint8_t* bytes = codes + block * k_dim * (kBlock / 2);
  for (int64_t eight = 0; eight < k_dim / 8; ++eight)
    for (int h = 0; h < 2; ++h) {  // outputs 8h..8h+7: each 32-bit lane holds one output's eight inputs
      const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 64 * eight + 32 * h));
      for (int b = 0; b < 4; ++b) {  // byte b: input 8j + b (low nibble) and 8j + 4 + b (high)
        const __m256i shifted = _mm256_srli_epi32(lanes, 8 * b);
        float* at = weights + 8 * eight * kBlock + 8 * h;
        _mm256_storeu_ps(at + b * kBlock, _mm256_cvtepi32_ps(_mm256_and_si256(shifted, nibble)));
        _mm256_storeu_ps(at + (4 + b) * kBlock,
                         _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(shifted, 4), nibble)));
      }
    }
}

// ROWS rows (their codes as floats: row_codes) against one block whose codes unpack_block_floats gave; the
// outputs gather in `out` group by group.
template <int ROWS>
void four_bit_fma_tile(float* out, const float* row_codes, const Rows16& x, int64_t first_row, const float* weights,
                       const FourBitWeights& w, int64_t block, int64_t n, int64_t k_dim) {
  const int64_t groups = k_dim / kGroup;
  float* outputs[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    outputs[r] = out + (first_row + r) * n + block * kBlock;
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(outputs[r] + 8 * h, _mm256_setzero_ps());
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m256 sums[ROWS][2];
    for (int r = 0; r < ROWS; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
    const float* group_weights = weights + g * kGroup * kBlock;
    for (int i = 0; i < kGroup; ++i) {
      const __m256 low8 = _mm256_loadu_ps(group_weights + i * kBlock), high8 = _mm256_loadu_ps(group_weights + i * kBlock + 8);
      for (int r = 0; r < ROWS; ++r) {
        const __m256 code = _mm256_broadcast_ss(row_codes + (first_row + r) * k_dim + g * kGroup + i);
        sums[r][0] = _mm256_fmadd_ps(low8, code, sums[r][0]);
        sums[r][1] = _mm256_fmadd_ps(high8, code, sums[r][1]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (block * groups + g) * kBlock + 8 * h;
      const __m256 step = load_halves(w.steps + at), offset = load_halves(w.lows + at);
      for (int r = 0; r < ROWS; ++r) {  // four_bit_tile's fp32 steps, in its order
        const int64_t i = (first_row + r) * groups + g;
        __m256 acc = _mm256_loadu_ps(outputs[r] + 8 * h);
        acc = _mm256_fmadd_ps(sums[r][h], _mm256_mul_ps(_mm256_set1_ps(x.scales[i]), step), acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.sums[i]), offset, acc);
        _mm256_storeu_ps(outputs[r] + 8 * h, acc);
      }
    }
  }
  if (w.bias != nullptr)
    for (int r = 0; r < ROWS; ++r)
      for (int h = 0; h < 2; ++h) {
        const __m256 bias = _mm256_loadu_ps(w.bias + block * kBlock + 8 * h);
        _mm256_storeu_ps(outputs[r] + 8 * h, _mm256_add_ps(_mm256_loadu_ps(outputs[r] + 8 * h), bias));
      }
}

template <int ROWS>
void four_bit_fma_rows(float* out, const float* row_codes, const Rows16& x, int64_t first_row, int64_t rows,
                       const float* weights, const FourBitWeights& w, int64_t block, int64_t n, int64_t k_dim) {
  if constexpr (ROWS > 0) {
    for (; first_row + ROWS <= rows; first_row += ROWS)
      four_bit_fma_tile<ROWS>(out, row_codes, x, first_row, weights, w, block, n, k_dim);
    four_bit_fma_rows<ROWS - 1>(out, row_codes, x, first_row, rows, weights, w, block, n, k_dim);  // the rest
  }
}

// Every row against every block, the blocks split across PyTorch's threads.
void four_bit_fma(float* out, const Rows16& x, const FourBitWeights& w, int64_t rows, int64_t n, int64_t k_dim) {
  thread_local std::vector<float> row_codes;
  row_codes.resize(rows * k_dim);
  for (int64_t i = 0; i < rows * k_dim; ++i) row_codes[i] = static_cast<float>(x.codes[i]);
  const float* codes_as_floats = row_codes.data();
  at::parallel_for(0, n / kBlock, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> weights;
    weights.resize(k_dim * kBlock);
    for (int64_t block = begin; block < end; ++block) {
      unpack_block_floats(w.codes, block, k_dim, weights.data());
      four_bit_fma_rows<kFmaTileRows>(out, codes_as_floats, x, 0, rows, weights.data(), w, block, n, k_dim);
    }
  });
}

// ---- 4-bit weights times 8-bit rows (--quantization int4-a8) ----
//
// The rows quantized to 8 bits per group of 32 (scale = the group's largest magnitude / 127, as llama.cpp's
// Q8 activations), so one _mm256_maddubs_epi16 takes a code byte and a row byte with no second half: about half
// the integer instructions of the 16-bit rows above, and a third of the FMA path's. Sums stay exact: a pair is at
// most 2 * 15 * 127 = 3810, and a group's 8 pairs a lane (30480) fit int16 before _mm256_madd_epi16 widens them.

struct Rows8 {
  std::vector<int8_t> codes;  // (rows, k_dim): round(x / scale), |code| <= 127
  std::vector<float> scales;  // (rows, k_dim / 32)
  std::vector<float> sums;    // (rows, k_dim / 32): the group's fp32 sum of x
};

void quantize_rows8(const float* x, int64_t rows, int64_t k_dim, Rows8& q) {
  q.codes.resize(rows * k_dim);
  quantize_groups(x, rows, k_dim, 127.0f, q.scales, q.sums, [&](const Group& group, int64_t at) {
    __m256i c[4];  // round(x / scale) to nearest even
    for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_div_ps(group.v[i], group.divisor));
    // packs works within 128-bit lanes: 4-byte units c0[0-3] c1[0-3] c2[0-3] c3[0-3] | c0[4-7] ... c3[4-7]
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.codes.data() + at),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  });
}

// ROWS rows against one block of 16 outputs (two vectors of 8).
template <int ROWS>
void w4a8_tile(float* out, const Rows8& x, int64_t first_row, const FourBitWeights& w, int64_t block, int64_t n,
               int64_t k_dim) {
  const int64_t groups = k_dim / kGroup;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[ROWS][2];
    for (int r = 0; r < ROWS; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
    // Not unrolled: unrolled, GCC issued a group's 16 products first and kept them on the stack until the adds
    // (64 rows, alternated in one process on the 2-core Zen 3: 1.07-1.09x faster so).
#pragma GCC unroll 1
    for (int eight = 0; eight < kGroup / 8; ++eight) {
      const int64_t k = g * kGroup + 8 * eight;
      for (int h = 0; h < 2; ++h) {
        const uint8_t* bytes = w.codes + block * k_dim * (kBlock / 2) + k * (kBlock / 2) + 32 * h;
        if (h == 0)  // the next block's line (one prefetch a 64-byte line, not one a half: 3-10% faster)
          _mm_prefetch(reinterpret_cast<const char*>(bytes) + k_dim * (kBlock / 2), _MM_HINT_T1);
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
        const __m256i first4 = _mm256_and_si256(packed, nibble);                         // inputs k..k+3
        const __m256i next4 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);  // k+4..k+7
        for (int r = 0; r < ROWS; ++r) {
          const int8_t* row = x.codes.data() + (first_row + r) * k_dim + k;
          sums[r][h] = _mm256_add_epi16(sums[r][h], _mm256_maddubs_epi16(first4, broadcast4(row)));
          sums[r][h] = _mm256_add_epi16(sums[r][h], _mm256_maddubs_epi16(next4, broadcast4(row + 4)));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (block * groups + g) * kBlock + 8 * h;
      const __m256 step = load_halves(w.steps + at), offset = load_halves(w.lows + at);
      for (int r = 0; r < ROWS; ++r) {
        const int64_t i = (first_row + r) * groups + g;
        const __m256i sum = _mm256_madd_epi16(sums[r][h], ones);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(_mm256_set1_ps(x.scales[i]), step), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(x.sums[i]), offset, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) {
      const int64_t col = block * kBlock + 8 * h;
      __m256 result = acc[r][h];
      if (w.bias != nullptr) result = _mm256_add_ps(result, _mm256_loadu_ps(w.bias + col));
      _mm256_storeu_ps(out + (first_row + r) * n + col, result);
    }
}

// ---- 8-bit weights (csrc/q8_matmul.cpp's layout and fp32 steps) ----

// ROWS rows against one block of 16 outputs.
template <int ROWS>
void eight_bit_tile(float* out, const Rows16& x, int64_t first_row, const int8_t* codes, const float* scales,
                    int64_t block, int64_t n, int64_t k_dim) {
  constexpr int QUARTERS = 4;  // 4 outputs x 4 inputs of 16-bit codes fill a vector
  const int64_t groups = k_dim / kGroup;
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // pairs[r][c]: outputs 4c..4c+3 of the block, two int32 per output (inputs 0-1 and 2-3 of each quad)
    __m256i pairs[ROWS][QUARTERS];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < QUARTERS; ++c) pairs[r][c] = _mm256_setzero_si256();
    for (int quad = 0; quad < kGroup / 4; ++quad) {
      const int64_t k = g * kGroup + 4 * quad;
      const int8_t* wb = codes + block * k_dim * kBlock + k * kBlock;  // 16 lanes of 4 codes
      _mm_prefetch(reinterpret_cast<const char*>(wb) + k_dim * kBlock, _MM_HINT_T1);  // the next block's
      for (int c = 0; c < QUARTERS; ++c) {
        const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * c)));
        for (int r = 0; r < ROWS; ++r) {
          const __m256i row = broadcast8(x.codes.data() + (first_row + r) * k_dim + k);
          pairs[r][c] = _mm256_add_epi32(pairs[r][c], _mm256_madd_epi16(wide, row));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 weight_scale = _mm256_loadu_ps(scales + (block * groups + g) * kBlock + 8 * h);
      for (int r = 0; r < ROWS; ++r) {
        // hadd within 128-bit lanes gives outputs 0, 1, 4, 5 | 2, 3, 6, 7: put them in order
        const __m256i mixed = _mm256_hadd_epi32(pairs[r][2 * h], pairs[r][2 * h + 1]);
        const __m256i sum = _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(x.scales[(first_row + r) * groups + g]), weight_scale);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + (first_row + r) * n + block * kBlock + 8 * h, acc[r][h]);
}

// The ROWS rows run_row_tiles gives a tile (1-4), 2 at a time: tile(rows, first) for rows = 2 or 1 as
// std::integral_constant. With 16 vector registers the 3- and 4-row tiles spilled their accumulators (the 8-bit
// head's 4 rows: 16 int32 vectors, each loaded, added to and stored back on the stack every 4 inputs). Alternated
// in one process on a 2-core Zen 4 running this build, 2 threads, 30-60 times: the Q8_0 LM head at 64 rows 22.1
// -> 20.9 ms; SmolLM2's four 4-bit layer shapes at 4, 8 and 12 rows 427 -> 374, 637 -> 514 and 1004 -> 801 µs.
// Each row's sums are its own, so the same bits. Where the compiler has AVX-512VL (32 registers, see kFmaRows) a
// tile keeps its 4 rows, which did not spill there.
template <int ROWS, typename Tile>
void in_pairs(int64_t first, Tile tile) {
#if defined(__AVX512VL__)
  constexpr int kMostRows = 4;
#else
  constexpr int kMostRows = 2;
#endif
  if constexpr (ROWS <= kMostRows) {
    tile(std::integral_constant<int, ROWS>{}, first);
  } else {
    tile(std::integral_constant<int, 2>{}, first);
    in_pairs<ROWS - 2>(first + 2, tile);
  }
}

}  // namespace

extern "C" int kvserve_w4a16_matmul_avx2_supported() { return 3; }
extern "C" int kvserve_q8_matmul_avx2_supported() { return 3; }
extern "C" int kvserve_w4a8_matmul_avx2_supported() { return 3; }

// kvserve_w4a16_matmul's arguments and results (csrc/w4a16_matmul.cpp).
extern "C" void kvserve_w4a16_matmul_avx2(float* out, const float* x, const uint8_t* codes, const uint16_t* steps,
                                         const uint16_t* lows, const float* bias, int64_t rows, int64_t n,
                                         int64_t k_dim) {
  thread_local Rows16 quantized;  // read by every thread below
  quantize_rows(x, rows, k_dim, quantized);
  const Rows16& q = quantized;
  const FourBitWeights w{codes, steps, lows, bias};
  if (rows >= kFmaRows) {  // exact sums in fp32 FMAs, the same bits (see four_bit_fma)
    four_bit_fma(out, q, w, rows, n, k_dim);
    return;
  }
  run_row_tiles(TileBlocks<1, 1, 1, 1>{}, rows, n, [&](auto tile_rows, auto, int64_t first, int64_t from, int64_t to) {
    for (int64_t block = from; block < to; ++block)
      in_pairs<decltype(tile_rows)::value>(first, [&](auto pair_rows, int64_t at) {
        four_bit_tile<decltype(pair_rows)::value>(out, q, at, w, block, n, k_dim);
      });
  });
}

// kvserve_w4a16_matmul's arguments, the rows quantized to 8 bits (see w4a8_tile).
extern "C" void kvserve_w4a8_matmul_avx2(float* out, const float* x, const uint8_t* codes, const uint16_t* steps,
                                        const uint16_t* lows, const float* bias, int64_t rows, int64_t n,
                                        int64_t k_dim) {
  thread_local Rows8 quantized;
  quantize_rows8(x, rows, k_dim, quantized);
  const Rows8& q = quantized;
  const FourBitWeights w{codes, steps, lows, bias};
  run_row_tiles(TileBlocks<1, 1, 1, 1>{}, rows, n, [&](auto tile_rows, auto, int64_t first, int64_t from, int64_t to) {
    for (int64_t block = from; block < to; ++block)
      in_pairs<decltype(tile_rows)::value>(first, [&](auto pair_rows, int64_t at) {
        w4a8_tile<decltype(pair_rows)::value>(out, q, at, w, block, n, k_dim);
      });
  });
}

// kvserve_q8_matmul's arguments and results (csrc/q8_matmul.cpp); the corrections are VNNI's, not needed here.
extern "C" void kvserve_q8_matmul_avx2(float* out, const float* x, const int8_t* codes, const float* scales,
                                      const int32_t* /* corrections */, int64_t rows, int64_t n, int64_t k_dim) {
  thread_local Rows16 quantized;
  quantize_rows(x, rows, k_dim, quantized);
  const Rows16& q = quantized;
  run_row_tiles(TileBlocks<1, 1, 1, 1>{}, rows, n, [&](auto tile_rows, auto, int64_t first, int64_t from, int64_t to) {
    for (int64_t block = from; block < to; ++block)
      in_pairs<decltype(tile_rows)::value>(first, [&](auto pair_rows, int64_t at) {
        eight_bit_tile<decltype(pair_rows)::value>(out, q, at, codes, scales, block, n, k_dim);
      });
  });
}

#else

extern "C" int kvserve_w4a16_matmul_avx2_supported() { return 0; }
extern "C" int kvserve_q8_matmul_avx2_supported() { return 0; }
extern "C" int kvserve_w4a8_matmul_avx2_supported() { return 0; }
extern "C" void kvserve_w4a16_matmul_avx2(float*, const float*, const uint8_t*, const uint16_t*, const uint16_t*,
                                         const float*, int64_t, int64_t, int64_t) {}
extern "C" void kvserve_q8_matmul_avx2(float*, const float*, const int8_t*, const float*, const int32_t*, int64_t,
                                      int64_t, int64_t) {}
extern "C" void kvserve_w4a8_matmul_avx2(float*, const float*, const uint8_t*, const uint16_t*, const uint16_t*,
                                        const float*, int64_t, int64_t, int64_t) {}

#endif
