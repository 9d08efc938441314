// Host side of the tiled CUDA programs: the geometry of a layer and the program that runs it.
// Shared by sqnorm_cuda.cu and the CPU emulator test (csrc/test/test_cuda_tiles.cpp).
#pragma once

#include <string>

#include "../common/shapes.h"
#include "sqnorm_tiles.h"

namespace fisher_ext {
namespace tiles {

// Linear as a 1x1 "convolution" over T positions: channels are the last dim.
inline Geometry linear_geometry(const LinearShape& sh, const at::Tensor& A, const at::Tensor& G, bool bias) {
  Geometry geo{};
  geo.bias = bias;
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
  geo.prepare();
  return geo;
}

inline Geometry conv_geometry(const ConvShape& s, const at::Tensor& x, const at::Tensor& g, bool bias) {
  Geometry geo{};
  geo.bias = bias;
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
  geo.prepare();
  return geo;
}

// The method argument and cost model of the CPU backend; ghost at one position is the row norm.
inline Plan plan_for(const std::string& method, const Geometry& geo) {
  return make_plan(geo, choose_method(method, geo.positions(), geo.cin_g * geo.K, geo.cout_g) == Method::Ghost);
}

}  // namespace tiles
}  // namespace fisher_ext
