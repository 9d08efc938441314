// The Python module fisher_ext._C: loading it registers the ops (schemas.cpp and the
// per-device kernels); build_info() says what this binary was compiled with.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "../cpu/gemm_sqnorm.h"

#ifndef FISHER_EXT_CUDA_ARCHS
#define FISHER_EXT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = TORCH_VERSION;
#ifdef FISHER_EXT_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = FISHER_EXT_CUDA_ARCHS;
    info["openmp"] = static_cast<bool>(AT_PARALLEL_OPENMP);
    // The fused AVX-512 GEMM-square-sum kernel of the CPU materialize path (else: BLAS GEMMs).
    info["cpu_fused_kernel"] = fisher_ext::fused_gemm_sqnorm_available();
    // Native bfloat16 GEMMs (AVX512-BF16 / AMX-BF16) for bfloat16 materialize (precision='bf16').
    info["cpu_bf16_gemm"] = fisher_ext::bf16_gemm_available();
    return info;
  });
}
