// C++ test of the fisher_ext CPU ops through the dispatcher, against naive double loops
// over the definition: ||dW_n||^2 + ||db_n||^2 with dW_n[o,c,k] = sum_p g[n,o,p] x[n,c,pos(p,k)].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  (ok ? passed : failed)++;
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
}

// Conv2d oracle in double, straight from the definition.
std::vector<double> naive_conv2d(const at::Tensor& x, const at::Tensor& g, int64_t k, int64_t stride, int64_t pad,
                                 int64_t dil, int64_t groups) {
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
      out[n] += b * b;
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

std::vector<double> naive_linear(const at::Tensor& a, const at::Tensor& g) {
  auto A = a.to(at::kDouble).contiguous(), G = g.to(at::kDouble).contiguous();
  auto aa = A.accessor<double, 3>();
  auto gg = G.accessor<double, 3>();
  std::vector<double> out(A.size(0), 0.0);
  for (int64_t n = 0; n < A.size(0); ++n)
    for (int64_t o = 0; o < G.size(2); ++o) {
      double b = 0;
      for (int64_t t = 0; t < A.size(1); ++t) b += gg[n][t][o];
      out[n] += b * b;
      for (int64_t i = 0; i < A.size(2); ++i) {
        double w = 0;
        for (int64_t t = 0; t < A.size(1); ++t) w += gg[n][t][o] * aa[n][t][i];
        out[n] += w * w;
      }
    }
  return out;
}

double max_rel_err(const at::Tensor& got, const std::vector<double>& want) {
  auto G = got.to(at::kDouble).contiguous();
  double err = 0;
  for (size_t n = 0; n < want.size(); ++n)
    err = std::max(err, std::abs(G.data_ptr<double>()[n] - want[n]) / std::abs(want[n]));
  return err;
}

}  // namespace

int main() {
  at::manual_seed(0);
  auto conv = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("fisher_ext::conv_sqnorm", "")
                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                    at::IntArrayRef, at::IntArrayRef, int64_t, bool, c10::string_view)>();
  auto linear = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("fisher_ext::linear_sqnorm", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool, c10::string_view)>();

  struct ConvCase { int64_t N, C_in, C_out, H, k, stride, pad, dil, groups; };
  const ConvCase cases[] = {{3, 3, 8, 9, 3, 1, 1, 1, 1}, {2, 32, 20, 7, 3, 1, 2, 2, 2}, {2, 6, 4, 10, 3, 2, 1, 1, 2},
                            {4, 48, 40, 5, 2, 1, 0, 1, 1}};
  for (const char* fused : {"0", "1"}) {
    setenv("FISHER_EXT_CPU_NO_AVX512", fused[0] == '1' ? "0" : "1", 1);
    const std::string path = fused[0] == '1' ? "fused-if-available" : "blas";
    for (const auto& c : cases) {
      const int64_t Ho = (c.H + 2 * c.pad - c.dil * (c.k - 1) - 1) / c.stride + 1;
      for (auto dtype : {at::kFloat, at::kDouble}) {
        auto x = at::randn({c.N, c.C_in, c.H, c.H}).to(dtype);
        auto g = at::randn({c.N, c.C_out, Ho, Ho}).to(dtype);
        const auto want = naive_conv2d(x, g, c.k, c.stride, c.pad, c.dil, c.groups);
        for (const char* method : {"ghost", "materialize"}) {
          auto s = conv.call(x, g, {c.k, c.k}, {c.stride, c.stride}, {c.pad, c.pad}, {c.dil, c.dil}, c.groups, true,
                             method);
          const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
          check(max_rel_err(s, want) < tol, "conv2d C_in=" + std::to_string(c.C_in) + " groups=" +
                                                std::to_string(c.groups) + " " + method + " " +
                                                c10::toString(dtype) + " " + path);
        }
      }
    }
    for (int64_t d_out : {5, 16, 40}) {
      auto a = at::randn({3, 7, 30}), g = at::randn({3, 7, d_out});
      const auto want = naive_linear(a, g);
      for (const char* method : {"ghost", "materialize"})
        check(max_rel_err(linear.call(a, g, true, method), want) < 1e-4,
              "linear d_out=" + std::to_string(d_out) + " " + method + " " + path);
    }
  }
  bool threw = false;
  try {
    linear.call(at::randn({2, 3}), at::randn({3, 4}), true, "auto");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("g: expected the batch size N=2 of a, got 3") != std::string::npos;
  }
  check(threw, "mismatched batch size raises a message naming g");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
