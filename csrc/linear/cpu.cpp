// The linear ops' CPU kernels: per-example squared norms of a Linear layer's weight (and bias)
// gradient, with the weight gradient itself for the fused op. T = 1 is two dot products per
// example; otherwise float32 on AVX-512 CPUs runs the register-tiled kernels of gemm_sqnorm.h on a
// and g in place (materialize: the fused GEMM-square-sum over panels of a; ghost: both Gram
// matrices), and every other case the batched GEMMs of cpu/blocks.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../cpu/blocks.h"
#include "entry.h"

namespace fisher_ext {
namespace {

// T = 1: ||a_n||^2 ||g_n||^2 (+ ||g_n||^2), two dot products per example.
template <typename scalar_t>
void linear_rows_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias, bool add) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor A = a.reshape({sh.N, sh.d_in}).contiguous(), G = g.reshape({sh.N, sh.d_out}).contiguous();
  const scalar_t* ap = A.data_ptr<scalar_t>();
  const scalar_t* gp = G.data_ptr<scalar_t>();
  auto sq = [](const scalar_t* p, int64_t n) {  // 8 partial sums, so the loop vectorizes
    acc_t part[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += static_cast<acc_t>(p[i + j]) * static_cast<acc_t>(p[i + j]);
    acc_t s = 0;
    for (; i < n; ++i) s += static_cast<acc_t>(p[i]) * static_cast<acc_t>(p[i]);
    for (int j = 0; j < 8; ++j) s += part[j];
    return s;
  };
  auto o = out.accessor<acc_t, 1>();
  at::parallel_for(0, sh.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const acc_t gg = sq(gp + n * sh.d_out, sh.d_out);
      const acc_t s = sq(ap + n * sh.d_in, sh.d_in) * gg + (bias ? gg : acc_t(0));
      o[n] = add ? o[n] + s : s;
    }
  });
}

