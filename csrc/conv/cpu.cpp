// The convolution ops' CPU kernels: the linear rule on each example's im2col matrix, gathered
// straight from x through its strides (padding, stride, dilation, groups handled on the fly).
// float32 materialize on AVX-512 CPUs uses the fused register-tiled kernel of gemm_sqnorm.h, fed
// one im2col panel at a time (implicit GEMM) or, for stride 1, the shifted grid read in place;
// ghost may take Gram matrices of the padded input instead of the unfolded one; otherwise each
// block's im2col buffer (block x C_in*K x P) goes through batched BLAS GEMMs, the groups of all
// the block's examples as one batch. Either way there is no unfold buffer of the whole batch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpu/blocks.h"
#include "entry.h"

namespace fisher_ext {
namespace {

// Strides of x normalized to (n, c, z, h, w); a missing leading spatial dim gets stride 0.
std::array<int64_t, 5> strides5(const Tensor& t) {
  std::array<int64_t, 5> st{0, 0, 0, 0, 0};
  const int64_t nd = t.dim() - 2;
  st[0] = t.stride(0);
  st[1] = t.stride(1);
  for (int64_t i = 0; i < nd; ++i) st[2 + 3 - nd + i] = t.stride(2 + i);
  return st;
}

// Output positions o in [0, out) whose input index o * stride + shift lies in [0, in).
inline std::pair<int64_t, int64_t> valid_range(int64_t shift, int64_t stride, int64_t in, int64_t out) {
  const int64_t lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
  const int64_t hi = in - 1 - shift < 0 ? 0 : (in - 1 - shift) / stride + 1;
  return {std::min(lo, out), std::max(std::min(hi, out), std::min(lo, out))};
}

// im2col row r = (c, kz, kh, kw) of one example into dst[0, P). Reads x in place through its
// strides; out-of-range reads are zeros.
template <typename scalar_t, typename acc_t>
void pack_row(const scalar_t* xn, const std::array<int64_t, 5>& st, const ConvShape& s, int64_t r, acc_t* dst) {
  const int64_t kv = s.k_vol(), c = r / kv, kk = r % kv;
  const int64_t kw = kk % s.k[2], kh = (kk / s.k[2]) % s.k[1], kz = kk / (s.k[2] * s.k[1]);
  const scalar_t* xc = xn + c * st[1];
  const int64_t W = s.out[2], shift_w = kw * s.dil[2] - s.pad[2], src_step = s.stride[2] * st[4];
  const auto [w_lo, w_hi] = valid_range(shift_w, s.stride[2], s.in[2], W);
  for (int64_t oz = 0; oz < s.out[0]; ++oz) {
    const int64_t iz = oz * s.stride[0] - s.pad[0] + kz * s.dil[0];
    for (int64_t oh = 0; oh < s.out[1]; ++oh, dst += W) {
      const int64_t ih = oh * s.stride[1] - s.pad[1] + kh * s.dil[1];
      const bool inside = iz >= 0 && iz < s.in[0] && ih >= 0 && ih < s.in[1];
      const int64_t lo = inside ? w_lo : W, hi = inside ? w_hi : W;
      const scalar_t* src = xc + iz * st[2] + ih * st[3] + shift_w * st[4];
      std::fill(dst, dst + lo, acc_t(0));
      if (src_step == 1)  // the common case, kept apart so that it vectorizes
        for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = static_cast<acc_t>(src[ow]);
      else
        for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = static_cast<acc_t>(src[ow * src_step]);
      std::fill(dst + hi, dst + W, acc_t(0));
    }
  }
}

// g of one example, (C_out, positions) through its strides, transposed into gt as float:
// output position (oz, oh, ow) becomes row oz * pitch_z + oh * pitch_h + ow of C_out values
// (rows between are left alone). 16 channels at a time (float32 with contiguous rows: 16 x 16
// blocks in registers); ATen's strided copy of the transpose is ~10x slower. Returns the bias
// term ||sum_p g[:, p]||^2, summed on the way; unless bias_grad is null, adds sum_p g[:, p] into it
// (C_out values: the bias gradient of the examples so far).
template <typename scalar_t>
double pack_transposed(const scalar_t* gn, const std::array<int64_t, 5>& st, const ConvShape& s, int64_t pitch_h,
                       int64_t pitch_z, float* gt, float* bias_grad) {
  constexpr int64_t kChannels = 16;
  double bias_sq = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (st[4] == 1 && fused_gemm_sqnorm_available()) {  // contiguous rows: 16 x 16 blocks in registers
      for (int64_t o0 = 0; o0 < s.C_out; o0 += kChannels) {
        const int64_t width = std::min(kChannels, s.C_out - o0);
        float sums[kChannels] = {};
        for (int64_t oz = 0; oz < s.out[0]; ++oz)
          for (int64_t oh = 0; oh < s.out[1]; ++oh)
            transpose_rows(gn + o0 * st[1] + oz * st[2] + oh * st[3], st[1], width, s.out[2],
                           gt + (oz * pitch_z + oh * pitch_h) * s.C_out + o0, s.C_out, sums);
        for (int64_t o = 0; o < width; ++o) {
          bias_sq += double(sums[o]) * sums[o];
          if (bias_grad) bias_grad[o0 + o] += sums[o];
        }
      }
      return bias_sq;
    }
  }
  for (int64_t o0 = 0; o0 < s.C_out; o0 += kChannels) {
    const int64_t width = std::min(kChannels, s.C_out - o0);
    double sums[kChannels] = {};
    for (int64_t oz = 0; oz < s.out[0]; ++oz)
      for (int64_t oh = 0; oh < s.out[1]; ++oh) {
        const scalar_t* src = gn + o0 * st[1] + oz * st[2] + oh * st[3];
        float* dst = gt + (oz * pitch_z + oh * pitch_h) * s.C_out + o0;
        for (int64_t ow = 0; ow < s.out[2]; ++ow, dst += s.C_out)
          for (int64_t o = 0; o < width; ++o) {
            const float v = static_cast<float>(src[o * st[1] + ow * st[4]]);
            dst[o] = v;
            sums[o] += v;
          }
      }
    for (int64_t o = 0; o < width; ++o) {
      bias_sq += sums[o] * sums[o];
      if (bias_grad) bias_grad[o0 + o] += static_cast<float>(sums[o]);
    }
  }
  return bias_sq;
}

// Rows of P values in the fused paths' buffers are laid P + kPitchPad floats apart: a pitch of a
// power of two (32 x 32 outputs) would put all the kernel's panel columns in one L1 cache set.
constexpr int64_t kPitchPad = 16;

// Fused path (float32 accumulation, AVX-512): per group, the im2col rows are packed a panel
// (nr rows of P) at a time into a small cache-resident buffer and consumed at once by the
// register-tiled kernel: implicit GEMM, no im2col matrix in memory. A few examples (their g
// transposed) go through each panel in turn (examples_in_cache).
// wt (or null): the weight gradient's transpose, (groups, rows, cout_g);
// bias_grad (or null): the bias gradient (C_out); bias_result (or null): the bias's norms, kept
// apart from the weight's in result.
template <typename scalar_t>
void conv_block_fused(const Tensor& x, const Tensor& g, const ConvShape& s, bool bias, int64_t n0, int64_t cnt,
                      Scratch& scratch, float* result, float* wt, float* bias_grad, float* bias_result) {
  const auto xst = strides5(x), gst = strides5(g);
  const int64_t P = s.out_vol(), rows = s.cin_g * s.k_vol(), nr = fused_panel_width(s.cout_g, rows);
  const int64_t pitch = P + kPitchPad;
  const int64_t m = examples_in_cache(P * s.C_out * int64_t(sizeof(float)), cnt);
  const auto opts = x.options().dtype(at::kFloat);
  float* panel = scratch.get(0, {pitch * nr}, opts).data_ptr<float>();
  float* gts = scratch.get(1, {m, P * s.C_out}, opts).data_ptr<float>();
  std::vector<double> totals(m);
  for (int64_t e0 = 0; e0 < cnt; e0 += m) {
    const int64_t me = std::min(m, cnt - e0);
    for (int64_t e = 0; e < me; ++e) {
      const double bias_sq = pack_transposed<scalar_t>(g.data_ptr<scalar_t>() + (n0 + e0 + e) * gst[0], gst, s,
                                                       s.out[2], s.out[1] * s.out[2], gts + e * P * s.C_out, bias_grad);
      totals[e] = bias && !bias_result ? bias_sq : 0.0;
      if (bias_result) bias_result[e0 + e] = static_cast<float>(bias_sq);
    }
    for (int64_t gr = 0; gr < s.groups; ++gr)
      for (int64_t r0 = 0; r0 < rows; r0 += nr) {
        const int64_t width = std::min(nr, rows - r0);
        for (int64_t e = 0; e < me; ++e) {
          const scalar_t* xn = x.data_ptr<scalar_t>() + (n0 + e0 + e) * xst[0];
          for (int64_t j = 0; j < width; ++j)
            pack_row<scalar_t, float>(xn, xst, s, gr * rows + r0 + j, panel + j * pitch);
          totals[e] += fused_panel_sqnorm(gts + e * P * s.C_out + gr * s.cout_g, s.C_out, s.cout_g, panel, 1, pitch,
                                          {1, P, P}, width, wt ? wt + (gr * rows + r0) * s.cout_g : nullptr, s.cout_g);
        }
      }
    for (int64_t e = 0; e < me; ++e) result[e0 + e] = static_cast<float>(totals[e]);
  }
}

// Zero-copy implicit GEMM (fused path) for stride-1 convolutions and for 1-d and 2-d ones with one
// stride in both dims. Each example's input is copied once, channels last, into a zero-padded grid
// (the extent the outputs read) of row pitch Wp and plane pitch Hp*Wp, each group's channels
// padded to a multiple of the panel width (the last panel reads only the real ones). Every kernel
// offset is then a plain shift of that grid, so each panel (group, offset, block of channels) is
// read in place: position step = stride x all channels, column step 1. The output gradient is
// laid on row pitch Wp too (a stride-s row of outputs spans s grid rows): for 3-d with zeros in
// the columns that wrap around rows, so those add nothing; for 2-d the kernel skips them.
struct ShiftPlan {
  int64_t width, cpad, ctot, Dp, Hp, Wp, L, Lx, step;
  PositionRuns runs;  // the output positions: for a 2-d output, its rows without the padding between
  std::vector<int64_t> offsets;
};

// Whether the shifted layout can take the convolution: unit strides, or a 1-d/2-d output with one
// stride for its rows and columns (a run of outputs then advances the grid as a row of them does).
bool shiftable(const ConvShape& s) {
  const bool unit_stride = s.stride[0] == 1 && s.stride[1] == 1 && s.stride[2] == 1;
  return unit_stride || (s.out[0] == 1 && s.stride[0] == 1 && (s.out[1] == 1 || s.stride[1] == s.stride[2]));
}

ShiftPlan plan_shift(const ConvShape& s) {
  ShiftPlan p{};
  // 12 and 14 columns run 32-channel tiles, 16 and 24 16-channel ones (gemm_sqnorm.cpp)
  const bool wide = s.cout_g > 16;
  p.width = wide ? 12 : 16;
  for (int64_t w : kFusedPanelWidths)  // of the widths for these channels, the one with the fullest last panel
    if ((w == 12 || w == 14) == wide && (s.cin_g + w - 1) / w * w < (s.cin_g + p.width - 1) / p.width * p.width)
      p.width = w;
  p.cpad = (s.cin_g + p.width - 1) / p.width * p.width;
  p.ctot = p.cpad * s.groups;
  auto extent = [&](int d) { return (s.out[d] - 1) * s.stride[d] + (s.k[d] - 1) * s.dil[d] + 1; };
  p.Dp = extent(0);
  p.Hp = extent(1);
  p.Wp = extent(2);
  p.step = s.stride[2];
  p.L = ((s.out[0] - 1) * p.Hp + (s.out[1] - 1)) * p.Wp + s.out[2];
  for (int64_t kz = 0; kz < s.k[0]; ++kz)
    for (int64_t kh = 0; kh < s.k[1]; ++kh)
      for (int64_t kw = 0; kw < s.k[2]; ++kw)
        p.offsets.push_back((kz * s.dil[0] * p.Hp + kh * s.dil[1]) * p.Wp + kw * s.dil[2]);
  // one past the last grid position read: the last offset's last output
  p.Lx = p.offsets.back() + ((s.out[0] - 1) * s.stride[0] * p.Hp + (s.out[1] - 1) * s.stride[1]) * p.Wp +
         (s.out[2] - 1) * s.stride[2] + 1;
  p.runs = s.out[0] == 1 ? PositionRuns{s.out[1], s.out[2], p.Wp} : PositionRuns{1, p.L, p.L};
  return p;
}

// The shifted layouts read their grid and g once per panel, so they only pay while both (and
// ghost's Gram matrices) stay in a core's L2 cache.
constexpr int64_t kMaxShiftBytes = 640 << 10;

// Floats of one example's grid and transposed g.
int64_t shift_floats(const ConvShape& s, const ShiftPlan& p) { return p.Lx * p.ctot + p.L * s.C_out; }

// Whether the shifted layout is cheaper than packing im2col panels: flops plus, per element
// written, ~120 flops' worth of time for an im2col row (a gather element by element, strided for
// a strided convolution) and ~30 for the grid and g (16 x 16 transposes in registers), as measured
// on a Zen 4 core (bench/results/peers_cpu.md). Within kMaxShiftBytes: on that core's 1 MiB L2
// the shifted layout wins up to the 552 KiB of C2.
bool prefer_shift(const ConvShape& s, const ShiftPlan& p) {
  constexpr double kRowPackCost = 120, kGridPackCost = 30;
  if (shift_floats(s, p) * int64_t(sizeof(float)) > kMaxShiftBytes) return false;
  const double P = s.out_vol(), rows = s.cin_g * s.k_vol();
  const double packed = 2 * P * rows * s.cout_g * s.groups + kRowPackCost * rows * P * s.groups;
  const double shifted = 2.0 * p.runs.count * p.runs.length * s.k_vol() * s.cin_g * s.cout_g * s.groups +
                         kGridPackCost * double(shift_floats(s, p));
  return shifted < packed;
}

// Whether ghost takes its Gram matrices from the shifted grid (conv_block_ghost_shifted): where the
// grid, g and the two P x P Gram matrices stay within a core's L2 cache, as for prefer_shift.
bool ghost_on_grid(const ConvShape& s, const ShiftPlan& p) {
  const int64_t P = s.out_vol();
  return (shift_floats(s, p) + 2 * P * P) * int64_t(sizeof(float)) <= kMaxShiftBytes;
}

// The input's positions of one example into the grid, channels last (those past the extent the
// outputs read left out); the grid's padding (border positions, channels past cin_g in each group)
// is left alone: zeroed once per block by the caller. float32 with contiguous rows goes 16
// channels at a time through registers.
template <typename scalar_t>
void pack_shift_grid(const scalar_t* xn, const std::array<int64_t, 5>& st, const ConvShape& s, const ShiftPlan& p,
                     float* grid) {
  bool in_registers = false;
  if constexpr (std::is_same_v<scalar_t, float>) in_registers = st[4] == 1 && fused_gemm_sqnorm_available();
  const int64_t iz_end = std::min(s.in[0], p.Dp - s.pad[0]), ih_end = std::min(s.in[1], p.Hp - s.pad[1]);
  const int64_t width = std::max<int64_t>(0, std::min(s.in[2], p.Wp - s.pad[2]));
  for (int64_t iz = 0; iz < iz_end; ++iz)
    for (int64_t ih = 0; ih < ih_end; ++ih) {
      const scalar_t* src_row = xn + iz * st[2] + ih * st[3];
      float* dst_row = grid + (((iz + s.pad[0]) * p.Hp + ih + s.pad[1]) * p.Wp + s.pad[2]) * p.ctot;
      for (int64_t gr = 0; gr < s.groups; ++gr)
        for (int64_t c0 = 0; c0 < s.cin_g; c0 += 16) {
          const int64_t C = std::min<int64_t>(16, s.cin_g - c0);
          const scalar_t* src = src_row + (gr * s.cin_g + c0) * st[1];
          float* dst = dst_row + gr * p.cpad + c0;
          if constexpr (std::is_same_v<scalar_t, float>)
            if (in_registers) {
              transpose_rows(src, st[1], C, width, dst, p.ctot, nullptr);
              continue;
            }
          for (int64_t iw = 0; iw < width; ++iw)
            for (int64_t c = 0; c < C; ++c) dst[iw * p.ctot + c] = static_cast<float>(src[c * st[1] + iw * st[4]]);
        }
    }
}

// wt (or null): the weight gradient's transpose, (groups, k_vol, cpad, cout_g); bias_grad and
// bias_result (or null) as for conv_block_fused.
template <typename scalar_t>
void conv_block_shifted(const Tensor& x, const Tensor& g, const ConvShape& s, const ShiftPlan& p, bool bias, int64_t n0,
                        int64_t cnt, Scratch& scratch, float* result, float* wt, float* bias_grad, float* bias_result) {
  const auto xst = strides5(x), gst = strides5(g);
  const auto opts = x.options().dtype(at::kFloat);
  const int64_t grid_size = p.Lx * p.ctot, gt_size = p.L * s.C_out;
  const int64_t m = examples_in_cache((grid_size + gt_size) * int64_t(sizeof(float)), cnt);
  // Zeroed once: every example writes the same positions, so the grids' padding and g's
  // wrap-around columns stay zero.
  float* grids = scratch.get(0, {m, grid_size}, opts).zero_().data_ptr<float>();
  float* gts = scratch.get(1, {m, gt_size}, opts).zero_().data_ptr<float>();
  std::vector<double> totals(m);
  const int64_t kv = static_cast<int64_t>(p.offsets.size());
  for (int64_t e0 = 0; e0 < cnt; e0 += m) {
    const int64_t me = std::min(m, cnt - e0);
    for (int64_t e = 0; e < me; ++e) {
      pack_shift_grid<scalar_t>(x.data_ptr<scalar_t>() + (n0 + e0 + e) * xst[0], xst, s, p, grids + e * grid_size);
      const double bias_sq = pack_transposed<scalar_t>(g.data_ptr<scalar_t>() + (n0 + e0 + e) * gst[0], gst, s, p.Wp,
                                                       p.Hp * p.Wp, gts + e * gt_size, bias_grad);
      totals[e] = bias && !bias_result ? bias_sq : 0.0;
      if (bias_result) bias_result[e0 + e] = static_cast<float>(bias_sq);
    }
    for (int64_t gr = 0; gr < s.groups; ++gr)
      for (int64_t ki = 0; ki < kv; ++ki)
        for (int64_t c0 = 0; c0 < s.cin_g; c0 += p.width)
          for (int64_t e = 0; e < me; ++e)
            totals[e] += fused_panel_sqnorm(gts + e * gt_size + gr * s.cout_g, s.C_out, s.cout_g,
                                            grids + e * grid_size + p.offsets[ki] * p.ctot + gr * p.cpad + c0,
                                            p.step * p.ctot, 1, p.runs, std::min(p.width, s.cin_g - c0),
                                            wt ? wt + ((gr * kv + ki) * p.cpad + c0) * s.cout_g : nullptr, s.cout_g);
    for (int64_t e = 0; e < me; ++e) result[e0 + e] = static_cast<float>(totals[e]);
  }
}

// Ghost on the shifted layout (float32, AVX-512): per example and group, the unfolded input's Gram
// sum_k x(pos(p) + off_k) . x(pos(q) + off_k) over the grid's channels and g's Gram over its
// transposed rows, each one triangle of 4 x 4 dot products in registers (gram_at), contracted.
template <typename scalar_t>
void conv_block_ghost_shifted(const Tensor& x, const Tensor& g, const ConvShape& s, const ShiftPlan& p, bool bias,
                              int64_t n0, int64_t cnt, Scratch& scratch, float* result) {
  const auto xst = strides5(x), gst = strides5(g);
  const auto opts = x.options().dtype(at::kFloat);
  const int64_t P = s.out_vol(), kv = static_cast<int64_t>(p.offsets.size());
  // Zeroed once: every example writes the same positions.
  float* grid = scratch.get(0, {p.Lx * p.ctot}, opts).zero_().data_ptr<float>();
  float* gt = scratch.get(1, {p.L * s.C_out}, opts).zero_().data_ptr<float>();
  float* gram = scratch.get(2, {2 * P * P}, opts).data_ptr<float>();
  std::vector<int64_t> rows_x, rows_g, shifts_x(kv);
  for (int64_t oz = 0; oz < s.out[0]; ++oz)
    for (int64_t oh = 0; oh < s.out[1]; ++oh)
      for (int64_t ow = 0; ow < s.out[2]; ++ow) {
        rows_x.push_back(((oz * s.stride[0] * p.Hp + oh * s.stride[1]) * p.Wp + ow * s.stride[2]) * p.ctot);
        rows_g.push_back(((oz * p.Hp + oh) * p.Wp + ow) * s.C_out);
      }
  for (int64_t k = 0; k < kv; ++k) shifts_x[k] = p.offsets[k] * p.ctot;
  const int64_t no_shift = 0;
  for (int64_t n = 0; n < cnt; ++n) {
    pack_shift_grid<scalar_t>(x.data_ptr<scalar_t>() + (n0 + n) * xst[0], xst, s, p, grid);
    const double bias_sq =
        pack_transposed<scalar_t>(g.data_ptr<scalar_t>() + (n0 + n) * gst[0], gst, s, p.Wp, p.Hp * p.Wp, gt, nullptr);
    double total = bias ? bias_sq : 0.0;
    for (int64_t gr = 0; gr < s.groups; ++gr) {
      gram_at(grid + gr * p.cpad, rows_x.data(), P, shifts_x.data(), kv, s.cin_g, gram);
      gram_at(gt + gr * s.cout_g, rows_g.data(), P, &no_shift, 1, s.cout_g, gram + P * P);
      total += gram_dot(gram, gram + P * P, P);
    }
    result[n] = static_cast<float>(total);
  }
}

// BLAS path: the block's im2col matrix in the scratch, then batched GEMMs with the groups
// of all the block's examples as one batch, in buf_t (the result dtype, or bfloat16 kept).
template <typename scalar_t, typename buf_t = at::opmath_type<scalar_t>>
Tensor conv_block_blas(const Tensor& x, const Tensor& G, const ConvShape& s, bool bias, Method m, int64_t n0,
                       int64_t cnt, Scratch& scratch) {
  const int64_t P = s.out_vol(), rows = s.cin_g * s.k_vol(), rows_total = s.C_in * s.k_vol();
  const Tensor Gb = G.narrow(0, n0, cnt).to(at::CppTypeToScalarType<buf_t>::value).contiguous();
  Tensor X = scratch.get(0, {cnt, rows_total, P}, Gb.options());
  const auto st = strides5(x);
  for (int64_t n = 0; n < cnt; ++n)
    for (int64_t r = 0; r < rows_total; ++r)
      pack_row<scalar_t, buf_t>(x.data_ptr<scalar_t>() + (n0 + n) * st[0], st, s, r,
                                X.data_ptr<buf_t>() + (n * rows_total + r) * P);
  Tensor sb = rule(X.view({cnt * s.groups, rows, P}), Gb.view({cnt * s.groups, s.cout_g, P}), m, scratch)
                  .view({cnt, s.groups})
                  .sum(1);
  if (bias) sb.add_(bias_term(Gb));
  return sb;
}

// Ghost without im2col. The Gram matrix of example n's unfolded input, X^T X (P x P), is
// sum_k Xhat[pos(p, k), pos(q, k)] with Xhat = x_pad^T x_pad over the padded input's positions
// (A x A, contracting the channels) and pos(p, k) the input position output p reads through kernel
// offset k: one small GEMM and a gather instead of writing the k_vol-times larger unfolded input.
struct GramShift {
  std::array<int64_t, 3> extent{1, 1, 1};  // the padded input each output reads, per dim
  int64_t A = 1;                           // its volume
};

GramShift plan_gram_shift(const ConvShape& s) {
  GramShift gs;
  for (int d = 0; d < 3; ++d) {
    gs.extent[d] = (s.out[d] - 1) * s.stride[d] + (s.k[d] - 1) * s.dil[d] + 1;
    gs.A *= gs.extent[d];
  }
  return gs;
}

// Cost per example and group, in multiply-adds plus kMemory per element written or gathered:
// Xhat's GEMM, Xhat and the gather against the unfolded Gram's GEMM and the unfolded input. The
// weight is fitted to where each formulation won on stride-1/2, 1x1 and 3x3 layers
// (bench/results/peers_cpu.md); both are exact, only their speed differs.
bool prefer_gram_shift(const ConvShape& s, const GramShift& gs) {
  constexpr double kMemory = 100.0;
  const double P = double(s.out_vol()), K = double(s.k_vol()), A = double(gs.A), c = double(s.cin_g);
  const double shift = A * A * c + kMemory * (A * A + P * P * K);
  const double im2col = P * P * K * c + kMemory * K * c * P;
  return shift < im2col;
}

template <typename scalar_t>
Tensor conv_block_gram_shift(const Tensor& x, const Tensor& G, const ConvShape& s, const GramShift& gs, bool bias,
                             int64_t n0, int64_t cnt, Scratch& scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = at::CppTypeToScalarType<acc_t>::value;
  const int64_t P = s.out_vol(), K = s.k_vol(), A = gs.A, B = cnt * s.groups;
  const Tensor Gb = G.narrow(0, n0, cnt).to(acc).contiguous();
  // Pad (or crop) x to exactly the extent the outputs read; pad pairs go last dim first.
  std::vector<int64_t> pads;
  const int64_t nd = x.dim() - 2;
  for (int64_t i = nd - 1; i >= 0; --i) {
    const int64_t d = 3 - nd + i;
    pads.push_back(s.pad[d]);
    pads.push_back(gs.extent[d] - s.pad[d] - s.in[d]);
  }
  const Tensor xp = at::constant_pad_nd(x.narrow(0, n0, cnt).to(acc), pads).reshape({B, s.cin_g, A});
  Tensor xhat = scratch.get(0, {B, A, A}, Gb.options());
  at::bmm_out(xhat, xp.transpose(1, 2), xp);
  // lin[p, q, k] = pos(p, k) * A + pos(q, k)
  std::vector<int64_t> pos(P * K);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t o[3] = {p / (s.out[1] * s.out[2]), (p / s.out[2]) % s.out[1], p % s.out[2]};
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kk[3] = {k / (s.k[1] * s.k[2]), (k / s.k[2]) % s.k[1], k % s.k[2]};
      int64_t at_ = 0;
      for (int d = 0; d < 3; ++d) at_ = at_ * gs.extent[d] + o[d] * s.stride[d] + kk[d] * s.dil[d];
      pos[p * K + k] = at_;
    }
  }
  Tensor lin = at::empty({P, P, K}, at::kLong);
  int64_t* l = lin.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < P; ++q)
      for (int64_t k = 0; k < K; ++k) l[(p * P + q) * K + k] = pos[p * K + k] * A + pos[q * K + k];
  const Tensor gram = xhat.view({B, A * A}).index_select(1, lin.view({-1})).view({B, P, P, K}).sum(3);
  const Tensor Gg = Gb.view({B, s.cout_g, P});
  Tensor gg = scratch.get(1, {B, P, P}, Gb.options());
  at::bmm_out(gg, Gg.transpose(1, 2), Gg);
  Tensor sb = gram.mul_(gg).sum({1, 2}).view({cnt, s.groups}).sum(1);
  if (bias) sb.add_(bias_term(Gb));
  return sb;
}

