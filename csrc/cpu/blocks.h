// The CPU kernels' shared machinery: examples are processed in blocks (at::parallel_for over
// blocks, one block per task), so the working memory is O(threads x block), never
// O(N x d_in x d_out); within a block the linear rule of docs/design.md (section 2) runs as batched
// GEMMs (ghost: Gram matrices; materialize: per-example weight gradients), squared and reduced
// before the next block, or as the fused register-tiled kernel of gemm_sqnorm.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/shapes.h"
#include "gemm_sqnorm.h"

namespace fisher_ext {

using at::Tensor;

inline constexpr int64_t kBlockBytes = 8 << 20;  // working memory of one block

// How the CPU forms per-example weight gradients (materialize) for inputs of dtype t:
//   Fused     the register-tiled AVX-512 kernel of gemm_sqnorm.h, float32 accumulation;
//   Bf16Gemm  (precision Bf16 only) the inputs packed in bfloat16: batched native bf16 GEMMs
//             (float32 accumulation, each weight-gradient entry rounded to bfloat16 once), squared
//             and summed in float32;
//   Blas      batched BLAS GEMMs in the result dtype.
enum class MaterializePath { Fused, Bf16Gemm, Blas };

// positions: the length of the sums of per-example products (T, or P output positions); columns:
// the weight gradient's input side (d_in, or C_in/groups x kernel). The batched bf16 GEMMs are
// no faster than the fused kernel over fewer than 64 positions or columns (a first convolution
// on RGB: 27 columns), nor on a grouped convolution's small per-group matrices
// (bench/results/precision_cpu.md).
inline MaterializePath materialize_path(at::ScalarType t, Precision precision, int64_t positions, int64_t columns,
                                        int64_t groups = 1) {
  if (precision == Precision::Bf16 && (t == at::kFloat || t == at::kBFloat16) && positions >= 64 && columns >= 64 &&
      groups == 1 && bf16_gemm_available())
    return MaterializePath::Bf16Gemm;
  if (result_dtype(t) == at::kFloat && fused_gemm_sqnorm_available()) return MaterializePath::Fused;
  return MaterializePath::Blas;
}

// Time per flop of the materialize path relative to BLAS Gram matrices in the result dtype, for
// the cost model: the fused kernel ~95 against ~70 GFLOPS on a Zen 4 core; native bf16 GEMMs
// several times float32's (bench/results/precision_cpu.md).
inline double materialize_cost(MaterializePath path) {
  switch (path) {
    case MaterializePath::Fused:
      return 0.75;
    case MaterializePath::Bf16Gemm:
      return 0.5;
    default:
      return 1.0;
  }
}

// Examples per block: within the memory budget, and at least one block per thread.
inline int64_t block_size(int64_t N, int64_t bytes_per_example) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nb = kBlockBytes / std::max<int64_t>(1, bytes_per_example);
  nb = std::min(nb, (N + threads - 1) / threads);
  return std::max<int64_t>(1, nb);
}

// How many examples the fused kernel takes through each panel in turn: as many as keep their
// packed inputs (bytes_per_example each) within a core's L2 cache, at least 1 and at most cnt.
// Each panel's weight-gradient tile then stays in L1 across them, where one example at a time would
// stream the whole weight gradient through the caches per example (megabytes on wide layers).
inline constexpr int64_t kCacheBytes = 512 << 10;
inline int64_t examples_in_cache(int64_t bytes_per_example, int64_t cnt) {
  return std::clamp<int64_t>(kCacheBytes / std::max<int64_t>(1, bytes_per_example), 1, std::max<int64_t>(1, cnt));
}

// Slice `part` of `parts` of [p, p + bytes) into L2, a cache line at a time: spread over a loop
// of `parts` steps it brings the next example in while this one is computed, where the
// kernels' strided reads of an example leave the hardware prefetchers behind.
inline void prefetch_slice(const void* p, int64_t bytes, int64_t part, int64_t parts) {
  const int64_t per = (bytes + parts - 1) / parts, end = std::min(bytes, (part + 1) * per);
  for (int64_t off = part * per; off < end; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, 0, 2);
}

