// The linear ops' entry points, shared by every device: shape checks, output allocation, the
// call into a device's kernels, and their registration. A device gives
//   void linear_into(Tensor& out, const LinearShape&, const Tensor& a, const Tensor& g, bool bias,
//                    const std::string& method, bool add, Precision);  // add: accumulate into out
//   WeightGrads linear_grad_into(Tensor& out, const LinearShape&, a, g, bias, method);
// the latter writing the weight's per-example norms into out and returning the weight gradient
// and, where its kernels formed them on the way, the bias gradient and the bias's norms (any
// floating dtype; the entry casts them, and sums g for what is left undefined).
// unfused_linear_grad makes them from the norm kernel and ATen's weight gradient, for a device
// without a fused kernel.
#pragma once

#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../common/shapes.h"

namespace fisher_ext {

// sum over examples and positions of g^T a: (d_out, d_in).
inline at::Tensor linear_weight_grad(const LinearShape& sh, const at::Tensor& a, const at::Tensor& g) {
  return at::mm(g.reshape({sh.N * sh.T, sh.d_out}).t(), a.reshape({sh.N * sh.T, sh.d_in}));
}

template <auto linear_into>
WeightGrads unfused_linear_grad(at::Tensor& out, const LinearShape& sh, const at::Tensor& a, const at::Tensor& g,
                                const std::string& method) {
  linear_into(out, sh, a, g, /*bias=*/false, method, /*add=*/false, Precision::Full);
  return {linear_weight_grad(sh, a, g)};
}

template <auto linear_into, auto linear_grad_into>
struct LinearEntry {
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method,
                           c10::string_view precision) {
    const LinearShape sh = linear_shape(a, g);
    const Precision p = parse_precision(precision);
    at::Tensor out = at::empty({sh.N}, a.options().dtype(result_dtype(a.scalar_type())));
    linear_into(out, sh, a, g, bias, std::string(method), /*add=*/false, p);
    return out;
  }

  static void linear_accumulate(at::Tensor acc, const at::Tensor& a, const at::Tensor& g, bool bias,
                                c10::string_view method, c10::string_view precision) {
    const LinearShape sh = linear_shape(a, g);
    const Precision p = parse_precision(precision);
    check_accumulator(acc, a, "a", g);
    linear_into(acc, sh, a, g, bias, std::string(method), /*add=*/true, p);
  }

  // (weight gradient, bias gradient, the weight's per-example squared norms, the bias's; the
  // bias parts undefined without bias).
  static GradOutputs linear_grad(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
    const LinearShape sh = linear_shape(a, g);
    at::Tensor out = at::empty({sh.N}, a.options().dtype(result_dtype(a.scalar_type())));
    return grad_outputs(linear_grad_into(out, sh, a, g, bias, std::string(method)), out, bias, a.scalar_type(),
                        [&] { return g.reshape({sh.N, sh.T, sh.d_out}).sum(1, false, out.scalar_type()); });
  }

  // In a TORCH_LIBRARY_IMPL block of the device.
  static void register_all(torch::Library& m) {
    m.impl("linear_sqnorm", &linear);
    m.impl("linear_sqnorm_accumulate_", &linear_accumulate);
    m.impl("linear_grad_sqnorm", &linear_grad);
  }
};

}  // namespace fisher_ext
