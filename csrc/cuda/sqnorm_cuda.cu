// CUDA kernels of the fisher_ext ops: tiled, exact and deterministic.
//
// The block programs live in sqnorm_tiles.h (shared with a CPU emulator that tests them):
// materialize (per-example W = G^T [X 1] in kTile x kTile register tiles, squared and summed on
// chip; implicit im2col for any stride, padding, dilation and groups), ghost (Gram tiles
// (X X^T + 1) .* (G G^T) reduced on chip) and row norm (one position). The method argument and
// the cost model are the CPU backend's (choose_method). Each block writes one partial sum; a
// second kernel adds each example's partials in a fixed order, so s[n] is the same run to run.
// float16 / bfloat16 run on tensor cores (WMMA, float accumulation) on sm_80+, float32 and
// float64 on FFMA in their own precision (no TF32). The norm ops' only workspace is N x (blocks
// per example) partial sums, never a weight-sized buffer.
// The fused ops run the fused program for the weight's gradient and norms where the materialize
// path is chosen (choose_fused_method): each block takes one tile of W through a chunk of
// examples, so the batch gradient costs one more register tile and one store per block; where W
// has few tiles the batch is cut into chunks to fill the device's waves, each writing its own
// copy of the gradient, added in a fixed order by a third kernel. Where ghost is chosen, the
// ghost norms and then ATen's weight gradient. The bias parts are the entry's reductions of g.
#include "../common/shapes.h"
#include "../conv/entry.h"
#include "../linear/entry.h"
#include "tiles_host.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace fisher_ext {
namespace {

using at::Tensor;
using tiles::Geometry;

// Blocks per SM each kernel must fit (its register cap: 65536 / (256 threads x blocks)). One
// kernel per program, so each gets its own count: the row norm needs 32-40 registers;
// materialize and ghost fit 128 (two blocks) without spilling since positions and columns are
// decoded in 32-bit arithmetic (FastDiv), except in float64, whose accumulators take twice the
// registers (ptxas -v, sm_80 and sm_90). The fused program, materialize's count, holds one more
// register tile: float16 spills 100-150 bytes there (sm_80, sm_90), the others none.
template <tiles::Program kProgram, typename acc_t>
constexpr int min_blocks() {
  if constexpr (kProgram == tiles::Program::RowNorm) return 4;
  if constexpr (kProgram != tiles::Program::RowNorm && !std::is_same_v<acc_t, double>) return 2;
  return 1;
}

// Runs run(block, shared memory of type SharedOf<Engine>) with the engine for the dtype: tensor
// cores for float16 / bfloat16 where the architecture has them for both (sm_80+), FFMA in the
// accumulation type otherwise.
template <typename scalar_t, typename acc_t, template <class> class SharedOf, class Run>
__device__ __forceinline__ void with_engine(Run&& run) {
  const tiles::DeviceBlock b{static_cast<int>(threadIdx.x)};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    __shared__ SharedOf<tiles::MmaEngine<scalar_t>> sm;
    run(b, sm);
  } else
#endif
  {
    __shared__ SharedOf<tiles::FmaEngine<acc_t>> sm;
    run(b, sm);
  }
}

template <tiles::Program kProgram, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(tiles::kThreads, (min_blocks<kProgram, acc_t>()))
    program_kernel(tiles::Problem<scalar_t> problem, int64_t per_example, acc_t* partial) {
  with_engine<scalar_t, acc_t, tiles::Shared>([&](const tiles::DeviceBlock& b, auto& sm) {
    tiles::run_program(kProgram, b, sm, problem, blockIdx.x, per_example, partial);
  });
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(tiles::kThreads, (min_blocks<tiles::Program::Materialize, acc_t>()))
    fused_kernel(tiles::Problem<scalar_t> problem, tiles::FusedPlan plan, acc_t* partial, acc_t* weights) {
  with_engine<scalar_t, acc_t, tiles::FusedShared>([&](const tiles::DeviceBlock& b, auto& sm) {
    tiles::fused_program(b, sm, problem, plan, blockIdx.x, partial, weights);
  });
}

template <typename acc_t>
__global__ void reduce_kernel(const acc_t* weights, int64_t elements, int64_t chunks, acc_t* out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < elements; e += step)
    out[e] = tiles::reduce_chunks(e, weights, elements, chunks);
}

