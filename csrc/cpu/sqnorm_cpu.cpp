// CPU kernels of the fisher_ext ops.
//
// Examples are processed in blocks (at::parallel_for over blocks, one block per
// task), so the working memory is O(threads x block), never O(N x d_in x d_out).
// Within a block the linear rule of DESIGN.md §2 runs as batched GEMMs
// (ghost: Gram matrices; materialize: per-example weight gradients), squared
// and reduced before the next block.
//
// Convolutions read the input without an im2col buffer when the stride is 1
// ("implicit" layout): each example is copied once into a zero-padded, flat
// (C_in, L_x) buffer in which every kernel offset k is a plain column shift, so
// X_k = buf[:, off_k : off_k + L] is a strided matrix view and
// dW_k = G_pad X_k^T. G_pad is g laid out on the padded row pitch with zeros in
// the columns that do not exist, which cancels the rows' wrap-around.
// Strided convolutions and those with few channels per group (where K GEMMs
// of width C_in/groups would be inefficient) use a per-block im2col buffer.
#include "../sqnorm_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fisher_ext {
namespace {

using at::Tensor;

constexpr int64_t kBlockBytes = 8 << 20;  // working memory of one block
constexpr int64_t kImplicitMinChannels = 16;

// Examples per block: within the memory budget, and at least one block per thread.
int64_t block_size(int64_t N, int64_t bytes_per_example) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nb = kBlockBytes / std::max<int64_t>(1, bytes_per_example);
  nb = std::min(nb, (N + threads - 1) / threads);
  return std::max<int64_t>(1, nb);
}

template <typename F>
void for_each_block(int64_t N, int64_t nb, const F& f) {
  const int64_t blocks = (N + nb - 1) / nb;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // The op's autograd is registered from Python; the ATen calls inside must not record a graph.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b = b0; b < b1; ++b) f(b * nb, std::min(nb, N - b * nb));
  });
}

void write_result(Tensor& out, int64_t n0, const Tensor& s, bool add) {
  auto dst = out.narrow(0, n0, s.size(0));
  if (add)
    dst.add_(s);
  else
    dst.copy_(s);
}

// sum_k ||G X_k^T||_F^2 (materialize) or <sum_k X_k^T X_k, G^T G> (ghost), per example.
// X_k: (nb, rows, L) views; G: (nb, d_out, L).
Tensor rule(const std::vector<Tensor>& Xs, const Tensor& G, Method method) {
  if (method == Method::Ghost) {
    Tensor gram = at::bmm(Xs[0].transpose(1, 2), Xs[0]);
    for (size_t k = 1; k < Xs.size(); ++k) gram.baddbmm_(Xs[k].transpose(1, 2), Xs[k]);
    return gram.mul_(at::bmm(G.transpose(1, 2), G)).sum({1, 2});
  }
  Tensor s = at::zeros({G.size(0)}, G.options());
  Tensor ws = at::empty({G.size(0), G.size(1), Xs[0].size(1)}, G.options());
  for (const Tensor& X : Xs) {
    at::bmm_out(ws, G, X.transpose(1, 2));
    s.add_(ws.mul_(ws).sum({1, 2}));
  }
  return s;
}

void linear_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                 const std::string& method, bool add) {
  if (sh.N == 0) return;
  const auto acc = result_dtype(a.scalar_type());
  const Tensor A = a.reshape({sh.N, sh.T, sh.d_in});
  const Tensor G = g.reshape({sh.N, sh.T, sh.d_out});
  const Method m = choose_method(method, sh.T, sh.d_in, sh.d_out);
  const int64_t elt = at::elementSize(acc);
  const int64_t ws = m == Method::Ghost ? 2 * sh.T * sh.T : sh.d_in * sh.d_out;
  const int64_t nb = block_size(sh.N, elt * (ws + sh.T * (sh.d_in + sh.d_out)));
  for_each_block(sh.N, nb, [&](int64_t n0, int64_t cnt) {
    const Tensor Ab = A.narrow(0, n0, cnt).to(acc);
    const Tensor Gb = G.narrow(0, n0, cnt).to(acc);
    Tensor s = rule({Ab.transpose(1, 2)}, Gb.transpose(1, 2), m);
    if (bias) s.add_(Gb.sum(1).square_().sum(1));
    write_result(out, n0, s, add);
  });
}

// ---- convolution -----------------------------------------------------------

struct ConvPlan {
  bool implicit;
  int64_t Hp, Wp;  // padded plane of the implicit layout
  int64_t L;       // columns of X_k and G
  int64_t Lx;      // columns of the packed input (implicit) or L (im2col)
  int64_t rows;    // rows of each X_k per group
  std::vector<int64_t> offsets;  // column shift of each kernel offset (implicit)
};

