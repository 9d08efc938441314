// The four op entry points, shared by every device: shape checks, output allocation, and the
// call into a device's kernels, given as
//   void linear_into(Tensor& out, const LinearShape&, const Tensor& a, const Tensor& g, bool bias,
//                    const std::string& method, bool add);
//   void conv_into(Tensor& out, const ConvShape&, const Tensor& x, const Tensor& g, bool bias,
//                  const std::string& method, bool add);
// (add: accumulate into out instead of overwriting it).
#pragma once

#include <torch/library.h>

#include "sqnorm_common.h"

namespace fisher_ext {

template <auto linear_into, auto conv_into>
struct SqnormEntry {
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
    const LinearShape sh = linear_shape(a, g);
    at::Tensor out = at::empty({sh.N}, a.options().dtype(result_dtype(a.scalar_type())));
    linear_into(out, sh, a, g, bias, std::string(method), /*add=*/false);
    return out;
  }

  static void linear_accumulate(at::Tensor acc, const at::Tensor& a, const at::Tensor& g, bool bias,
                                c10::string_view method) {
    const LinearShape sh = linear_shape(a, g);
    check_accumulator(acc, a);
    linear_into(acc, sh, a, g, bias, std::string(method), /*add=*/true);
  }

  static at::Tensor conv(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         bool bias, c10::string_view method) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    at::Tensor out = at::empty({s.N}, x.options().dtype(result_dtype(x.scalar_type())));
    conv_into(out, s, x, g, bias, std::string(method), /*add=*/false);
    return out;
  }

  static void conv_accumulate(at::Tensor acc, const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, bool bias, c10::string_view method) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    check_accumulator(acc, x);
    conv_into(acc, s, x, g, bias, std::string(method), /*add=*/true);
  }

  // Registers the four kernels in a TORCH_LIBRARY_IMPL block.
  static void register_all(torch::Library& m) {
    m.impl("linear_sqnorm", &linear);
    m.impl("linear_sqnorm_accumulate_", &linear_accumulate);
    m.impl("conv_sqnorm", &conv);
    m.impl("conv_sqnorm_accumulate_", &conv_accumulate);
  }
};

}  // namespace fisher_ext
