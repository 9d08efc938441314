// The CUDA kernels' block programs (csrc/cuda/sqnorm_tiles.h), run on CPU threads and checked
// against naive double loops (naive.h). Each emulated block has tiles::kThreads threads that
// share one tiles::Shared and meet at a std::barrier wherever the GPU code calls
// __syncthreads(), so tile indexing, implicit im2col, the bias column, groups, staging order,
// edge tiles and the reductions are all exercised as the GPU runs them (the sqnorm_cuda.cu
// launch plan included: tiles::plan_for and the geometry builders are the kernel's own).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../cuda/tiles_host.h"
#include "naive.h"

using namespace fisher_ext;
using namespace fisher_ext_test;

namespace {

struct HostBlock {
  int tid;
  std::barrier<>* bar;
  void sync() const { bar->arrive_and_wait(); }
};

// Runs program(block, shared memory, block index) for every block in turn on kThreads threads.
template <class SharedMemory, class Program>
void run_blocks(int64_t blocks, Program&& program) {
  const auto sm = std::make_unique<SharedMemory>();  // up to 22 KB: off the stack
  std::barrier<> bar(tiles::kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < tiles::kThreads; ++t)
    threads.emplace_back([&, t] {
      const HostBlock b{t, &bar};
      for (int64_t block = 0; block < blocks; ++block) program(b, *sm, block);
    });
  for (auto& th : threads) th.join();
}

// s[n] for every example, as sqnorm_cuda.cu's launch() computes it with the given engine.
template <typename scalar_t, class Engine, typename acc_t = typename Engine::acc_t>
at::Tensor emulate(const at::Tensor& x, const at::Tensor& g, const tiles::Geometry& geo, const tiles::Plan& plan) {
  const int64_t N = x.size(0);
  at::Tensor partial = at::full({N * plan.per_example}, std::nan(""), at::CppTypeToScalarType<acc_t>::value);
  at::Tensor out = at::full({N}, 0.5, partial.options());
  const tiles::Problem<scalar_t> problem{x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), geo, N};
  run_blocks<tiles::Shared<Engine>>(N * plan.per_example, [&](const HostBlock& b, auto& sm, int64_t block) {
    tiles::run_program(plan.program, b, sm, problem, block, plan.per_example, partial.data_ptr<acc_t>());
  });
  for (int64_t n = 0; n < N; ++n)  // add=true onto 0.5: the accumulate form
    tiles::finish_example(n, N, partial.data_ptr<acc_t>(), plan.per_example, out.data_ptr<acc_t>(), 1, true);
  return out - 0.5;
}

struct Fused {
  at::Tensor norms, weights;  // s[n]; the weight gradient then the bias gradient, flat
  int64_t chunks;
};

// The fused op as sqnorm_cuda.cu's launch_fused computes it with the given engine, its plan made
// for a device that runs `wave` blocks at once. The workspaces start as NaN: an element no block writes shows.
template <typename scalar_t, class Engine, typename acc_t = typename Engine::acc_t>
Fused emulate_fused(const at::Tensor& x, const at::Tensor& g, const tiles::Geometry& geo, int64_t wave) {
  const int64_t N = x.size(0), elements = geo.weight_elements();
  const tiles::FusedPlan plan = tiles::make_fused_plan(geo, N, wave);
  const auto options = at::TensorOptions().dtype(at::CppTypeToScalarType<acc_t>::value);
  at::Tensor partial = at::full({N * plan.per_example}, std::nan(""), options);
  at::Tensor copies = at::full({plan.chunks * elements}, std::nan(""), options);
  const tiles::Problem<scalar_t> problem{x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), geo, N};
  run_blocks<tiles::FusedShared<Engine>>(
      plan.chunks * plan.per_example, [&](const HostBlock& b, auto& sm, int64_t block) {
        tiles::fused_program(b, sm, problem, plan, block, partial.data_ptr<acc_t>(), copies.data_ptr<acc_t>());
      });
  at::Tensor norms = at::empty({N}, options), weights = at::empty({elements}, options);
  for (int64_t n = 0; n < N; ++n)
    tiles::finish_example(n, N, partial.data_ptr<acc_t>(), plan.per_example, norms.data_ptr<acc_t>(), 1, false);
  for (int64_t e = 0; e < elements; ++e)
    weights.data_ptr<acc_t>()[e] = tiles::reduce_chunks(e, copies.data_ptr<acc_t>(), elements, plan.chunks);
  return {norms, weights, plan.chunks};
}