ConvPlan plan_conv(const ConvShape& s) {
  ConvPlan p{};
  const bool unit_stride = s.stride[0] == 1 && s.stride[1] == 1 && s.stride[2] == 1;
  p.implicit = unit_stride && s.cin_g >= kImplicitMinChannels && s.k_vol() > 1;
  if (!p.implicit) {
    p.L = p.Lx = s.out_vol();
    p.rows = s.cin_g * s.k_vol();
    return p;
  }
  p.Hp = s.out[1] + (s.k[1] - 1) * s.dil[1];
  p.Wp = s.out[2] + (s.k[2] - 1) * s.dil[2];
  p.L = s.out_vol() == 0 ? 0 : ((s.out[0] - 1) * p.Hp + (s.out[1] - 1)) * p.Wp + s.out[2];
  for (int64_t kz = 0; kz < s.k[0]; ++kz)
    for (int64_t kh = 0; kh < s.k[1]; ++kh)
      for (int64_t kw = 0; kw < s.k[2]; ++kw)
        p.offsets.push_back((kz * s.dil[0] * p.Hp + kh * s.dil[1]) * p.Wp + kw * s.dil[2]);
  p.Lx = p.offsets.back() + p.L;
  p.rows = s.cin_g;
  return p;
}

// Strides of x / g normalized to (n, c, z, h, w); a missing leading spatial dim gets stride 0.
std::array<int64_t, 5> strides5(const Tensor& t) {
  std::array<int64_t, 5> st{0, 0, 0, 0, 0};
  const int64_t nd = t.dim() - 2;
  st[0] = t.stride(0);
  st[1] = t.stride(1);
  for (int64_t i = 0; i < nd; ++i) st[2 + 3 - nd + i] = t.stride(2 + i);
  return st;
}

// Packs examples [n0, n0+cnt) of x into (cnt, C_in, Lx) (implicit) or (cnt, C_in*K, P) (im2col).
template <typename scalar_t, typename acc_t>
void pack_x(const Tensor& x, const ConvShape& s, const ConvPlan& p, int64_t n0, int64_t cnt, Tensor& buf) {
  const auto st = strides5(x);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* bp = buf.data_ptr<acc_t>();
  auto in_range = [](int64_t i, int64_t n) { return i >= 0 && i < n; };
  for (int64_t n = 0; n < cnt; ++n) {
    for (int64_t c = 0; c < s.C_in; ++c) {
      const scalar_t* xc = xp + (n0 + n) * st[0] + c * st[1];
      if (p.implicit) {
        acc_t* row = bp + (n * s.C_in + c) * p.Lx;
        for (int64_t q = 0; q < p.Lx; ++q) {
          const int64_t iz = q / (p.Hp * p.Wp) - s.pad[0];
          const int64_t ih = (q / p.Wp) % p.Hp - s.pad[1];
          const int64_t iw = q % p.Wp - s.pad[2];
          row[q] = in_range(iz, s.in[0]) && in_range(ih, s.in[1]) && in_range(iw, s.in[2])
                       ? static_cast<acc_t>(xc[iz * st[2] + ih * st[3] + iw * st[4]])
                       : acc_t(0);
        }
        continue;
      }
      int64_t r = c * s.k_vol();
      for (int64_t kz = 0; kz < s.k[0]; ++kz)
        for (int64_t kh = 0; kh < s.k[1]; ++kh)
          for (int64_t kw = 0; kw < s.k[2]; ++kw, ++r) {
            acc_t* row = bp + (n * s.C_in * s.k_vol() + r) * p.L;
            for (int64_t oz = 0; oz < s.out[0]; ++oz) {
              const int64_t iz = oz * s.stride[0] - s.pad[0] + kz * s.dil[0];
              for (int64_t oh = 0; oh < s.out[1]; ++oh) {
                const int64_t ih = oh * s.stride[1] - s.pad[1] + kh * s.dil[1];
                const bool zh = in_range(iz, s.in[0]) && in_range(ih, s.in[1]);
                for (int64_t ow = 0; ow < s.out[2]; ++ow) {
                  const int64_t iw = ow * s.stride[2] - s.pad[2] + kw * s.dil[2];
                  *row++ = zh && in_range(iw, s.in[2]) ? static_cast<acc_t>(xc[iz * st[2] + ih * st[3] + iw * st[4]])
                                                       : acc_t(0);
                }
              }
            }
          }
    }
  }
}

