// What the integer matmuls share (csrc/q8_matmul.cpp, csrc/w4a16_matmul.cpp): rows quantized to 16 bits per
// group of 32 inputs and split into bytes for VNNI's and AMX's byte products, and the AMX tile set-up.
//
// A row's group of 32 becomes code = round(x / scale), scale = the group's largest magnitude / 32767: within
// 1/65534 of that magnitude (bf16 rounds each value to 1/256 of itself). Products with 8-bit weight codes
// then come in two byte halves, code = 256 * high + low (high signed, low unsigned), summed in int32 apart
// and combined as 256 * high_sum + low_sum: exact, and below 2^24 for groups of 32 (so exact in fp32 too).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace kvserve {

constexpr int kGroup = 32;  // inputs per scale, for weights and rows alike
constexpr int kBlock = 16;  // outputs per block of the packed weights: one AVX-512 vector

// How many blocks of outputs a tile of 1, 2, 3 and 4 rows takes (see run_row_tiles).
template <int OneRow, int TwoRows, int ThreeRows, int FourRows>
struct TileBlocks {};

// Work items of (up to 4 rows, a run of ~8 blocks), on PyTorch's threads, so one row still splits across threads
// by blocks: tile(ROWS, BLOCKS, first, from, to) runs tiles of ROWS rows x BLOCKS blocks over blocks [from, to),
// ROWS and BLOCKS as std::integral_constant, BLOCKS from the kernel's TileBlocks for 1 to 4 rows. A thread takes
// its runs one after the other, each for every 4 rows in turn, so a run's weights are read from memory once a
// call: taken 4 rows at a time over all its runs, a thread read SmolLM2's Q8_0 LM head (28 MB) from memory once
// per 4 rows, and at 64 rows the head took 14.5 ms against 11.7 (VNNI; AVX2 build 29.9 against 23.7; 16 rows
// 3.46 against 2.81), the two orders alternated 40 times in one process on a 2-core Zen 4, 2 threads. The 4-bit
// layers (0.2-0.9 MB) took the same time either way.
//
// Each kernel gives its own tile widths, measured: a tile's accumulators, its broadcast inputs and its weights
// must fit in the vector registers, or the compiler spills them in the inner loop (4 rows x 2 blocks of the
// int4 kernel spilled ~20 a step of eight inputs). Tiles alternated in one process on a 2-core Zen 4 over
// SmolLM2's shapes: 4 x 1 instead of 4 x 2 took 4 to 64 rows 9% faster (int4) and 8-18% (Q8_0 head); the
// Q8_0 head's 2 x 2 and 3 x 1 beat 2 x 4 and 3 x 2 by 13% and 6%.
template <int B1, int B2, int B3, int B4, typename Tile>
void run_row_tiles(TileBlocks<B1, B2, B3, B4>, int64_t rows, int64_t n, Tile tile) {
  const int64_t blocks = n / kBlock;
  // Runs of about 8 blocks, as many as a multiple of the thread count, of sizes differing by at most one block:
  // with fixed runs of 8, a 576-output matmul at one row (36 blocks: 8, 8, 8 | 8, 4) kept one thread busy
  // twice as long as the other.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = (rows + 3) / 4;
  const int64_t runs = std::max<int64_t>(1, std::min(blocks, ((blocks + 7) / 8 + threads - 1) / threads * threads));
  at::parallel_for(0, chunks * runs, 1, [&](int64_t begin, int64_t end) {
    using std::integral_constant;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t run = item / chunks, first = item % chunks * 4;
      const int64_t from = run * blocks / runs, to = (run + 1) * blocks / runs;
      switch (std::min<int64_t>(4, rows - first)) {
        case 1: tile(integral_constant<int, 1>{}, integral_constant<int, B1>{}, first, from, to); break;
        case 2: tile(integral_constant<int, 2>{}, integral_constant<int, B2>{}, first, from, to); break;
        case 3: tile(integral_constant<int, 3>{}, integral_constant<int, B3>{}, first, from, to); break;
        default: tile(integral_constant<int, 4>{}, integral_constant<int, B4>{}, first, from, to); break;
      }
    }
  });
}

