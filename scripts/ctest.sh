#!/usr/bin/env bash
# Configures CMakeLists.txt against the installed libtorch, builds the C++ test binary, runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
prefix=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# A CUDA build of torch makes find_package(Torch) look for the toolkit; point it at the real one.
cuda_home=$(python tools/cuda_home.py)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c "from tools.build_config import CUDA_ARCHS; print(CUDA_ARCHS)")}"  # else it probes for a GPU
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release \
  ${cuda_home:+-DCUDAToolkit_ROOT="$cuda_home" -DCUDA_TOOLKIT_ROOT_DIR="$cuda_home"} > build/cmake.log 2>&1 \
  || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure
