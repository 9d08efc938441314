// Shapes, argument checks and the cost model shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace fisher_ext {

enum class Method { Ghost, Materialize };

// The norm ops' `precision`: Full, the inputs as given with float32 accumulation; Bf16, float32
// inputs may be rounded to bfloat16 where the device's bfloat16 GEMMs are faster.
enum class Precision { Full, Bf16 };

inline Precision parse_precision(c10::string_view precision) {
  if (precision == "full") return Precision::Full;
  TORCH_CHECK(precision == "bf16", "precision: expected 'full' or 'bf16', got '", std::string(precision), "'");
  return Precision::Bf16;
}

// Every op returns float32, or float64 for float64 inputs (docs/design.md, section 2).
inline at::ScalarType result_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// 'auto' resolves by flop count: ghost ~ 2 T^2 (d_in + d_out), materialize ~ 2 T d_in d_out,
// the latter weighted by materialize_cost, the time per flop of the backend's materialize
// path relative to its Gram matrices.
inline Method choose_method(const std::string& method, int64_t T, int64_t d_in, int64_t d_out,
                            double materialize_cost = 1.0) {
  if (method == "ghost") return Method::Ghost;
  if (method == "materialize") return Method::Materialize;
  TORCH_CHECK(method == "auto", "method: expected 'auto', 'ghost' or 'materialize', got '", method, "'");
  return double(T) * (d_in + d_out) <= materialize_cost * d_in * d_out ? Method::Ghost : Method::Materialize;
}

// 'auto' of the fused ops (weight gradient and norms) where the materialize path forms the batch
// weight gradient from the same tiles: materialize ~ d_in d_out (T + 8), each example's tile
// costing about 8 positions' worth in its squaring, summing and storing; ghost also computes the
// weight gradient, ~ T d_in d_out more (bench/results/peers_cpu.md, the ResNet-18 layers).
inline Method choose_fused_method(const std::string& method, int64_t T, int64_t d_in, int64_t d_out,
                                  double materialize_cost) {
  if (method != "auto") return choose_method(method, T, d_in, d_out);
  const double ghost = double(T) * T * (d_in + d_out) + double(T) * d_in * d_out;
  return ghost < materialize_cost * d_in * d_out * (T + 8) ? Method::Ghost : Method::Materialize;
}

inline void check_inputs(const at::Tensor& a, const char* a_name, const at::Tensor& g) {
  TORCH_CHECK(a.device() == g.device(), a_name, " and g: expected tensors on one device, got ", a.device(), " and ",
              g.device());
  TORCH_CHECK(a.scalar_type() == g.scalar_type(), a_name, " and g: expected one dtype, got ", a.scalar_type(), " and ",
              g.scalar_type());
  const auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, a_name,
              ": expected float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(a.size(0) == g.size(0), "g: expected the batch size N=", a.size(0), " of ", a_name, ", got ", g.size(0));
}

// The accumulator of the *_accumulate_ ops: (N,) of the result dtype on the inputs' device, sharing
// no memory with the inputs (the kernels read them while writing it).
inline void check_accumulator(const at::Tensor& acc, const at::Tensor& a, const char* a_name, const at::Tensor& g) {
  TORCH_CHECK(acc.dim() == 1 && acc.size(0) == a.size(0), "acc: expected shape (", a.size(0), ",), got ", acc.sizes());
  TORCH_CHECK(acc.scalar_type() == result_dtype(a.scalar_type()), "acc: expected dtype ", result_dtype(a.scalar_type()),
              ", got ", acc.scalar_type());
  TORCH_CHECK(acc.device() == a.device(), "acc: expected device ", a.device(), ", got ", acc.device());
  // Same storage is refused outright: ATen's overlap test gives up on strided views.
  TORCH_CHECK(!acc.is_alias_of(a), "acc: expected a buffer of its own, got one that shares memory with ", a_name);
  TORCH_CHECK(!acc.is_alias_of(g), "acc: expected a buffer of its own, got one that shares memory with g");
}

// What a device's fused op returns: the weight gradient, and the bias gradient and the bias's
// per-example squared norms (N,), each undefined where the kernels did not form it on the way
// (the entry then sums g: grad_outputs).
struct WeightGrads {
  at::Tensor weight, bias, bias_sqnorm;
};