// run.template operator()<scalar_t, Engine>() with the engine the GPU uses for the dtype (on
// sm_80+), or FFMA for every dtype.
template <class Run>
auto with_engine(at::ScalarType dtype, bool fma, Run&& run) {
  switch (dtype) {
    case at::kDouble:
      return run.template operator()<double, tiles::FmaEngine<double>>();
    case at::kHalf:
      return fma ? run.template operator()<c10::Half, tiles::FmaEngine<float>>()
                 : run.template operator()<c10::Half, tiles::MmaEngine<c10::Half>>();
    case at::kBFloat16:
      return fma ? run.template operator()<c10::BFloat16, tiles::FmaEngine<float>>()
                 : run.template operator()<c10::BFloat16, tiles::MmaEngine<c10::BFloat16>>();
    default:
      return run.template operator()<float, tiles::FmaEngine<float>>();
  }
}

at::Tensor emulate_any(const at::Tensor& x, const at::Tensor& g, const tiles::Geometry& geo, const tiles::Plan& plan,
                       bool fma) {
  return with_engine(x.scalar_type(), fma,
                     [&]<typename scalar_t, class Engine>() { return emulate<scalar_t, Engine>(x, g, geo, plan); });
}

Fused emulate_fused_any(const at::Tensor& x, const at::Tensor& g, const tiles::Geometry& geo, int64_t wave, bool fma) {
  return with_engine(x.scalar_type(), fma, [&]<typename scalar_t, class Engine>() {
    return emulate_fused<scalar_t, Engine>(x, g, geo, wave);
  });
}

// max |got - want| / max |want|: the weight gradient's elements may be near 0 one by one.
double max_err_of_largest(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).abs().max().item<double>() / want.abs().max().item<double>();
}

const char* engine_name(at::ScalarType t, bool fma) {
  return (t == at::kHalf || t == at::kBFloat16) && !fma ? " tensor-core" : " ffma";
}

const char* program_name(tiles::Program p) {
  return p == tiles::Program::Materialize ? "materialize" : p == tiles::Program::Ghost ? "ghost" : "row-norm";
}

double tolerance(at::ScalarType t) { return t == at::kDouble ? 1e-10 : 1e-4; }

struct ConvCase {
  int64_t N, C_in, C_out, H, W, k, stride, pad, dil, groups;
  bool bias, channels_last;
};

// A random input and output gradient of the case's layer.
std::pair<at::Tensor, at::Tensor> conv_inputs(const ConvCase& c, at::ScalarType dtype) {
  const int64_t Ho = (c.H + 2 * c.pad - c.dil * (c.k - 1) - 1) / c.stride + 1;
  const int64_t Wo = (c.W + 2 * c.pad - c.dil * (c.k - 1) - 1) / c.stride + 1;
  at::Tensor x = at::randn({c.N, c.C_in, c.H, c.W}).to(dtype);
  at::Tensor g = at::randn({c.N, c.C_out, Ho, Wo}).to(dtype);
  if (c.channels_last) {
    x = x.contiguous(at::MemoryFormat::ChannelsLast);
    g = g.contiguous(at::MemoryFormat::ChannelsLast);
  }
  return {x, g};
}

void conv_case(const ConvCase& c, at::ScalarType dtype, const char* method, bool fma = false) {
  const auto [x, g] = conv_inputs(c, dtype);
  const auto want = naive_conv2d(x, g, c.k, c.stride, c.pad, c.dil, c.groups, c.bias);
  const ConvShape s = conv_shape(x, g, {c.k, c.k}, {c.stride, c.stride}, {c.pad, c.pad}, {c.dil, c.dil}, c.groups);
  const tiles::Geometry geo = tiles::conv_geometry(s, x, g, c.bias);
  const tiles::Plan plan = tiles::plan_for(method, geo);
  const at::Tensor got = emulate_any(x, g, geo, plan, fma);
  if (c.channels_last)  // a missing barrier would show as a result that moves between runs
    check(at::equal(got, emulate_any(x, g, geo, plan, fma)),
          std::string("conv2d ") + program_name(plan.program) + engine_name(dtype, fma) + " the same run to run");
  check(max_rel_err(got, want) < tolerance(dtype),
        std::string("conv2d ") + program_name(plan.program) + engine_name(dtype, fma) + " C_in=" +
            std::to_string(c.C_in) + " C_out=" + std::to_string(c.C_out) + " out=" + std::to_string(g.size(2)) + "x" +
            std::to_string(g.size(3)) + " stride=" + std::to_string(c.stride) + " dil=" + std::to_string(c.dil) +
            " groups=" + std::to_string(c.groups) + (c.bias ? " bias" : "") +
            (c.channels_last ? " channels_last " : " ") + c10::toString(dtype));
}

