#!/usr/bin/env bash
# Installs fisher_ext, with what its experiments need (mnist1d, matplotlib), into the current
# Python environment.
# torch==2.14.1 is the CUDA (cu13.0) build of torch; on machines of this project's kind it is
# taken from local disk. The extension's CUDA sources compile against it without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.14.1" pybind11 ninja numpy pytest setuptools wheel
# nvcc may be a wrapper script; setup.py finds the real toolkit (see its docstring).
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install --quiet --no-build-isolation -e ".[experiments]"
python - <<'PY'
import fisher_ext
info = fisher_ext.build_info()
print("fisher_ext installed:", "extension" if info["extension"] else f"pure PyTorch ({info['fallback_reason']})",
      info["compiled"] or "")
PY
