// CUDA kernels of the fisher_ext ops: tiled, exact and deterministic.
//
// The block programs live in sqnorm_tiles.h (shared with a CPU emulator that tests them):
// materialize (per-example W = G^T [X 1] in kTile x kTile register tiles, squared and summed on
// chip; implicit im2col for any stride, padding, dilation and groups), ghost (Gram tiles
// (X X^T + 1) .* (G G^T) reduced on chip) and row norm (one position). The method argument and
// the cost model are the CPU backend's (choose_method). Each block writes one partial sum; a
// second kernel adds each example's partials in a fixed order, so s[n] is the same run to run.
// float16 / bfloat16 run on tensor cores (WMMA, float accumulation) on sm_80+, float32 and
// float64 on FFMA in their own precision (no TF32). The only workspace is N x (blocks per
// example) partial sums, never a weight-sized buffer.
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

#include <limits>

namespace fisher_ext {
namespace {

using at::Tensor;
using tiles::Geometry;

// Blocks per SM each kernel must fit (its register cap: 65536 / (256 threads x blocks)). One
// kernel per program, so each gets its own count: the row norm needs 32-40 registers;
// materialize and ghost fit 128 (two blocks) without spilling since positions and columns are
// decoded in 32-bit arithmetic (FastDiv), except in float64, whose accumulators take twice the
// registers (ptxas -v, sm_80 and sm_90).
template <tiles::Program kProgram, typename acc_t>
constexpr int min_blocks() {
  if constexpr (kProgram == tiles::Program::RowNorm) return 4;
  if constexpr (kProgram != tiles::Program::RowNorm && !std::is_same_v<acc_t, double>) return 2;
  return 1;
}

// float16 / bfloat16 on tensor cores where the architecture has them for both (sm_80+), FFMA
// in the accumulation type otherwise.
template <tiles::Program kProgram, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(tiles::kThreads, (min_blocks<kProgram, acc_t>()))
    program_kernel(tiles::Problem<scalar_t> problem, int64_t per_example, acc_t* partial) {
  constexpr tiles::Program program = kProgram;
  const tiles::DeviceBlock b{static_cast<int>(threadIdx.x)};
  const int64_t block = blockIdx.x;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    __shared__ tiles::Shared<tiles::MmaEngine<scalar_t>> sm;
    tiles::run_program(program, b, sm, problem, block, per_example, partial);
  } else
#endif
  {
    __shared__ tiles::Shared<tiles::FmaEngine<acc_t>> sm;
    tiles::run_program(program, b, sm, problem, block, per_example, partial);
  }
}

template <typename acc_t>
__global__ void finish_kernel(const acc_t* partial, int64_t per_example, int64_t N, acc_t* out, int64_t out_stride,
                              bool add) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) tiles::finish_example(n, N, partial, per_example, out, out_stride, add);
}

void launch(Tensor& out, const Tensor& x, const Tensor& g, const Geometry& geo, const tiles::Plan& plan, int64_t N,
            bool add) {
  if (N == 0) return;
  TORCH_CHECK(geo.fits_32bit(), "fisher_ext (CUDA): ", geo.positions(), " output positions or ", geo.columns(),
              " input columns per group exceed the kernels' 32-bit indexing");
  TORCH_CHECK(N * plan.per_example <= std::numeric_limits<int32_t>::max(), "fisher_ext (CUDA): ", N, " examples x ",
              plan.per_example, " tiles each exceed one launch's grid; split the batch");
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
    constexpr int kFinishThreads = 128;
    finish_kernel<acc_t>
        <<<static_cast<unsigned>((N + kFinishThreads - 1) / kFinishThreads), kFinishThreads, 0, stream>>>(
            partial.data_ptr<acc_t>(), plan.per_example, N, out.data_ptr<acc_t>(), out.stride(0), add);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Precision::Bf16 changes nothing here: the tile programs read the inputs as given (bfloat16
// inputs run on tensor cores either way).
void linear_into(Tensor& out, const LinearShape& sh, const Tensor& a, const Tensor& g, bool bias,
                 const std::string& method, bool add, Precision) {
  Tensor A = a.reshape({sh.N, sh.T, sh.d_in});
  Tensor G = g.reshape({sh.N, sh.T, sh.d_out});
  Geometry geo = tiles::linear_geometry(sh, A, G, bias);
  if (!geo.fits_32bit()) {  // strides too wide for the kernels' 32-bit offsets: a dense copy may fit
    A = A.contiguous(), G = G.contiguous();
    geo = tiles::linear_geometry(sh, A, G, bias);
  }
  launch(out, A, G, geo, tiles::plan_for(method, geo), sh.N, add);
}

void conv_into(Tensor& out, const ConvShape& s, const Tensor& x, const Tensor& g, bool bias, const std::string& method,
               bool add, Precision) {
  Geometry geo = tiles::conv_geometry(s, x, g, bias);
  if (!geo.fits_32bit()) {  // strides too wide for the kernels' 32-bit offsets: a dense copy may fit
    const Tensor xc = x.contiguous(), gc = g.contiguous();
    geo = tiles::conv_geometry(s, xc, gc, bias);
    launch(out, xc, gc, geo, tiles::plan_for(method, geo), s.N, add);
    return;
  }
  launch(out, x, g, geo, tiles::plan_for(method, geo), s.N, add);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_ext, CUDA, m) {
  // No fused weight-gradient kernel on CUDA yet: the norms, then ATen's weight gradient.
  LinearEntry<linear_into, unfused_linear_grad<linear_into>>::register_all(m);
  ConvEntry<conv_into, unfused_conv_grad<conv_into>>::register_all(m);
}

}  // namespace fisher_ext
