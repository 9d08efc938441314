"""The one description of the extension's build, read by setup.py and by CMakeLists.txt.

Sources: every ``.cpp`` under ``csrc/`` (and ``.cu`` with CUDA) but the C++ tests
(``csrc/test/``) and the Python binding (``csrc/python/``, the Python module only), so an
op's new file needs no build edit. ``python tools/build_config.py --cmake`` prints the same
as CMake ``set()`` lines.
"""

from __future__ import annotations

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CXX_STANDARD = "20"
CXX_FLAGS = ["-O3"]  # OpenMP is added where torch has it
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
CUDA_ARCHS = "8.0;9.0+PTX"  # default of TORCH_CUDA_ARCH_LIST: A100 and H100/H200, PTX for newer
PYTHON_MODULE = "csrc/python/module.cpp"


def version() -> str:
    """The package's version, as written in fisher_ext/__init__.py."""
    with open(os.path.join(ROOT, "fisher_ext", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def op_sources(cuda: bool) -> list[str]:
    """The ops' sources (schemas and kernels), relative to the repository root, sorted."""
    patterns = ["*.cpp", "*.cu"] if cuda else ["*.cpp"]
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join("csrc", "**", pattern), root_dir=ROOT, recursive=True)
    skip = (os.path.join("csrc", "test", ""), os.path.join("csrc", "python", ""))
    return sorted(f for f in found if not f.startswith(skip))


def _cmake() -> str:
    return "\n".join([
        f'set(FISHER_EXT_VERSION "{version()}")',
        f"set(FISHER_EXT_CXX_STANDARD {CXX_STANDARD})",
        f'set(FISHER_EXT_CXX_FLAGS {" ".join(CXX_FLAGS)})',
        f'set(FISHER_EXT_CPU_SOURCES {" ".join(op_sources(cuda=False))})',
    ]) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--cmake"]:
        sys.exit("usage: python tools/build_config.py --cmake")
    sys.stdout.write(_cmake())