// The norms into out; with want_weight, the weight's norms only, and returns the weight gradient,
// the bias's norms and, where the fused kernel formed it, the bias gradient.
WeightGrads linear_impl(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                        const std::string& method, bool add, bool want_weight, Precision precision) {
  const auto acc = result_dtype(a.scalar_type());
  if (sh.N == 0 || sh.T == 1) {
    if (sh.N > 0) {
      choose_method(method, 1, sh.d_in, sh.d_out);  // validates the argument; both methods are this product
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_rows",
                                      [&] { linear_rows_into<scalar_t>(out, sh, a, g, bias && !want_weight, add); });
    }
    return {want_weight ? linear_weight_grad(sh, a, g) : Tensor()};
  }
  const Tensor A = a.reshape({sh.N, sh.T, sh.d_in});
  const Tensor G = g.reshape({sh.N, sh.T, sh.d_out});
  const MaterializePath path = materialize_path(a.scalar_type(), precision, sh.T, sh.d_in);
  const Method m = want_weight && path == MaterializePath::Fused
                       ? choose_fused_method(method, sh.T, sh.d_in, sh.d_out, materialize_cost(path))
                       : choose_method(method, sh.T, sh.d_in, sh.d_out, materialize_cost(path));
  const bool fused = m == Method::Materialize && path == MaterializePath::Fused;
  // the batched GEMMs' dtype: bfloat16 on the Bf16Gemm path, else the result dtype
  const auto gemm = m == Method::Materialize && path == MaterializePath::Bf16Gemm ? at::kBFloat16 : acc;
  const int64_t nr = fused_panel_width(sh.d_out, sh.d_in);
  const int64_t full = sh.d_in / nr, tail = sh.d_in - full * nr;
  // The weight gradient's transpose (one row per input feature), then with a bias the bias
  // gradient: one partial sum per thread.
  Partials weight({sh.d_in + (bias ? 1 : 0), sh.d_out}, a.options());
  const Tensor bias_sq = want_weight && bias ? at::empty({sh.N}, out.options()) : Tensor();  // apart from out
  const int64_t elt = at::elementSize(acc);
  const int64_t ws = m == Method::Ghost ? 2 * sh.T * sh.T : sh.d_in * sh.d_out;
  const int64_t nb = block_size(sh.N, elt * (ws + sh.T * (sh.d_in + sh.d_out)));
  for_each_block(sh.N, nb, [&](int64_t n0, int64_t cnt, Scratch& scratch) {
    const Tensor Ab = A.narrow(0, n0, cnt).to(gemm).contiguous();
    const Tensor Gb = G.narrow(0, n0, cnt).to(gemm).contiguous();
    Tensor s;
    float* wt = fused && want_weight ? weight.mine() : nullptr;
    if (fused) {
      // Panels are read from a in place (row pitch d_in); the last one may be narrower.
      auto at_panel = [&](int64_t t) { return wt ? wt + t * nr * sh.d_out : nullptr; };
      s = at::empty({cnt}, Ab.options());
      float* sp = s.data_ptr<float>();
      for (int64_t n = 0; n < cnt; ++n) {
        const float* an = Ab.data_ptr<float>() + n * sh.T * sh.d_in;
        const float* gn = Gb.data_ptr<float>() + n * sh.T * sh.d_out;
        double total = 0;
        for (int64_t t = 0; t < full; ++t) {
          if (n + 1 < cnt) {  // the next example's a and g, a slice per panel
            prefetch_slice(an + sh.T * sh.d_in, sh.T * sh.d_in * 4, t, full);
            prefetch_slice(gn + sh.T * sh.d_out, sh.T * sh.d_out * 4, t, full);
          }
          total += fused_panel_sqnorm(gn, sh.d_out, sh.d_out, an + t * nr, sh.d_in, 1, {1, sh.T, sh.T}, nr, at_panel(t),
                                      sh.d_out);
        }
        if (tail)
          total += fused_panel_sqnorm(gn, sh.d_out, sh.d_out, an + full * nr, sh.d_in, 1, {1, sh.T, sh.T}, tail,
                                      at_panel(full), sh.d_out);
        sp[n] = static_cast<float>(total);
      }
    } else if (m == Method::Ghost && Ab.scalar_type() == at::kFloat && fused_gemm_sqnorm_available()) {
      float* gram = scratch.get(0, {2 * sh.T * sh.T}, Ab.options()).data_ptr<float>();
      std::vector<int64_t> rows_a(sh.T), rows_g(sh.T);
      for (int64_t t = 0; t < sh.T; ++t) {
        rows_a[t] = t * sh.d_in;
        rows_g[t] = t * sh.d_out;
      }
      const int64_t no_shift = 0;
      s = at::empty({cnt}, Ab.options());
      float* sp = s.data_ptr<float>();
      for (int64_t n = 0; n < cnt; ++n) {
        gram_at(Ab.data_ptr<float>() + n * sh.T * sh.d_in, rows_a.data(), sh.T, &no_shift, 1, sh.d_in, gram);
        gram_at(Gb.data_ptr<float>() + n * sh.T * sh.d_out, rows_g.data(), sh.T, &no_shift, 1, sh.d_out,
                gram + sh.T * sh.T);
        sp[n] = static_cast<float>(gram_dot(gram, gram + sh.T * sh.T, sh.T));
      }
    } else {
      s = rule(Ab.transpose(1, 2), Gb.transpose(1, 2), m, scratch);
    }
    if (bias) {
      const Tensor sums = Gb.sum(1, false, acc);  // each example's bias gradient
      if (bias_sq.defined())
        bias_sq.narrow(0, n0, cnt).copy_(sums.square().sum(1));
      else
        s.add_(sums.square().sum(1));
      if (wt) at::from_blob(wt + sh.d_in * sh.d_out, {sh.d_out}, sums.options()).add_(sums.sum(0));
    }
    write_result(out, n0, s, add);
  });
  if (!want_weight) return {};
  if (!fused) return {linear_weight_grad(sh, a, g), Tensor(), bias_sq};
  const Tensor total = weight.sum();
  return {total.narrow(0, 0, sh.d_in).t().contiguous(), bias ? total[sh.d_in] : Tensor(), bias_sq};
}

void linear_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                 const std::string& method, bool add, Precision precision) {
  linear_impl(out, sh, a, g, bias, method, add, /*want_weight=*/false, precision);
}

WeightGrads linear_grad_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                             const std::string& method) {
  return linear_impl(out, sh, a, g, bias, method, /*add=*/false, /*want_weight=*/true, Precision::Full);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_ext, CPU, m) { LinearEntry<linear_into, linear_grad_into>::register_all(m); }

}  // namespace fisher_ext