template <typename acc_t>
__global__ void finish_kernel(const acc_t* partial, int64_t per_example, int64_t N, acc_t* out, int64_t out_stride,
                              bool add) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) tiles::finish_example(n, N, partial, per_example, out, out_stride, add);
}

void check_launch(const Geometry& geo, int64_t blocks, int64_t N) {
  TORCH_CHECK(geo.fits_32bit(), "fisher_ext (CUDA): ", geo.positions(), " output positions or ", geo.columns(),
              " input columns per group exceed the kernels' 32-bit indexing");
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fisher_ext (CUDA): ", N, " examples take ", blocks,
              " blocks, more than one launch's grid; split the batch");
}

constexpr int kFinishThreads = 128;

template <typename acc_t>
void finish(const Tensor& partial, int64_t per_example, int64_t N, Tensor& out, bool add, cudaStream_t stream) {
  finish_kernel<acc_t><<<static_cast<unsigned>((N + kFinishThreads - 1) / kFinishThreads), kFinishThreads, 0, stream>>>(
      partial.data_ptr<acc_t>(), per_example, N, out.data_ptr<acc_t>(), out.stride(0), add);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch(Tensor& out, const Tensor& x, const Tensor& g, const Geometry& geo, const tiles::Plan& plan, int64_t N,
            bool add) {
  if (N == 0) return;
  check_launch(geo, N * plan.per_example, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sqnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor partial = at::empty({N * plan.per_example}, out.options());
    const tiles::Problem<scalar_t> problem{x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), geo, N};
    if (plan.per_example > 0) {  // none: no positions (ghost) or no output channels; every total is then 0
      const unsigned blocks = static_cast<unsigned>(N * plan.per_example);
      acc_t* partials = partial.data_ptr<acc_t>();
      switch (plan.program) {
        case tiles::Program::Materialize:
          program_kernel<tiles::Program::Materialize, scalar_t, acc_t>
              <<<blocks, tiles::kThreads, 0, stream>>>(problem, plan.per_example, partials);
          break;
        case tiles::Program::Ghost:
          program_kernel<tiles::Program::Ghost, scalar_t, acc_t>
              <<<blocks, tiles::kThreads, 0, stream>>>(problem, plan.per_example, partials);
          break;
        case tiles::Program::RowNorm:
          program_kernel<tiles::Program::RowNorm, scalar_t, acc_t>
              <<<blocks, tiles::kThreads, 0, stream>>>(problem, plan.per_example, partials);
          break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish<acc_t>(partial, plan.per_example, N, out, add, stream);
  });
}

// The fused program: s[n] into out, and returned the batch's weight gradient then bias gradient
// (Geometry::weight_elements) in the accumulation type. Its chunking follows the device's wave
// (SMs x resident blocks), so the gradient's rounding is the same run to run on one GPU model.
Tensor launch_fused(Tensor& out, const Tensor& x, const Tensor& g, const Geometry& geo, int64_t N) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor weights = at::empty({geo.weight_elements()}, out.options());
  if (tiles::make_plan(geo, /*ghost=*/false).per_example * N == 0) {  // no blocks: all totals and entries are 0
    out.zero_();
    return weights.zero_();
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grad_sqnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int resident = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fused_kernel<scalar_t, acc_t>, tiles::kThreads, 0));
    const tiles::FusedPlan plan = tiles::make_fused_plan(geo, N, int64_t{sms} * std::max(resident, 1));
    check_launch(geo, plan.chunks * plan.per_example, N);
    Tensor partial = at::empty({N * plan.per_example}, out.options());
    // every block writes its whole tile: each chunk's copy is written in full
    Tensor copies = plan.chunks == 1 ? weights : at::empty({plan.chunks * geo.weight_elements()}, out.options());
    const tiles::Problem<scalar_t> problem{x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), geo, N};
    fused_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(plan.chunks * plan.per_example), tiles::kThreads, 0, stream>>>(
            problem, plan, partial.data_ptr<acc_t>(), copies.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish<acc_t>(partial, plan.per_example, N, out, /*add=*/false, stream);
    if (plan.chunks > 1) {
      constexpr int kReduceThreads = 256;
      const int64_t blocks = std::min<int64_t>(tiles::ceil_div(geo.weight_elements(), kReduceThreads), 4 * sms);
      reduce_kernel<acc_t><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
          copies.data_ptr<acc_t>(), geo.weight_elements(), plan.chunks, weights.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return weights;
}

// x and g as the kernels read them, with their geometry: in place, or dense copies where the
// strides are too wide for the kernels' 32-bit offsets (a dense copy may fit).
struct Operands {
  Tensor x, g;
  Geometry geo;
};

Operands linear_operands(const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias) {
  Operands op{a.reshape({sh.N, sh.T, sh.d_in}), g.reshape({sh.N, sh.T, sh.d_out}), {}};
  op.geo = tiles::linear_geometry(sh, op.x, op.g, bias);
  if (!op.geo.fits_32bit()) {
    op.x = op.x.contiguous(), op.g = op.g.contiguous();
    op.geo = tiles::linear_geometry(sh, op.x, op.g, bias);
  }
  return op;
}

Operands conv_operands(const ConvShape& s, const Tensor& x, const Tensor& g, bool bias) {
  Operands op{x, g, tiles::conv_geometry(s, x, g, bias)};
  if (!op.geo.fits_32bit()) {
    op.x = x.contiguous(), op.g = g.contiguous();
    op.geo = tiles::conv_geometry(s, op.x, op.g, bias);
  }
  return op;
}

// Precision::Bf16 changes nothing here: the tile programs read the inputs as given (bfloat16
// inputs run on tensor cores either way).
void linear_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                 const std::string& method, bool add, Precision) {
  const Operands op = linear_operands(sh, a, g, bias);
  launch(out, op.x, op.g, op.geo, tiles::plan_for(method, op.geo), sh.N, add);
}

