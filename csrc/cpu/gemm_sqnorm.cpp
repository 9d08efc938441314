// AVX-512 micro-kernel of the fused GEMM-square-sum (see gemm_sqnorm.h).
//
// A tile of W is 32 output channels x 12 or 14 panel columns, 16 x 24, or 16 x 16, held in
// 24, 28 (24, 16) zmm accumulators. Per k it loads 2 (1) vectors
// of A, masked at the channel tail, and broadcasts 12 or 14 (24) panel values: 24 or 28 FMAs
// for 14 or 16 (25) loads, so the loop is FMA-bound. The panel's two strides are run-time
// values at no measured cost (same GFLOPS as a fixed interleaved layout). Compiled with a target attribute and chosen
// at run time, so the rest of the build needs no -mavx512f.
#include "gemm_sqnorm.h"

#include <immintrin.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <utility>

namespace fisher_ext {
namespace {

#define FISHER_EXT_AVX512 __attribute__((target("avx512f")))

// The accumulators are named variables, not an array: GCC keeps an array of __m512 in
// memory and stores every accumulator on every k (seen in the assembly: 3x slower).
#define FX_REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define FX_REP14(X) FX_REP12(X) X(12) X(13)
#define FX_REP24(X) FX_REP12(X) X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)

// wt[0, 16) += c on the lanes of mask (a column of the weight gradient's transpose).
FISHER_EXT_AVX512 inline void add_column(float* wt, __mmask16 mask, __m512 c) {
  if (mask) _mm512_mask_storeu_ps(wt, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, wt), c));
}