// The norms into out; with want_weight, the weight's norms only, and returns the weight gradient,
// and the bias gradient and the bias's norms where the fused kernels formed them.
WeightGrads conv_impl(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias,
                      const std::string& method, bool add, bool want_weight, Precision precision) {
  if (s.N == 0) return {want_weight ? conv_weight_grad(s, x, g) : Tensor(), Tensor()};
  const auto acc = result_dtype(x.scalar_type());
  const int64_t P = s.out_vol(), rows = s.cin_g * s.k_vol();
  const MaterializePath path = materialize_path(x.scalar_type(), precision, P, rows, s.groups);
  const Method m = want_weight && path == MaterializePath::Fused
                       ? choose_fused_method(method, P, rows, s.cout_g, materialize_cost(path))
                       : choose_method(method, P, rows, s.cout_g, materialize_cost(path));
  const bool fused = m == Method::Materialize && path == MaterializePath::Fused;
  const bool bf16_gemm = m == Method::Materialize && path == MaterializePath::Bf16Gemm;
  // the shifted grid serves the fused kernel (materialize) and, on float32 with AVX-512, ghost
  const bool ghost_avx512 =
      m == Method::Ghost && result_dtype(x.scalar_type()) == at::kFloat && fused_gemm_sqnorm_available();
  const bool can_shift = (fused || ghost_avx512) && P > 0 && shiftable(s);
  const ShiftPlan shift = can_shift ? plan_shift(s) : ShiftPlan{};
  // FISHER_EXT_CPU_CONV_LAYOUT=shift|panels overrides the cost model (tests, benchmarks).
  const char* layout_env = std::getenv("FISHER_EXT_CPU_CONV_LAYOUT");
  const std::string layout = layout_env ? layout_env : "auto";
  TORCH_CHECK(layout == "auto" || layout == "shift" || layout == "panels",
              "FISHER_EXT_CPU_CONV_LAYOUT: expected auto, shift or panels, got '", layout, "'");
  const bool shifted = fused && can_shift && (layout == "shift" || (layout == "auto" && prefer_shift(s, shift)));
  // FISHER_EXT_CPU_CONV_GHOST=grid|shift|im2col picks ghost's formulation (tests, benchmarks).
  const char* ghost_env = std::getenv("FISHER_EXT_CPU_CONV_GHOST");
  const std::string ghost_layout = ghost_env ? ghost_env : "auto";
  TORCH_CHECK(ghost_layout == "auto" || ghost_layout == "grid" || ghost_layout == "shift" || ghost_layout == "im2col",
              "FISHER_EXT_CPU_CONV_GHOST: expected auto, grid, shift or im2col, got '", ghost_layout, "'");
  const bool ghost_grid =
      ghost_avx512 && can_shift && (ghost_layout == "grid" || (ghost_layout == "auto" && ghost_on_grid(s, shift)));
  const GramShift gram_plan = plan_gram_shift(s);
  const bool gram_shift = m == Method::Ghost && P > 0 && !ghost_grid &&
                          (ghost_layout == "shift" || (ghost_layout != "im2col" && prefer_gram_shift(s, gram_plan)));
  const int64_t per_example =
      fused || ghost_grid ? s.C_out * P
      : gram_shift
          ? s.C_in * gram_plan.A + s.C_out * P + s.groups * (gram_plan.A * gram_plan.A + P * P * (s.k_vol() + 2))
          : s.C_in * s.k_vol() * P + s.C_out * P + s.groups * (m == Method::Ghost ? 2 * P * P : s.cout_g * rows);
  const int64_t nb = block_size(s.N, at::elementSize(acc) * per_example);
  const Tensor G = g.reshape({s.N, s.C_out, P});
  // The fused paths' weight gradient, transposed in the layout of each (see their comments).
  const std::vector<int64_t> wt_sizes = shifted ? std::vector<int64_t>{s.groups, s.k_vol(), shift.cpad, s.cout_g}
                                                : std::vector<int64_t>{s.groups, rows, s.cout_g};
  // One partial sum per thread: the weight gradient's transpose, then the bias gradient (C_out).
  const int64_t wt_numel = c10::multiply_integers(wt_sizes), bias_numel = bias ? s.C_out : 0;
  Partials weight({wt_numel + bias_numel}, x.options());
  auto bias_part = [&](float* wt) { return wt && bias ? wt + wt_numel : nullptr; };
  // The grad op keeps the bias's norms apart from the weight's: the fused kernels write them here,
  // the other paths leave the bias to the entry.
  const Tensor bias_sq = want_weight && bias && fused ? at::empty({s.N}, x.options().dtype(at::kFloat)) : Tensor();
  auto bias_result = [&](int64_t n0) { return bias_sq.defined() ? bias_sq.data_ptr<float>() + n0 : nullptr; };
  const bool norms_bias = bias && !want_weight;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_sqnorm_cpu", [&] {
    for_each_block(s.N, nb, [&](int64_t n0, int64_t cnt, Scratch& scratch) {
      Tensor sb;
      if (ghost_grid) {
        sb = at::empty({cnt}, x.options().dtype(at::kFloat));
        conv_block_ghost_shifted<scalar_t>(x, g, s, shift, norms_bias, n0, cnt, scratch, sb.data_ptr<float>());
      } else if (shifted) {
        sb = at::empty({cnt}, x.options().dtype(at::kFloat));
        float* wt = want_weight ? weight.mine() : nullptr;
        conv_block_shifted<scalar_t>(x, g, s, shift, bias, n0, cnt, scratch, sb.data_ptr<float>(), wt, bias_part(wt),
                                     bias_result(n0));
      } else if (gram_shift) {
        sb = conv_block_gram_shift<scalar_t>(x, G, s, gram_plan, norms_bias, n0, cnt, scratch);
      } else if (fused) {
        sb = at::empty({cnt}, x.options().dtype(at::kFloat));
        float* wt = want_weight ? weight.mine() : nullptr;
        conv_block_fused<scalar_t>(x, g, s, bias, n0, cnt, scratch, sb.data_ptr<float>(), wt, bias_part(wt),
                                   bias_result(n0));
      } else if (bf16_gemm) {  // packed in bfloat16 (only float32 and bfloat16 inputs get here)
        using gemm_t = std::conditional_t<std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>,
                                          at::BFloat16, at::opmath_type<scalar_t>>;
        sb = conv_block_blas<scalar_t, gemm_t>(x, G, s, norms_bias, m, n0, cnt, scratch);
      } else {
        sb = conv_block_blas<scalar_t>(x, G, s, norms_bias, m, n0, cnt, scratch);
      }
      write_result(out, n0, sb, add);
    });
  });
  if (!want_weight) return {};
  if (!fused) return {conv_weight_grad(s, x, g)};
  const Tensor total = weight.sum();
  const Tensor wt = total.narrow(0, 0, wt_numel).view(wt_sizes);
  const Tensor w = shifted ? wt.narrow(2, 0, s.cin_g).permute({0, 3, 2, 1})  // (groups, cout_g, cin_g, k_vol)
                           : wt.permute({0, 2, 1});                          // (groups, cout_g, rows)
  return {w.reshape(conv_weight_shape(s, x.dim() - 2)), bias ? total.narrow(0, wt_numel, s.C_out) : Tensor(), bias_sq};
}

void conv_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias, const std::string& method,
               bool add, Precision precision) {
  conv_impl(out, s, x, g, bias, method, add, /*want_weight=*/false, precision);
}

WeightGrads conv_grad_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias,
                           const std::string& method) {
  return conv_impl(out, s, x, g, bias, method, /*add=*/false, /*want_weight=*/true, Precision::Full);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_ext, CPU, m) { ConvEntry<conv_into, conv_grad_into>::register_all(m); }

}  // namespace fisher_ext