void linear_case(int64_t N, int64_t T, int64_t d_in, int64_t d_out, bool bias, bool transposed, at::ScalarType dtype,
                 const char* method, bool fma = false) {
  at::Tensor a = at::randn({N, T, d_in}).to(dtype), g = at::randn({N, T, d_out}).to(dtype);
  if (transposed) {  // non-contiguous: (N, d, T) storage seen as (N, T, d)
    a = at::randn({N, d_in, T}).to(dtype).transpose(1, 2);
    g = at::randn({N, d_out, T}).to(dtype).transpose(1, 2);
  }
  const auto want = naive_linear(a, g, bias);
  const LinearShape sh = linear_shape(a, g);
  const tiles::Geometry geo = tiles::linear_geometry(sh, a, g, bias);
  const tiles::Plan plan = tiles::plan_for(method, geo);
  check(max_rel_err(emulate_any(a, g, geo, plan, fma), want) < tolerance(dtype),
        std::string("linear ") + program_name(plan.program) + engine_name(dtype, fma) + " T=" + std::to_string(T) +
            " d_in=" + std::to_string(d_in) + " d_out=" + std::to_string(d_out) + (bias ? " bias" : "") +
            (transposed ? " transposed " : " ") + c10::toString(dtype));
}

// The fused program against the naive norms and ATen's float64 weight and bias gradients, its
// batch cut into chunks for a device that runs `wave` blocks at once.
void fused_conv_case(const ConvCase& c, at::ScalarType dtype, int64_t wave, bool fma = false) {
  const auto [x, g] = conv_inputs(c, dtype);
  const auto weight = at::empty({c.C_out, c.C_in / c.groups, c.k, c.k}, at::kDouble);
  const auto [unused, weight_grad, bias_grad] = at::convolution_backward(
      g.to(at::kDouble), x.to(at::kDouble), weight, at::IntArrayRef{c.C_out}, {c.stride, c.stride}, {c.pad, c.pad},
      {c.dil, c.dil}, false, {0, 0}, c.groups, {false, true, c.bias});
  const at::Tensor want = c.bias ? at::cat({weight_grad.flatten(), bias_grad}) : weight_grad.flatten();
  const ConvShape s = conv_shape(x, g, {c.k, c.k}, {c.stride, c.stride}, {c.pad, c.pad}, {c.dil, c.dil}, c.groups);
  const tiles::Geometry geo = tiles::conv_geometry(s, x, g, c.bias);
  const Fused got = emulate_fused_any(x, g, geo, wave, fma);
  const std::string what = std::string("conv2d fused") + engine_name(dtype, fma) + " C_in=" + std::to_string(c.C_in) +
                           " C_out=" + std::to_string(c.C_out) + " groups=" + std::to_string(c.groups) +
                           (c.bias ? " bias" : "") + (c.channels_last ? " channels_last " : " ") +
                           c10::toString(dtype) + " chunks=" + std::to_string(got.chunks);
  check(max_rel_err(got.norms, naive_conv2d(x, g, c.k, c.stride, c.pad, c.dil, c.groups, c.bias)) < tolerance(dtype),
        what + ": norms");
  check(max_err_of_largest(got.weights, want) < tolerance(dtype), what + ": weight and bias gradients");
  if (c.channels_last) {  // a missing barrier would show as a result that moves between runs
    const Fused again = emulate_fused_any(x, g, geo, wave, fma);
    check(at::equal(got.norms, again.norms) && at::equal(got.weights, again.weights), what + ": the same run to run");
  }
}