void conv_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias, const std::string& method,
               bool add, Precision) {
  const Operands op = conv_operands(s, x, g, bias);
  launch(out, op.x, op.g, op.geo, tiles::plan_for(method, op.geo), s.N, add);
}

// The weight's norms and gradient from the fused program; the bias parts are left to the entry
// (ATen's reductions over g), which gives the bias's norms apart from the weight's.
WeightGrads linear_grad_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool,
                             const std::string& method) {
  if (choose_fused_method(method, sh.T, sh.d_in, sh.d_out, 1.0) == Method::Ghost)
    return unfused_linear_grad<linear_into>(out, sh, a, g, "ghost");
  const Operands op = linear_operands(sh, a, g, /*bias=*/false);
  return {launch_fused(out, op.x, op.g, op.geo, sh.N).view({sh.d_out, sh.d_in})};
}

WeightGrads conv_grad_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool,
                           const std::string& method) {
  if (choose_fused_method(method, s.out_vol(), s.cin_g * s.k_vol(), s.cout_g, 1.0) == Method::Ghost)
    return unfused_conv_grad<conv_into>(out, s, x, g, "ghost");
  const Operands op = conv_operands(s, x, g, /*bias=*/false);
  return {launch_fused(out, op.x, op.g, op.geo, s.N).view(conv_weight_shape(s, x.dim() - 2))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_ext, CUDA, m) {
  LinearEntry<linear_into, linear_grad_into>::register_all(m);
  ConvEntry<conv_into, conv_grad_into>::register_all(m);
}

}  // namespace fisher_ext