// Packs g of examples [n0, n0+cnt) into (cnt, C_out, L); in the implicit layout each
// output row is placed on the padded pitch Wp, with zeros in between.
template <typename scalar_t, typename acc_t>
void pack_g(const Tensor& g, const ConvShape& s, const ConvPlan& p, int64_t n0, int64_t cnt, Tensor& buf) {
  const auto st = strides5(g);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  acc_t* bp = buf.data_ptr<acc_t>();
  const int64_t pitch_w = p.implicit ? p.Wp : s.out[2];
  const int64_t pitch_h = p.implicit ? p.Hp : s.out[1];
  for (int64_t n = 0; n < cnt; ++n)
    for (int64_t o = 0; o < s.C_out; ++o) {
      const scalar_t* go = gp + (n0 + n) * st[0] + o * st[1];
      acc_t* row = bp + (n * s.C_out + o) * p.L;
      for (int64_t oz = 0; oz < s.out[0]; ++oz)
        for (int64_t oh = 0; oh < s.out[1]; ++oh) {
          acc_t* dst = row + (oz * pitch_h + oh) * pitch_w;
          const scalar_t* src = go + oz * st[2] + oh * st[3];
          for (int64_t ow = 0; ow < s.out[2]; ++ow) dst[ow] = static_cast<acc_t>(src[ow * st[4]]);
        }
    }
}

void conv_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias,
               const std::string& method, bool add) {
  if (s.N == 0) return;
  const auto acc = result_dtype(x.scalar_type());
  const ConvPlan p = plan_conv(s);
  const Method m = choose_method(method, p.L, s.cin_g * s.k_vol(), s.cout_g);
  const int64_t x_cols = p.implicit ? s.C_in * p.Lx : s.C_in * s.k_vol() * p.L;
  const int64_t ws = m == Method::Ghost ? 2 * p.L * p.L : s.cout_g * p.rows;
  const int64_t nb = block_size(s.N, at::elementSize(acc) * (x_cols + s.C_out * p.L + ws));
  const auto opts = x.options().dtype(acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_sqnorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_block(s.N, nb, [&](int64_t n0, int64_t cnt) {
      Tensor X = at::empty({cnt, p.implicit ? s.C_in : s.C_in * s.k_vol(), p.Lx}, opts);
      Tensor G = p.implicit ? at::zeros({cnt, s.C_out, p.L}, opts) : at::empty({cnt, s.C_out, p.L}, opts);
      pack_x<scalar_t, acc_t>(x, s, p, n0, cnt, X);
      pack_g<scalar_t, acc_t>(g, s, p, n0, cnt, G);
      Tensor sb = at::zeros({cnt}, opts);
      for (int64_t gr = 0; gr < s.groups; ++gr) {
        const Tensor Xg = X.narrow(1, gr * p.rows, p.rows);
        std::vector<Tensor> Xs;
        if (p.implicit)
          for (int64_t off : p.offsets) Xs.push_back(Xg.narrow(2, off, p.L));
        else
          Xs.push_back(Xg);
        sb.add_(rule(Xs, G.narrow(1, gr * s.cout_g, s.cout_g), m));
      }
      if (bias) sb.add_(G.sum(2).square_().sum(1));
      write_result(out, n0, sb, add);
    });
  });
}

// ---- op entry points ---------------------------------------------------------

Tensor linear_sqnorm_cpu(const Tensor& a, const Tensor& g, bool bias, c10::string_view method) {
  const LinearShape sh = linear_shape(a, g);
  Tensor out = at::empty({sh.N}, a.options().dtype(result_dtype(a.scalar_type())));
  linear_into(out, sh, a, g, bias, std::string(method), /*add=*/false);
  return out;
}

void linear_sqnorm_accumulate_cpu(Tensor acc, const Tensor& a, const Tensor& g, bool bias,
                                  c10::string_view method) {
  const LinearShape sh = linear_shape(a, g);
  check_accumulator(acc, a);
  linear_into(acc, sh, a, g, bias, std::string(method), /*add=*/true);
}

Tensor conv_sqnorm_cpu(const Tensor& x, const Tensor& g, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias,
                       c10::string_view method) {
  const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
  Tensor out = at::empty({s.N}, x.options().dtype(result_dtype(x.scalar_type())));
  conv_into(out, s, x, g, bias, std::string(method), /*add=*/false);
  return out;
}

void conv_sqnorm_accumulate_cpu(Tensor acc, const Tensor& x, const Tensor& g, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, bool bias, c10::string_view method) {
  const ConvShape s = conv_shape(x, g, kernel_size, stride, padding, dilation, groups);
  check_accumulator(acc, x);
  conv_into(acc, s, x, g, bias, std::string(method), /*add=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_ext, CPU, m) {
  m.impl("linear_sqnorm", &linear_sqnorm_cpu);
  m.impl("linear_sqnorm_accumulate_", &linear_sqnorm_accumulate_cpu);
  m.impl("conv_sqnorm", &conv_sqnorm_cpu);
  m.impl("conv_sqnorm_accumulate_", &conv_sqnorm_accumulate_cpu);
}

}  // namespace fisher_ext