void fused_linear_case(int64_t N, int64_t T, int64_t d_in, int64_t d_out, bool bias, bool transposed,
                       at::ScalarType dtype, int64_t wave) {
  at::Tensor a = at::randn({N, T, d_in}).to(dtype), g = at::randn({N, T, d_out}).to(dtype);
  if (transposed) {  // non-contiguous: (N, d, T) storage seen as (N, T, d)
    a = at::randn({N, d_in, T}).to(dtype).transpose(1, 2);
    g = at::randn({N, d_out, T}).to(dtype).transpose(1, 2);
  }
  const at::Tensor a64 = a.to(at::kDouble), g64 = g.to(at::kDouble);
  const at::Tensor weight_grad = at::einsum("nto,nti->oi", {g64, a64});
  const at::Tensor want = bias ? at::cat({weight_grad.flatten(), g64.sum({0, 1})}) : weight_grad.flatten();
  const LinearShape sh = linear_shape(a, g);
  const Fused got = emulate_fused_any(a, g, tiles::linear_geometry(sh, a, g, bias), wave, false);
  const std::string what = std::string("linear fused") + engine_name(dtype, false) + " T=" + std::to_string(T) +
                           " d_in=" + std::to_string(d_in) + " d_out=" + std::to_string(d_out) + (bias ? " bias" : "") +
                           (transposed ? " transposed " : " ") + c10::toString(dtype) +
                           " chunks=" + std::to_string(got.chunks);
  check(max_rel_err(got.norms, naive_linear(a, g, bias)) < tolerance(dtype), what + ": norms");
  if (d_out > 0)
    check(max_err_of_largest(got.weights, want) < tolerance(dtype), what + ": weight and bias gradients");
  else
    check(got.weights.numel() == 0 && got.chunks == 0, what + ": no output channels, no blocks");
}

// The fused program's chunking: waves x examples per block at its least, the fewest chunks among
// equals, none of them empty.
void fused_plan_cases() {
  const auto plan = [](int64_t d_in, int64_t d_out, int64_t N, int64_t wave) {
    const at::Tensor a = at::empty({1, 1, d_in}), g = at::empty({1, 1, d_out});
    return tiles::make_fused_plan(tiles::linear_geometry(linear_shape(a, g), a, g, false), N, wave);
  };
  const auto is = [](const tiles::FusedPlan& p, int64_t tiles, int64_t chunks, int64_t per_chunk) {
    return p.per_example == tiles && p.chunks == chunks && p.per_chunk == per_chunk;
  };
  check(is(plan(100, 64, 3, 1), 2, 1, 3), "fused plan: a wave of one block: one chunk");
  check(is(plan(100, 64, 3, 4), 2, 2, 2), "fused plan: two chunks of 2 and 1 examples fill a wave of 4");
  check(is(plan(100, 64, 3, 1000), 2, 3, 1), "fused plan: a wide device: one example per chunk");
  // 9 tiles, 64 examples, 264 blocks a wave: 22 chunks of 3 examples fill one wave (64 chunks would too)
  check(is(plan(576, 64, 64, 264), 9, 22, 3), "fused plan: few tiles: the fewest chunks that fill one wave");
  // 265 tiles, a wave of 264: 4 chunks of 16 (5 waves of 16 examples) beat 1 chunk (2 waves of 64)
  check(is(plan(53 * 64, 5 * 64, 64, 264), 265, 4, 16), "fused plan: a last wave nearly empty counts in full");
  check(plan(100, 0, 3, 4).chunks == 0 && plan(100, 64, 0, 4).chunks == 0, "fused plan: no tiles or no examples");
}

// FastDiv against the division operator: every divisor up to 4096 and around each power of two,
// numerators at the edges (0, d - 1, d, the largest below 2^31) and spread over the range.
void fast_div_cases() {
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int k = 12; k < 31; ++k)
    for (int64_t d : {(int64_t{1} << k) - 1, int64_t{1} << k, (int64_t{1} << k) + 1}) divisors.push_back(d);
  int wrong = 0;
  for (int64_t d : divisors) {
    const tiles::FastDiv f = tiles::FastDiv::of(d);
    uint32_t ns[] = {0u, 1u, uint32_t(d - 1), uint32_t(d), uint32_t(d + 1), 2147483647u, 2147483646u};
    std::vector<uint32_t> all(std::begin(ns), std::end(ns));
    for (uint32_t n = 12345; n < 2147483647u - 99991u * 977u; n += 99991u * 977u) all.push_back(n);
    for (uint32_t n : all) {
      if (n > 2147483647u) continue;
      const uint32_t q = f.div(n);
      if (q != n / uint32_t(d) || f.mod(n, q) != n % uint32_t(d)) ++wrong;
    }
  }
  check(wrong == 0, "FastDiv: " + std::to_string(wrong) + " wrong quotients");
}

