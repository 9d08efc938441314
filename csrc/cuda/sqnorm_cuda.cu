// CUDA kernels of the fisher_ext ops: a first, simple and exact version.
//
// One thread block per example. Each thread owns weight entries (o, c, k) in a
// block-stride loop, forms that example's weight-gradient entry
// dW_n[o, c, k] = sum_p g[n, o, p] x[n, c, pos(p, k)] reading x in place (implicit
// im2col, any stride/padding/dilation/groups, any input strides), squares it and
// keeps a running sum; a fixed-order block reduction writes s[n], so results are
// deterministic. Linear layers are the special case K = 1, positions = T.
// The method argument is validated but this kernel has one algorithm; the tiled
// tensor-core kernels are the CUDA issue's work.
#include "../sqnorm_common.h"
#include "../sqnorm_entry.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fisher_ext {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// Geometry with three spatial dims (z, h, w) and element strides (n, c, z, h, w) of x and g.
struct Geometry {
  int64_t C_out, cin_g, cout_g, K;
  int64_t in[3], out[3], k[3], stride[3], pad[3], dil[3];
  int64_t xs[5], gs[5];
};

template <typename scalar_t, typename acc_t>
__global__ void direct_sqnorm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                     acc_t* __restrict__ out, int64_t out_stride, Geometry geo, bool bias,
                                     bool add) {
  const int64_t n = blockIdx.x;
  const scalar_t* xn = x + n * geo.xs[0];
  const scalar_t* gn = g + n * geo.gs[0];
  const int64_t entries = geo.C_out * geo.cin_g * geo.K;
  acc_t local = 0;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int64_t kk = e % geo.K;
    const int64_t o = e / (geo.K * geo.cin_g);
    const int64_t c = (o / geo.cout_g) * geo.cin_g + (e / geo.K) % geo.cin_g;
    const int64_t kw = kk % geo.k[2], kh = (kk / geo.k[2]) % geo.k[1], kz = kk / (geo.k[2] * geo.k[1]);
    const scalar_t* xc = xn + c * geo.xs[1];
    const scalar_t* go = gn + o * geo.gs[1];
    acc_t dw = 0;
    for (int64_t oz = 0; oz < geo.out[0]; ++oz) {
      const int64_t iz = oz * geo.stride[0] - geo.pad[0] + kz * geo.dil[0];
      if (iz < 0 || iz >= geo.in[0]) continue;
      for (int64_t oh = 0; oh < geo.out[1]; ++oh) {
        const int64_t ih = oh * geo.stride[1] - geo.pad[1] + kh * geo.dil[1];
        if (ih < 0 || ih >= geo.in[1]) continue;
        for (int64_t ow = 0; ow < geo.out[2]; ++ow) {
          const int64_t iw = ow * geo.stride[2] - geo.pad[2] + kw * geo.dil[2];
          if (iw < 0 || iw >= geo.in[2]) continue;
          dw += static_cast<acc_t>(go[oz * geo.gs[2] + oh * geo.gs[3] + ow * geo.gs[4]]) *
                static_cast<acc_t>(xc[iz * geo.xs[2] + ih * geo.xs[3] + iw * geo.xs[4]]);
        }
      }
    }
    local += dw * dw;
  }
  if (bias) {
    for (int64_t o = threadIdx.x; o < geo.C_out; o += blockDim.x) {
      const scalar_t* go = gn + o * geo.gs[1];
      acc_t b = 0;
      for (int64_t oz = 0; oz < geo.out[0]; ++oz)
        for (int64_t oh = 0; oh < geo.out[1]; ++oh)
          for (int64_t ow = 0; ow < geo.out[2]; ++ow)
            b += static_cast<acc_t>(go[oz * geo.gs[2] + oh * geo.gs[3] + ow * geo.gs[4]]);
      local += b * b;
    }
  }
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[n * out_stride] = add ? out[n * out_stride] + partial[0] : partial[0];
}

void launch(Tensor& out, const Tensor& x, const Tensor& g, const Geometry& geo, int64_t N, bool bias, bool add) {
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sqnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    direct_sqnorm_kernel<scalar_t, acc_t><<<N, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), out.stride(0), geo, bias, add);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Linear as a 1x1 "convolution" over T positions: channels are the last dim.
Geometry linear_geometry(const LinearShape& sh, const Tensor& A, const Tensor& G) {
  Geometry geo{};
  geo.C_out = geo.cout_g = sh.d_out;
  geo.cin_g = sh.d_in;
  geo.K = 1;
  for (int i = 0; i < 3; ++i) {
    geo.in[i] = geo.out[i] = i == 2 ? sh.T : 1;
    geo.k[i] = geo.stride[i] = geo.dil[i] = 1;
    geo.pad[i] = 0;
  }
  const int64_t xs[5] = {A.stride(0), A.stride(2), 0, 0, A.stride(1)};
  const int64_t gs[5] = {G.stride(0), G.stride(2), 0, 0, G.stride(1)};
  for (int i = 0; i < 5; ++i) geo.xs[i] = xs[i], geo.gs[i] = gs[i];
  return geo;
}

Geometry conv_geometry(const ConvShape& s, const Tensor& x, const Tensor& g) {
  Geometry geo{};
  geo.C_out = s.C_out;
  geo.cin_g = s.cin_g;
  geo.cout_g = s.cout_g;
  geo.K = s.k_vol();
  for (int i = 0; i < 3; ++i) {
    geo.in[i] = s.in[i];
    geo.out[i] = s.out[i];
    geo.k[i] = s.k[i];
    geo.stride[i] = s.stride[i];
    geo.pad[i] = s.pad[i];
    geo.dil[i] = s.dil[i];
  }
  const int64_t nd = x.dim() - 2;
  for (int i = 0; i < 5; ++i) geo.xs[i] = geo.gs[i] = 0;
  geo.xs[0] = x.stride(0), geo.xs[1] = x.stride(1);
  geo.gs[0] = g.stride(0), geo.gs[1] = g.stride(1);
  for (int64_t i = 0; i < nd; ++i) {
    geo.xs[2 + 3 - nd + i] = x.stride(2 + i);
    geo.gs[2 + 3 - nd + i] = g.stride(2 + i);
  }
  return geo;
}

void linear_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                 const std::string& method, bool add) {
  choose_method(method, sh.T, sh.d_in, sh.d_out);  // validates the argument
  const Tensor A = a.reshape({sh.N, sh.T, sh.d_in});
  const Tensor G = g.reshape({sh.N, sh.T, sh.d_out});
  launch(out, A, G, linear_geometry(sh, A, G), sh.N, bias, add);
}

void conv_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias,
               const std::string& method, bool add) {
  choose_method(method, s.out_vol(), s.cin_g * s.k_vol(), s.cout_g);
  launch(out, x, g, conv_geometry(s, x, g), s.N, bias, add);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_ext, CUDA, m) { SqnormEntry<linear_into, conv_into>::register_all(m); }

}  // namespace fisher_ext