// Scratch tensors of one parallel task, allocated once and reused by all its blocks:
// a fresh multi-megabyte allocation per block costs page faults comparable to the GEMMs.
class Scratch {
 public:
  Tensor get(size_t slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
    const int64_t numel = c10::multiply_integers(sizes);
    Tensor& t = slots_.at(slot);
    if (!t.defined() || t.numel() < numel) t = at::empty({numel}, opts);
    return t.narrow(0, 0, numel).view(sizes);
  }

 private:
  std::array<Tensor, 3> slots_;
};

// Calls f(n0, cnt, scratch) for consecutive blocks of at most nb examples, in parallel.
template <typename F>
void for_each_block(int64_t N, int64_t nb, const F& f) {
  const int64_t blocks = (N + nb - 1) / nb;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // The op's autograd is registered from Python; the ATen calls inside must not record a graph.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Scratch scratch;
    for (int64_t b = b0; b < b1; ++b) f(b * nb, std::min(nb, N - b * nb), scratch);
  });
}

// Per-thread partial sums of a weight gradient's transpose (float32), zeroed on first use by
// each thread and added up at the end.
class Partials {
 public:
  Partials(at::IntArrayRef sizes, const at::TensorOptions& opts)
      : sizes_(sizes.vec()), opts_(opts.dtype(at::kFloat)), slots_(std::max(1, at::get_num_threads())) {}

  float* mine() {
    const size_t slot = static_cast<size_t>(at::get_thread_num());
    TORCH_CHECK(slot < slots_.size(), "fisher_ext: thread ", slot, " outside the ", slots_.size(), " planned");
    if (!slots_[slot].defined()) slots_[slot] = at::zeros(sizes_, opts_);
    return slots_[slot].data_ptr<float>();
  }

  Tensor sum() const {
    Tensor total;
    for (const Tensor& t : slots_)
      if (t.defined()) total = total.defined() ? total.add_(t) : t;
    return total.defined() ? total : at::zeros(sizes_, opts_);
  }

 private:
  std::vector<int64_t> sizes_;
  at::TensorOptions opts_;
  std::vector<Tensor> slots_;
};

inline void write_result(Tensor& out, int64_t n0, const Tensor& s, bool add) {
  auto dst = out.narrow(0, n0, s.size(0));
  if (add)
    dst.add_(s);
  else
    dst.copy_(s);
}

// Per batch entry: ||G X^T||_F^2 (materialize) or <X^T X, G^T G>_F (ghost), as float32 (float64
// for float64; bfloat16 materialize squares and sums in float32). X: (B, rows, L), G: (B, d_out, L); any strides. Uses
// scratch slots 1 and 2.
inline Tensor rule(const Tensor& X, const Tensor& G, Method method, Scratch& scratch) {
  const int64_t B = X.size(0), L = X.size(2);
  if (method == Method::Ghost) {
    Tensor gram = scratch.get(1, {B, L, L}, X.options()), gg = scratch.get(2, {B, L, L}, X.options());
    at::bmm_out(gram, X.transpose(1, 2), X);
    at::bmm_out(gg, G.transpose(1, 2), G);
    return gram.mul_(gg).sum({1, 2});  // ghost runs in the result dtype
  }
  Tensor W = scratch.get(1, {B, G.size(1), X.size(1)}, X.options());
  at::bmm_out(W, G, X.transpose(1, 2));
  if (W.scalar_type() == result_dtype(W.scalar_type())) return W.mul_(W).sum({1, 2});
  // reduced precision: squared and summed in float32, not in the GEMM's output dtype
  return at::linalg_vector_norm(W.view({B, -1}), 2, 1, false, at::kFloat).square_();
}

// The bias term of a block: ||sum over positions of g_n||^2 per example, in float32 (float64 for
// float64). Gb: (B, C, L).
inline Tensor bias_term(const Tensor& Gb) { return Gb.sum(2, false, result_dtype(Gb.scalar_type())).square_().sum(1); }

}  // namespace fisher_ext