// 32 channels x NR columns (NR <= 14): 2 NR accumulators; the unused ones compile away. JS: the
// panel's column stride where it is known at compile time (1: columns adjacent, the broadcasts
// take constant offsets instead of a register each), 0 where it is js.
template <int NR, int JS>
FISHER_EXT_AVX512 float tile_32xN(const float* a_base, int64_t lda, __mmask16 mask0, __mmask16 mask1,
                                  const float* panel_base, int64_t ks, int64_t js_runtime, PositionRuns K, float* wt,
                                  int64_t ldw) {
  const int64_t js = JS ? JS : js_runtime;
  static_assert(NR <= 14, "at most 28 accumulators");
#define FX_DECL(j) __m512 c0_##j = _mm512_setzero_ps(), c1_##j = _mm512_setzero_ps();
  FX_REP14(FX_DECL)
  for (int64_t r = 0; r < K.count; ++r) {
    const float* a = a_base + r * K.stride * lda;
    const float* panel = panel_base + r * K.stride * ks;
    for (int64_t k = 0; k < K.length; ++k, a += lda, panel += ks) {
      const __m512 a0 = _mm512_maskz_loadu_ps(mask0, a);
      const __m512 a1 = _mm512_maskz_loadu_ps(mask1, a + 16);
#define FX_STEP(j)                                  \
  if (j < NR) {                                     \
    const __m512 b = _mm512_set1_ps(panel[j * js]); \
    c0_##j = _mm512_fmadd_ps(a0, b, c0_##j);        \
    c1_##j = _mm512_fmadd_ps(a1, b, c1_##j);        \
  }
      FX_REP14(FX_STEP)
    }
  }
  __m512 s = _mm512_setzero_ps();
#define FX_SUM(j)                           \
  if (j < NR) {                             \
    s = _mm512_fmadd_ps(c0_##j, c0_##j, s); \
    s = _mm512_fmadd_ps(c1_##j, c1_##j, s); \
  }
  FX_REP14(FX_SUM)
  if (wt) {
#define FX_ADD(j)                                 \
  if (j < NR) {                                   \
    add_column(wt + j * ldw, mask0, c0_##j);      \
    add_column(wt + j * ldw + 16, mask1, c1_##j); \
  }
    FX_REP14(FX_ADD)
  }
  return _mm512_reduce_add_ps(s);
#undef FX_DECL
#undef FX_STEP
#undef FX_SUM
#undef FX_ADD
}

// 16 channels x NR columns (NR <= 24): NR accumulators; the unused ones compile away. JS: as above.
template <int NR, int JS>
FISHER_EXT_AVX512 float tile_16xN(const float* a_base, int64_t lda, __mmask16 mask0, __mmask16, const float* panel_base,
                                  int64_t ks, int64_t js_runtime, PositionRuns K, float* wt, int64_t ldw) {
  const int64_t js = JS ? JS : js_runtime;
  static_assert(NR <= 24, "at most 24 accumulators");
#define FX_DECL(j) __m512 c_##j = _mm512_setzero_ps();
  FX_REP24(FX_DECL)
  for (int64_t r = 0; r < K.count; ++r) {
    const float* a = a_base + r * K.stride * lda;
    const float* panel = panel_base + r * K.stride * ks;
    for (int64_t k = 0; k < K.length; ++k, a += lda, panel += ks) {
      const __m512 a0 = _mm512_maskz_loadu_ps(mask0, a);
#define FX_STEP(j) \
  if (j < NR) c_##j = _mm512_fmadd_ps(a0, _mm512_set1_ps(panel[j * js]), c_##j);
      FX_REP24(FX_STEP)
    }
  }
  __m512 s = _mm512_setzero_ps();
#define FX_SUM(j) \
  if (j < NR) s = _mm512_fmadd_ps(c_##j, c_##j, s);
  FX_REP24(FX_SUM)
  if (wt) {
#define FX_ADD(j) \
  if (j < NR) add_column(wt + j * ldw, mask0, c_##j);
    FX_REP24(FX_ADD)
  }
  return _mm512_reduce_add_ps(s);
#undef FX_DECL
#undef FX_STEP
#undef FX_SUM
#undef FX_ADD
}

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

template <int MR, float (*tile)(const float*, int64_t, __mmask16, __mmask16, const float*, int64_t, int64_t,
                                PositionRuns, float*, int64_t)>
FISHER_EXT_AVX512 double panel_sqnorm(const float* a, int64_t lda, int64_t M, const float* panel, int64_t ks,
                                      int64_t js, PositionRuns K, float* wt, int64_t ldw) {
  double total = 0;
  for (int64_t i0 = 0; i0 < M; i0 += MR)
    total += tile(a + i0, lda, lanes(M - i0), lanes(M - i0 - 16), panel, ks, js, K, wt ? wt + i0 : nullptr, ldw);
  return total;
}

// The panel function for every width 1..sizeof...(W) of the MR-channel tiles: a panel's last,
// narrower columns run a tile of their own width instead of zero columns.
using PanelFn = double (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, PositionRuns, float*,
                           int64_t);
template <int MR, int JS, size_t... W>
constexpr std::array<PanelFn, sizeof...(W)> panel_table(std::index_sequence<W...>) {
  if constexpr (MR == 32) {
    return {&panel_sqnorm<32, tile_32xN<int(W) + 1, JS>>...};
  } else {
    return {&panel_sqnorm<16, tile_16xN<int(W) + 1, JS>>...};
  }
}

// r[c] (16 values of row c) becomes r[p] (value p of every row): unpacks of 32- and 64-bit pairs
// within 128-bit lanes, then two rounds of lane shuffles.
FISHER_EXT_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

FISHER_EXT_AVX512 void transpose_rows_avx512(const float* src, int64_t lds, int64_t C, int64_t n, float* dst,
                                             int64_t ldd, float* sums) {
  const __mmask16 channels = lanes(C);
  __m512 total = _mm512_setzero_ps();  // lane c: row c's sum
  for (int64_t p0 = 0; p0 < n; p0 += 16) {
    const int64_t np = std::min<int64_t>(16, n - p0);
    const __mmask16 positions = lanes(np);
    __m512 r[16];
    for (int c = 0; c < 16; ++c)
      r[c] = c < C ? _mm512_maskz_loadu_ps(positions, src + c * lds + p0) : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t p = 0; p < np; ++p) {
      _mm512_mask_storeu_ps(dst + (p0 + p) * ldd, channels, r[p]);
      total = _mm512_add_ps(total, r[p]);
    }
  }
  if (sums) _mm512_mask_storeu_ps(sums, channels, _mm512_add_ps(_mm512_maskz_loadu_ps(channels, sums), total));
}

// gram[i * T + j] = sum_s x_{i,s} . x_{j,s} (both triangles), x_{i,s} the d values at
// base + rows[i] + shifts[s]. Blocks of 4 x 4 rows on and above the diagonal; rows past T repeat
// row T - 1 and their sums are dropped.
FISHER_EXT_AVX512 void gram_at_avx512(const float* base, const int64_t* rows, int64_t T, const int64_t* shifts,
                                      int64_t S, int64_t d, float* gram) {
  for (int64_t i0 = 0; i0 < T; i0 += 4)
    for (int64_t j0 = i0; j0 < T; j0 += 4) {
      int64_t at[8];
      for (int q = 0; q < 4; ++q) {
        at[q] = rows[std::min(i0 + q, T - 1)];
        at[4 + q] = rows[std::min(j0 + q, T - 1)];
      }
#define FX_DECL4(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0
      FX_DECL4(0);
      FX_DECL4(1);
      FX_DECL4(2);
      FX_DECL4(3);
      for (int64_t sh = 0; sh < S; ++sh) {
        const float* r[8];
        for (int q = 0; q < 8; ++q) r[q] = base + at[q] + shifts[sh];
        for (int64_t k = 0; k < d; k += 16) {
          const __mmask16 mask = lanes(d - k);
          const __m512 a0 = _mm512_maskz_loadu_ps(mask, r[0] + k), a1 = _mm512_maskz_loadu_ps(mask, r[1] + k);
          const __m512 a2 = _mm512_maskz_loadu_ps(mask, r[2] + k), a3 = _mm512_maskz_loadu_ps(mask, r[3] + k);
          const __m512 b0 = _mm512_maskz_loadu_ps(mask, r[4] + k), b1 = _mm512_maskz_loadu_ps(mask, r[5] + k);
          const __m512 b2 = _mm512_maskz_loadu_ps(mask, r[6] + k), b3 = _mm512_maskz_loadu_ps(mask, r[7] + k);
#define FX_ROW4(i)                              \
  c##i##0 = _mm512_fmadd_ps(a##i, b0, c##i##0); \
  c##i##1 = _mm512_fmadd_ps(a##i, b1, c##i##1); \
  c##i##2 = _mm512_fmadd_ps(a##i, b2, c##i##2); \
  c##i##3 = _mm512_fmadd_ps(a##i, b3, c##i##3);
          FX_ROW4(0) FX_ROW4(1) FX_ROW4(2) FX_ROW4(3)
        }
      }
      const __m512 c[16] = {c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33};
      for (int p = 0; p < 4 && i0 + p < T; ++p)
        for (int q = 0; q < 4 && j0 + q < T; ++q) {
          const float v = _mm512_reduce_add_ps(c[p * 4 + q]);
          gram[(i0 + p) * T + j0 + q] = v;
          gram[(j0 + q) * T + i0 + p] = v;
        }
#undef FX_DECL4
#undef FX_ROW4
    }
}

// Whether the environment variable `name` turns a kernel off (set, and neither empty nor "0").
bool turned_off(const char* name) {
  const char* value = std::getenv(name);
  return value && *value && *value != '0';
}

}  // namespace

void transpose_rows(const float* src, int64_t lds, int64_t C, int64_t n, float* dst, int64_t ldd, float* sums) {
  TORCH_CHECK(C >= 0 && C <= 16, "transpose_rows: C: expected 0 to 16 rows, got ", C);
  transpose_rows_avx512(src, lds, C, n, dst, ldd, sums);
}

bool fused_gemm_sqnorm_available() {
  static const bool cpu_has_it = __builtin_cpu_supports("avx512f");
  return cpu_has_it && !turned_off("FISHER_EXT_CPU_NO_AVX512");
}

bool bf16_gemm_available() {
  static const bool cpu_has_it = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return cpu_has_it && !turned_off("FISHER_EXT_CPU_NO_BF16_GEMM");
}

int64_t fused_panel_width(int64_t M, int64_t rows) {
  if (M <= 16) return 24;
  const auto padded = [rows](int64_t w) { return (rows + w - 1) / w * w; };
  return padded(14) < padded(12) ? 14 : 12;  // 12 where it pads no more: fewer accumulators
}

void gram_at(const float* base, const int64_t* rows, int64_t T, const int64_t* shifts, int64_t S, int64_t d,
             float* gram) {
  gram_at_avx512(base, rows, T, shifts, S, d, gram);
}

double gram_dot(const float* a, const float* b, int64_t T) {
  double total = 0;
  for (int64_t i = 0; i < T * T; ++i) total += double(a[i]) * b[i];
  return total;
}

double fused_panel_sqnorm(const float* a, int64_t lda, int64_t M, const float* panel, int64_t k_step, int64_t j_step,
                          PositionRuns K, int64_t width, float* wt, int64_t ldw) {
  const bool adjacent = j_step == 1;
  if (M <= 16) {
    TORCH_CHECK(width >= 1 && width <= 24, "fused_panel_sqnorm: width: expected 1 to 24 for ", M, " channels, got ",
                width);
    static constexpr auto adjacent16 = panel_table<16, 1>(std::make_index_sequence<24>());
    static constexpr auto strided16 = panel_table<16, 0>(std::make_index_sequence<24>());
    return (adjacent ? adjacent16 : strided16)[width - 1](a, lda, M, panel, k_step, j_step, K, wt, ldw);
  }
  TORCH_CHECK(width >= 1 && width <= 14, "fused_panel_sqnorm: width: expected 1 to 14 for ", M, " channels, got ",
              width);
  static constexpr auto adjacent32 = panel_table<32, 1>(std::make_index_sequence<14>());
  static constexpr auto strided32 = panel_table<32, 0>(std::make_index_sequence<14>());
  return (adjacent ? adjacent32 : strided32)[width - 1](a, lda, M, panel, k_step, j_step, K, wt, ldw);
}

}  // namespace fisher_ext
