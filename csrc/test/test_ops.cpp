// C++ test of the fisher_ext CPU ops through the dispatcher, against naive double loops (naive.h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>

#include "naive.h"

using namespace fisher_ext_test;

int main() {
  at::manual_seed(0);
  auto conv =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fisher_ext::conv_sqnorm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, int64_t, bool, c10::string_view, c10::string_view)>();
  auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fisher_ext::linear_sqnorm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool, c10::string_view, c10::string_view)>();

  struct ConvCase {
    int64_t N, C_in, C_out, H, k, stride, pad, dil, groups;
  };
  const ConvCase cases[] = {{3, 3, 8, 9, 3, 1, 1, 1, 1},
                            {2, 32, 20, 7, 3, 1, 2, 2, 2},
                            {2, 6, 4, 10, 3, 2, 1, 1, 2},
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
                             method, "full");
          const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
          check(max_rel_err(s, want) < tol, "conv2d C_in=" + std::to_string(c.C_in) +
                                                " groups=" + std::to_string(c.groups) + " " + method + " " +
                                                c10::toString(dtype) + " " + path);
        }
      }
    }
    for (int64_t d_out : {5, 16, 40}) {
      auto a = at::randn({3, 7, 30}), g = at::randn({3, 7, d_out});
      const auto want = naive_linear(a, g);
      for (const char* method : {"ghost", "materialize"})
        check(max_rel_err(linear.call(a, g, true, method, "full"), want) < 1e-4,
              "linear d_out=" + std::to_string(d_out) + " " + method + " " + path);
    }
  }
  bool threw = false;
  try {
    linear.call(at::randn({2, 3}), at::randn({3, 4}), true, "auto", "full");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("g: expected the batch size N=2 of a, got 3") != std::string::npos;
  }
  check(threw, "mismatched batch size raises a message naming g");
  {  // precision "bf16": bfloat16 GEMMs where the CPU has them (96 positions, 72 columns), else "full"
    auto a = at::randn({3, 96, 72}), g = at::randn({3, 96, 40});
    check(max_rel_err(linear.call(a, g, true, "materialize", "bf16"), naive_linear(a, g)) < 4e-3, "linear bf16");
    threw = false;
    try {
      linear.call(a, g, true, "auto", "fp16");
    } catch (const c10::Error& e) {
      threw = std::string(e.what()).find("precision: expected 'full' or 'bf16', got 'fp16'") != std::string::npos;
    }
    check(threw, "an unknown precision raises a message naming it");
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
