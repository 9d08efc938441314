// The convolution ops' entry points, shared by every device: shape checks, output allocation,
// the call into a device's kernels, and their registration. A device gives
//   void conv_into(Tensor& out, const ConvShape&, const Tensor& x, const Tensor& g, bool bias,
//                  const std::string& method, bool add, Precision);  // add: accumulate into out
//   WeightGrads conv_grad_into(Tensor& out, const ConvShape&, x, g, bias, method);
// the latter writing the weight's per-example norms into out and returning the weight gradient
// and, where its kernels formed them on the way, the bias gradient and the bias's norms (any
// floating dtype; the entry casts them, and sums g for what is left undefined). unfused_conv_grad
// makes them from the norm kernel and ATen's weight gradient, for a device without a fused kernel.
#pragma once

#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../common/shapes.h"

namespace fisher_ext {

// The convolution's weight gradient (C_out, C_in / groups, *kernel) through ATen's
// convolution_backward. padding is the leading pad and g's size fixes the output, so where the
// symmetric padding would give another output size, x is padded (or cropped) to exactly what
// the outputs read.
inline at::Tensor conv_weight_grad(const ConvShape& s, const at::Tensor& x, const at::Tensor& g) {
  const int64_t nd = x.dim() - 2;
  std::vector<int64_t> stride, pad, dil, trailing, zeros(nd, 0);
  bool symmetric = true;
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t d = 3 - nd + i;
    stride.push_back(s.stride[d]);
    pad.push_back(s.pad[d]);
    dil.push_back(s.dil[d]);
    const int64_t extent = (s.out[d] - 1) * s.stride[d] + (s.k[d] - 1) * s.dil[d] + 1;
    trailing.push_back(extent - s.pad[d] - s.in[d]);
    const int64_t symmetric_out = (s.in[d] + 2 * s.pad[d] - (s.k[d] - 1) * s.dil[d] - 1) / s.stride[d] + 1;
    symmetric = symmetric && symmetric_out == s.out[d];
  }
  const at::Tensor weight = at::empty(conv_weight_shape(s, nd), x.options());  // only its shape is read
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

template <auto conv_into>
WeightGrads unfused_conv_grad(at::Tensor& out, const ConvShape& s, const at::Tensor& x, const at::Tensor& g,
                              const std::string& method) {
  conv_into(out, s, x, g, /*bias=*/false, method, /*add=*/false, Precision::Full);
  return {conv_weight_grad(s, x, g)};
}

template <auto conv_into, auto conv_grad_into>
struct ConvEntry {
  static at::Tensor conv(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias,
                         c10::string_view method, c10::string_view precision) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    const Precision p = parse_precision(precision);
    at::Tensor out = at::empty({s.N}, x.options().dtype(result_dtype(x.scalar_type())));
    conv_into(out, s, x, g, bias, std::string(method), /*add=*/false, p);
    return out;
  }

  static void conv_accumulate(at::Tensor acc, const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool bias, c10::string_view method, c10::string_view precision) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    const Precision p = parse_precision(precision);
    check_accumulator(acc, x, "x", g);
    conv_into(acc, s, x, g, bias, std::string(method), /*add=*/true, p);
  }

  // (weight gradient, bias gradient, the weight's per-example squared norms, the bias's; the
  // bias parts undefined without bias).
  static GradOutputs conv_grad(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool bias, c10::string_view method) {
    const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
    at::Tensor out = at::empty({s.N}, x.options().dtype(result_dtype(x.scalar_type())));
    return grad_outputs(conv_grad_into(out, s, x, g, bias, std::string(method)), out, bias, x.scalar_type(), [&] {
      std::vector<int64_t> positions;
      for (int64_t d = 2; d < g.dim(); ++d) positions.push_back(d);
      return g.sum(positions, false, out.scalar_type());
    });
  }

  // In a TORCH_LIBRARY_IMPL block of the device.
  static void register_all(torch::Library& m) {
    m.impl("conv_sqnorm", &conv);
    m.impl("conv_sqnorm_accumulate_", &conv_accumulate);
    m.impl("conv_grad_sqnorm", &conv_grad);
  }
};

}  // namespace fisher_ext