// The host's guard of the programs' 32-bit indexing: a real layer passes; an offset within one
// example (a huge stride) or an index (positions) at 2^31 does not.
void fits_32bit_cases() {
  const at::Tensor x = at::randn({2, 4, 9, 7}), g = at::randn({2, 6, 9, 7});
  const ConvShape s = conv_shape(x, g, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1);
  const tiles::Geometry geo = tiles::conv_geometry(s, x, g, true);
  tiles::Geometry strided = geo, wide = geo, padded = geo, dilated = geo;
  strided.xs[3] = int64_t{1} << 29;  // a row stride of 2^29, 9 rows: past 2^31
  wide.out[2] = int64_t{1} << 31;
  padded.pad[1] = int64_t{1} << 31;         // the reach of a window past the input
  dilated.dil[2] = (int64_t{1} << 30) + 1;  // (k - 1) * dilation
  check(
      geo.fits_32bit() && !strided.fits_32bit() && !wide.fits_32bit() && !padded.fits_32bit() && !dilated.fits_32bit(),
      "Geometry::fits_32bit");
}

}  // namespace

int main() {
  at::manual_seed(0);
  fast_div_cases();
  fused_plan_cases();
  fits_32bit_cases();
  const ConvCase convs[] = {
      {3, 6, 4, 9, 7, 3, 2, 1, 1, 2, true, false},     // stride, groups, odd sizes
      {2, 8, 70, 10, 10, 3, 1, 2, 2, 1, true, false},  // dilation; 2 row tiles, 73 columns: 2 column tiles
      {2, 8, 6, 12, 9, 3, 1, 1, 1, 1, false, true},    // channels_last, no bias, 108 positions: 2 ghost tiles
      {2, 4, 6, 3, 3, 3, 1, 0, 1, 2, true, false},     // one output position: the row norm under ghost
      {3, 6, 4, 9, 7, 3, 2, 1, 2, 2, true, true},      // channels_last with groups, stride, dilation, bias:
                                                       // columns channel-fastest
  };
  for (const auto& c : convs)
    for (const char* method : {"materialize", "ghost"})
      for (auto dtype : {at::kFloat, at::kDouble}) conv_case(c, dtype, method);
  for (auto dtype : {at::kHalf, at::kBFloat16})
    for (const auto& c : convs)
      for (const char* method : {"materialize", "ghost"}) conv_case(c, dtype, method);
  conv_case(convs[1], at::kHalf, "materialize", /*fma=*/true);  // float16 / bfloat16 before sm_80
  conv_case(convs[2], at::kBFloat16, "ghost", /*fma=*/true);

  for (const char* method : {"materialize", "ghost", "auto"}) {
    linear_case(3, 1, 67, 9, true, false, at::kFloat, method);  // T = 1: row norm (ghost, auto)
    linear_case(2, 70, 13, 66, false, false, at::kFloat, method);
    linear_case(2, 5, 40, 3, true, true, at::kDouble, method);
    linear_case(2, 5, 7, 0, true, false, at::kFloat, method);  // no output channels: zeros, no division by 0
  }
  conv_case({2, 4, 0, 5, 5, 3, 1, 1, 1, 1, true, false}, at::kFloat, "materialize");
  conv_case({2, 4, 0, 5, 5, 3, 1, 1, 1, 1, true, false}, at::kFloat, "ghost");
  for (const char* method : {"materialize", "ghost"}) {
    linear_case(2, 70, 13, 66, true, false, at::kHalf, method);
    linear_case(2, 5, 40, 3, true, true, at::kBFloat16, method);
  }
  // The fused program: one chunk, chunks of several examples (the last one short), one example each.
  for (int64_t wave : {1, 4, 1000}) {
    for (const auto& c : convs)
      for (auto dtype : {at::kFloat, at::kDouble}) fused_conv_case(c, dtype, wave);
    fused_linear_case(3, 70, 13, 66, true, false, at::kFloat, wave);
    fused_linear_case(3, 5, 40, 3, false, true, at::kDouble, wave);
  }
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    fused_conv_case(convs[1], dtype, 4);
    fused_conv_case(convs[4], dtype, 1000);
    fused_linear_case(3, 70, 13, 66, true, false, dtype, 4);
  }
  fused_conv_case(convs[1], at::kHalf, 4, /*fma=*/true);
  fused_linear_case(2, 5, 7, 0, true, false, at::kFloat, 4);  // no output channels
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