// Added to a group's scale: 0, or NaN where the group holds an inf or a NaN (`differences` sums x - x over the
// group, 0 for finite values only). The scale multiplies every output of the row, so such a row's outputs are all
// NaN in every build and path, whatever the codes its non-finite values round to (they differ between builds).
inline float nonfinite_mark(float differences) { return differences == 0.0f ? 0.0f : NAN; }

}  // namespace kvserve

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace kvserve {

constexpr int64_t kAmxRows = 8;  // from this many rows AMX tiles multiply (the same exact sums, less work)

struct QuantizedRows {
  std::vector<uint8_t> low;   // (rows, k_dim): the codes' low bytes (unsigned)
  std::vector<int8_t> high;   // (rows, k_dim): their high bytes (signed)
  std::vector<float> scales;  // (rows, k_dim / 32)
  std::vector<float> sums;    // (rows, k_dim / 32): the group's fp32 sum of x, in order
};

inline void quantize_rows(const float* x, int64_t rows, int64_t k_dim, QuantizedRows& q) {
  const int64_t groups = k_dim / kGroup;
  q.low.resize(rows * k_dim);
  q.high.resize(rows * k_dim);
  q.scales.resize(rows * groups);
  q.sums.resize(rows * groups);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = r * k_dim + g * kGroup;
      const __m512 a = _mm512_loadu_ps(x + at), b = _mm512_loadu_ps(x + at + 16);
      const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
      const float scale = top / 32767.0f + nonfinite_mark(_mm512_reduce_add_ps(
                                                 _mm512_add_ps(_mm512_sub_ps(a, a), _mm512_sub_ps(b, b))));
      q.scales[r * groups + g] = scale;
      q.sums[r * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));  // a fixed order, the same for every row
      // round(x / scale) to nearest even (the default rounding mode); |x| <= top, so |code| <= 32767
      const __m512 divisor = _mm512_set1_ps(scale > 0.0f ? scale : 1.0f);
      for (int half = 0; half < 2; ++half) {
        const __m512i code = _mm512_cvtps_epi32(_mm512_div_ps(half ? b : a, divisor));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.low.data() + at + 16 * half), _mm512_cvtepi32_epi8(code));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.high.data() + at + 16 * half),
                         _mm512_cvtepi32_epi8(_mm512_srai_epi32(code, 8)));
      }
    }
}

inline __m512i broadcast4(const void* bytes) {  // 4 bytes (one lane's inputs) into every lane
  int32_t four;
  __builtin_memcpy(&four, bytes, 4);
  return _mm512_set1_epi32(four);
}

inline __m512i combine_halves(__m512i high_sum, __m512i low_sum) {  // 256 * high + low
  return _mm512_add_epi32(_mm512_slli_epi32(high_sum, 8), low_sum);
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define KVSERVE_AMX_INT8 1

// Linux hands out AMX's tile state only to processes that ask for it (oneDNN asks too; asking twice is fine).
inline bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// Tiles 0 and 3: sums of the high and low bytes (m rows x 16 int32); 1 and 4: m rows' high and low bytes for one
// group (32 each); 2: a block's weight codes for the group (8 quads of inputs x 16 outputs x 4 bytes).
inline void configure_tiles(int m) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t : {0, 3}) config.bytes_per_row[t] = 64, config.rows[t] = static_cast<uint8_t>(m);
  for (int t : {1, 4}) config.bytes_per_row[t] = kGroup, config.rows[t] = static_cast<uint8_t>(m);
  config.bytes_per_row[2] = 64;
  config.rows[2] = kGroup / 4;
  _tile_loadconfig(&config);
}
#endif

// 0: no integer kernel here; 1: VNNI; 2: VNNI, and AMX tiles from kAmxRows rows (each kernel's _supported()).
inline int integer_kernel_kind() {
#if defined(KVSERVE_AMX_INT8)
  if (amx_permitted()) return 2;
#endif
  return 1;
}

// One call of an integer kernel over `rows` quantized rows and n / 16 blocks of outputs, on PyTorch's threads:
// - AMX (from kAmxRows rows, where permitted): each thread takes a range of blocks; full 16-row chunks go in one
//   pass over its blocks and the rest in a second, so the tiles are configured twice a call, not twice a block.
//   on_block(block) prepares a block once a pass, on_chunk(block, first, m) multiplies rows [first, first + m).
// - VNNI: run_row_tiles with the kernel's tile widths.
template <int B1, int B2, int B3, int B4, typename Vnni, typename OnBlock, typename OnChunk>
void run_integer_kernel(TileBlocks<B1, B2, B3, B4> widths, int64_t rows, int64_t n, Vnni vnni,
                        [[maybe_unused]] OnBlock on_block, [[maybe_unused]] OnChunk on_chunk) {
#if defined(KVSERVE_AMX_INT8)
  if (rows >= kAmxRows && amx_permitted()) {
    const int64_t blocks = n / kBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t full = rows / 16 * 16;
      const int64_t passes[2][2] = {{0, full}, {full, rows}};
      for (const auto& pass : passes) {
        if (pass[0] == pass[1]) continue;
        const int m = static_cast<int>(std::min<int64_t>(16, pass[1] - pass[0]));
        configure_tiles(m);
        for (int64_t block = begin; block < end; ++block) {
          on_block(block);
          for (int64_t first = pass[0]; first < pass[1]; first += 16) on_chunk(block, first, m);
        }
      }
      _tile_release();
    });
    return;
  }
#endif
  run_row_tiles(widths, rows, n, vnni);
}

}  // namespace kvserve

#endif
