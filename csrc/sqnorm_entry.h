// The op entry points, shared by every device: shape checks, output allocation, and the call
// into a device's kernels, given as
//   void linear_into(Tensor& out, const LinearShape&, const Tensor& a, const Tensor& g, bool bias,
//                    const std::string& method, bool add);
//   void conv_into(Tensor& out, const ConvShape&, const Tensor& x, const Tensor& g, bool bias,
//                  const std::string& method, bool add);
// (add: accumulate into out instead of overwriting it), and for the fused weight-gradient ops
//   Tensor linear_grad_into(Tensor& out, const LinearShape&, a, g, bias, method);
//   Tensor conv_grad_into(Tensor& out, const ConvShape&, x, g, bias, method);
// which write the norms into out and return the weight gradient (any floating dtype; the entry
// casts it to the inputs'). unfused_linear_grad / unfused_conv_grad make these from a device's
// norm kernels and ATen's weight gradient, for a device without a fused kernel.
#pragma once

#include <torch/library.h>

#include <tuple>
#include <vector>

#include "sqnorm_common.h"

namespace fisher_ext {

// sum over examples and positions of g^T a: (d_out, d_in).
inline at::Tensor linear_weight_grad(const LinearShape& sh, const at::Tensor& a, const at::Tensor& g) {
  return at::mm(g.reshape({sh.N * sh.T, sh.d_out}).t(), a.reshape({sh.N * sh.T, sh.d_in}));
}

// The convolution's weight gradient (C_out, C_in / groups, *kernel) through ATen's
// convolution_backward. padding is the leading pad and g's size fixes the output, so where the
// symmetric padding would give another output size, x is padded (or cropped) to exactly what
// the outputs read.
inline at::Tensor conv_weight_grad(const ConvShape& s, const at::Tensor& x, const at::Tensor& g) {
  const int64_t nd = x.dim() - 2;
  std::vector<int64_t> kernel, stride, pad, dil, trailing, zeros(nd, 0);
  bool symmetric = true;
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t d = 3 - nd + i;
    kernel.push_back(s.k[d]);
    stride.push_back(s.stride[d]);
    pad.push_back(s.pad[d]);
    dil.push_back(s.dil[d]);
    const int64_t extent = (s.out[d] - 1) * s.stride[d] + (s.k[d] - 1) * s.dil[d] + 1;
    trailing.push_back(extent - s.pad[d] - s.in[d]);
    const int64_t symmetric_out = (s.in[d] + 2 * s.pad[d] - (s.k[d] - 1) * s.dil[d] - 1) / s.stride[d] + 1;
    symmetric = symmetric && symmetric_out == s.out[d];
  }
  std::vector<int64_t> weight_size{s.C_out, s.cin_g};
  weight_size.insert(weight_size.end(), kernel.begin(), kernel.end());
  const at::Tensor weight = at::empty(weight_size, x.options());  // only its shape is read
  at::Tensor input = x;
  if (!symmetric) {
    std::vector<int64_t> pads;  // last dim first
    for (int64_t i = nd - 1; i >= 0; --i) {
      pads.push_back(pad[i]);
      pads.push_back(trailing[i]);
    }
    input = at::constant_pad_nd(x, pads);
  }
  return std::get<1>(at::convolution_backward(g, input, weight, std::nullopt, stride, symmetric ? pad : zeros, dil,
                                              false, zeros, s.groups, {false, true, false}));
}

template <auto linear_into>
at::Tensor unfused_linear_grad(at::Tensor& out, const LinearShape& sh, const at::Tensor& a, const at::Tensor& g,
                               bool bias, const std::string& method) {
  linear_into(out, sh, a, g, bias, method, /*add=*/false);
  return linear_weight_grad(sh, a, g);
}

template <auto conv_into>
at::Tensor unfused_conv_grad(at::Tensor& out, const ConvShape& s, const at::Tensor& x, const at::Tensor& g, bool bias,
                             const std::string& method) {
  conv_into(out, s, x, g, bias, method, /*add=*/false);
  return conv_weight_grad(s, x, g);
}

template <auto linear_into, auto conv_into, auto linear_grad_into, auto conv_grad_into>
struct SqnormEntry {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

  static at::Tensor linear(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
    const LinearShape sh = linear_shape(a, g);
    at::Tensor out = at::empty({sh.N}, a.options().dtype(result_dtype(a.scalar_type())));
    linear_into(out, sh, a, g, bias, std::string(method), /*add=*/false);
    return out;
  }

  static void linear_accumulate(at::Tensor acc, const at::Tensor& a, const at::Tensor& g, bool bias,
                                c10::string_view method) {
    const LinearShape sh = linear_shape(a, g);
    check_accumulator(acc, a, "a", g);
    linear_into(acc, sh, a, g, bias, std::string(method), /*add=*/true);
  }

  static at::Tensor conv(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias,
                         c10::string_view method) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    at::Tensor out = at::empty({s.N}, x.options().dtype(result_dtype(x.scalar_type())));
    conv_into(out, s, x, g, bias, std::string(method), /*add=*/false);
    return out;
  }

  static void conv_accumulate(at::Tensor acc, const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool bias, c10::string_view method) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    check_accumulator(acc, x, "x", g);
    conv_into(acc, s, x, g, bias, std::string(method), /*add=*/true);
  }

  // (weight gradient, bias gradient or undefined without bias, per-example squared norms).
  static Grads linear_grad(const at::Tensor& a, const at::Tensor& g, bool bias, c10::string_view method) {
    const LinearShape sh = linear_shape(a, g);
    at::Tensor out = at::empty({sh.N}, a.options().dtype(result_dtype(a.scalar_type())));
    at::Tensor weight = linear_grad_into(out, sh, a, g, bias, std::string(method)).to(a.scalar_type());
    at::Tensor bias_grad = bias ? g.reshape({sh.N * sh.T, sh.d_out}).sum(0) : at::Tensor();
    return {weight, bias_grad, out};
  }

  static Grads conv_grad(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias,
                         c10::string_view method) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    at::Tensor out = at::empty({s.N}, x.options().dtype(result_dtype(x.scalar_type())));
    at::Tensor weight = conv_grad_into(out, s, x, g, bias, std::string(method)).to(x.scalar_type());
    std::vector<int64_t> reduce{0};
    for (int64_t d = 2; d < g.dim(); ++d) reduce.push_back(d);
    at::Tensor bias_grad = bias ? g.sum(reduce) : at::Tensor();
    return {weight, bias_grad, out};
  }

  // Registers the kernels in a TORCH_LIBRARY_IMPL block.
  static void register_all(torch::Library& m) {
    m.impl("linear_sqnorm", &linear);
    m.impl("linear_sqnorm_accumulate_", &linear_accumulate);
    m.impl("conv_sqnorm", &conv);
    m.impl("conv_sqnorm_accumulate_", &conv_accumulate);
    m.impl("linear_grad_sqnorm", &linear_grad);
    m.impl("conv_grad_sqnorm", &conv_grad);
  }
};

}  // namespace fisher_ext