// A grad op's outputs: (weight gradient, bias gradient, the weight's norms, the bias's).
using GradOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Those outputs from what a device's grad_into wrote (the weight's norms into `out`) and returned:
// the gradients in `dtype` (the inputs'), the bias parts undefined without bias. The bias parts a
// device left undefined come from `sums()`, each example's bias gradient (N, C_out; g summed over
// its positions in out's dtype), made only where one is missing.
template <typename Sums>
GradOutputs grad_outputs(WeightGrads grads, const at::Tensor& out, bool bias, at::ScalarType dtype, Sums sums) {
  const at::Tensor weight = grads.weight.to(dtype);
  if (!bias) return {weight, at::Tensor(), out, at::Tensor()};
  if (!grads.bias.defined() || !grads.bias_sqnorm.defined()) {
    const at::Tensor per_example = sums();
    if (!grads.bias.defined()) grads.bias = per_example.sum(0);
    if (!grads.bias_sqnorm.defined()) grads.bias_sqnorm = per_example.square().sum(1);
  }
  return {weight, grads.bias.to(dtype), out, grads.bias_sqnorm.to(out.scalar_type())};
}

// Linear: a (N, *, d_in) and g (N, *, d_out), flattened to (N, T, d).
struct LinearShape {
  int64_t N, T, d_in, d_out;
};

inline LinearShape linear_shape(const at::Tensor& a, const at::Tensor& g) {
  TORCH_CHECK(a.dim() >= 2, "a: expected rank >= 2 (N, *, d_in), got shape ", a.sizes());
  TORCH_CHECK(g.dim() == a.dim(), "g: expected rank ", a.dim(), " like a, got shape ", g.sizes());
  check_inputs(a, "a", g);
  for (int64_t i = 1; i + 1 < a.dim(); ++i)
    TORCH_CHECK(a.size(i) == g.size(i), "g: expected middle dims ", a.sizes().slice(1, a.dim() - 2), " of a, got ",
                g.sizes().slice(1, g.dim() - 2));
  const int64_t N = a.size(0), d_in = a.size(-1), d_out = g.size(-1);
  int64_t T = 1;
  for (int64_t i = 1; i + 1 < a.dim(); ++i) T *= a.size(i);
  return {N, T, d_in, d_out};
}

// Conv{1,2,3}d, normalized to three spatial dims by leading singleton dims.
// padding is the leading pad; the output size comes from g; reads outside x are zero.
struct ConvShape {
  int64_t N, C_in, C_out, groups, cin_g, cout_g;
  std::array<int64_t, 3> in{1, 1, 1}, out{1, 1, 1}, k{1, 1, 1}, stride{1, 1, 1}, pad{0, 0, 0}, dil{1, 1, 1};
  int64_t out_vol() const { return out[0] * out[1] * out[2]; }
  int64_t k_vol() const { return k[0] * k[1] * k[2]; }
  int64_t in_vol() const { return in[0] * in[1] * in[2]; }
};

// The convolution weight's shape, (C_out, C_in / groups, *kernel) over its nd spatial dims.
inline std::vector<int64_t> conv_weight_shape(const ConvShape& s, int64_t nd) {
  std::vector<int64_t> shape{s.C_out, s.cin_g};
  for (int64_t d = 3 - nd; d < 3; ++d) shape.push_back(s.k[d]);
  return shape;
}

inline ConvShape conv_shape(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  TORCH_CHECK(nd >= 1 && nd <= 3, "kernel_size: expected 1 to 3 spatial dims, got ", kernel_size);
  TORCH_CHECK(x.dim() == nd + 2, "x: expected rank ", nd + 2, " (N, C_in, *spatial) for a ", nd,
              "-d kernel, got shape ", x.sizes());
  TORCH_CHECK(g.dim() == nd + 2, "g: expected rank ", nd + 2, " (N, C_out, *spatial), got shape ", g.sizes());
  TORCH_CHECK(stride.size() == size_t(nd) && padding.size() == size_t(nd) && dilation.size() == size_t(nd),
              "stride, padding, dilation: expected ", nd, " values each, got ", stride, ", ", padding, ", ", dilation);
  check_inputs(x, "x", g);
  TORCH_CHECK(groups >= 1, "groups: expected >= 1, got ", groups);
  ConvShape s;
  s.N = x.size(0);
  s.C_in = x.size(1);
  s.C_out = g.size(1);
  s.groups = groups;
  TORCH_CHECK(s.C_in % groups == 0, "x: expected channels divisible by groups=", groups, ", got ", s.C_in);
  TORCH_CHECK(s.C_out % groups == 0, "g: expected channels divisible by groups=", groups, ", got ", s.C_out);
  s.cin_g = s.C_in / groups;
  s.cout_g = s.C_out / groups;
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t j = 3 - nd + i;
    s.in[j] = x.size(2 + i);
    s.out[j] = g.size(2 + i);
    s.k[j] = kernel_size[i];
    s.stride[j] = stride[i];
    s.pad[j] = padding[i];
    s.dil[j] = dilation[i];
    TORCH_CHECK(s.k[j] >= 1 && s.stride[j] >= 1 && s.dil[j] >= 1 && s.pad[j] >= 0,
                "kernel_size, stride, dilation: expected >= 1 and padding >= 0, got ", kernel_size, ", ", stride, ", ",
                dilation, ", ", padding);
  }
  return s;
}

}  // namespace fisher_ext
