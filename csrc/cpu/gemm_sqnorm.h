// Fused "GEMM, square, sum" for the CPU materialize path (AVX-512).
//
// For one panel of `width` columns it returns ||W||_F^2 with
//   W[i][j] = sum_{k in K} a[k * lda + i] * panel[k * k_step + j * j_step],   i < M, j < width,
// where a holds output gradients (i = output channel, contiguous) and the panel nr
// columns of activations (im2col rows of a convolution, inputs of a linear layer).
// W is formed tile by tile in registers, squared and summed there, never stored.
// Columns the caller does not want must be zeros in the panel.
// With `wt`, W is also added into memory, column by column: column j of a tile of channels
// i0.. goes to wt[j * ldw + i0 ..] (the weight gradient's transpose, summed over the calls: the
// fused weight-gradient op). Zero columns add zeros, so wt needs rows for them.
#pragma once

#include <cstdint>

namespace fisher_ext {

// True when the CPU runs AVX-512F and FISHER_EXT_CPU_NO_AVX512 is unset (read on every call,
// so tests can cover the BLAS fallback in the same process).
bool fused_gemm_sqnorm_available();

// True when the CPU has native bfloat16 GEMMs (AVX512-BF16 or AMX-BF16, used through oneDNN) and
// FISHER_EXT_CPU_NO_BF16_GEMM is unset (read on every call, like the above).
bool bf16_gemm_available();

// The full panel widths of the register tiles, and the one for M output channels and `rows` panel
// columns in all: 24 for up to 16 channels (one 16-lane tile), else 12 or 14, whichever leaves
// the fuller last panel (a narrow one has too few accumulators to keep the FMA units busy).
constexpr int64_t kFusedPanelWidths[] = {12, 14, 16, 24};
int64_t fused_panel_width(int64_t M, int64_t rows);

// The positions K the kernel sums over: `count` runs of `length` consecutive positions, run r
// starting at position r * stride. {1, n, n} is simply the positions 0..n-1; runs let the
// shifted convolution layout skip the padding columns between output rows.
struct PositionRuns {
  int64_t count, length, stride;
};

// dst[p * ldd + c] = src[c * lds + p] for c < C <= 16 and p < n (C rows of n contiguous values),
// a 16 x 16 block at a time in registers; unless sums is null, sums[c] += the values of row c
// (float). Needs fused_gemm_sqnorm_available().
void transpose_rows(const float* src, int64_t lds, int64_t C, int64_t n, float* dst, int64_t ldd, float* sums);

// The ghost rule's Gram matrices (float accumulation), in `gram` (T x T, both triangles):
//   gram[i][j] = sum_s x_{i,s} . x_{j,s},  x_{i,s} = the d values at base + rows[i] + shifts[s],
// one triangle formed, 4 x 4 dot products at a time in registers. A linear layer's rows are its
// positions (one shift, 0); a convolution's are output positions in a channels-last grid, the
// shifts its kernel offsets (the unfolded input's Gram without unfolding it). Needs
// fused_gemm_sqnorm_available().
void gram_at(const float* base, const int64_t* rows, int64_t T, const int64_t* shifts, int64_t S, int64_t d,
             float* gram);

// <a, b>_F of two T x T matrices, in double: the ghost norm from the two Gram matrices.
double gram_dot(const float* a, const float* b, int64_t T);

// Needs fused_gemm_sqnorm_available(). The register tiles take 32 channels for M > 16 and 16
// for M <= 16; width is a panel's columns, up to 14 and up to 24 respectively: a layer's panels
// are fused_panel_width wide, but its last one may be narrower (no zero columns to compute).
double fused_panel_sqnorm(const float* a, int64_t lda, int64_t M, const float* panel, int64_t k_step, int64_t j_step,
                          PositionRuns K, int64_t width, float* wt = nullptr, int64_t ldw = 0);

}  // namespace fisher_ext
