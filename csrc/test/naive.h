// Naive double-precision loops over the definition, for the C++ tests:
// ||dW_n||^2 + ||db_n||^2 with dW_n[o,c,k] = sum_p g[n,o,p] x[n,c,pos(p,k)].
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace fisher_ext_test {

inline int passed = 0, failed = 0;

inline void check(bool ok, const std::string& what) {
  (ok ? passed : failed)++;
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
}

// Conv2d oracle in double, straight from the definition.
inline std::vector<double> naive_conv2d(const at::Tensor& x, const at::Tensor& g, int64_t k, int64_t stride,
                                        int64_t pad, int64_t dil, int64_t groups, bool bias = true) {
  auto X = x.to(at::kDouble).contiguous(), G = g.to(at::kDouble).contiguous();
  auto xa = X.accessor<double, 4>();
  auto ga = G.accessor<double, 4>();
  const int64_t N = X.size(0), C_in = X.size(1), H = X.size(2), W = X.size(3);
  const int64_t C_out = G.size(1), Ho = G.size(2), Wo = G.size(3), cin_g = C_in / groups, cout_g = C_out / groups;
  std::vector<double> out(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t o = 0; o < C_out; ++o) {
      double b = 0;
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) b += ga[n][o][oh][ow];
      if (bias) out[n] += b * b;
      for (int64_t cl = 0; cl < cin_g; ++cl)
        for (int64_t kh = 0; kh < k; ++kh)
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t c = (o / cout_g) * cin_g + cl;
            double w = 0;
            for (int64_t oh = 0; oh < Ho; ++oh)
              for (int64_t ow = 0; ow < Wo; ++ow) {
                const int64_t ih = oh * stride - pad + kh * dil, iw = ow * stride - pad + kw * dil;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W) w += ga[n][o][oh][ow] * xa[n][c][ih][iw];
              }
            out[n] += w * w;
          }
    }
  }
  return out;
}

inline std::vector<double> naive_linear(const at::Tensor& a, const at::Tensor& g, bool bias = true) {
  auto A = a.to(at::kDouble).contiguous(), G = g.to(at::kDouble).contiguous();
  auto aa = A.accessor<double, 3>();
  auto gg = G.accessor<double, 3>();
  std::vector<double> out(A.size(0), 0.0);
  for (int64_t n = 0; n < A.size(0); ++n)
    for (int64_t o = 0; o < G.size(2); ++o) {
      double b = 0;
      for (int64_t t = 0; t < A.size(1); ++t) b += gg[n][t][o];
      if (bias) out[n] += b * b;
      for (int64_t i = 0; i < A.size(2); ++i) {
        double w = 0;
        for (int64_t t = 0; t < A.size(1); ++t) w += gg[n][t][o] * aa[n][t][i];
        out[n] += w * w;
      }
    }
  return out;
}

inline double max_rel_err(const at::Tensor& got, const std::vector<double>& want) {
  auto G = got.to(at::kDouble).contiguous();
  double err = 0;
  for (size_t n = 0; n < want.size(); ++n)
    err = std::max(err, std::abs(G.data_ptr<double>()[n] - want[n]) / std::abs(want[n]));
  return err;
}

}  // namespace fisher_ext_test
