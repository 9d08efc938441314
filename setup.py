"""Builds fisher_ext and its extension fisher_ext._C.

CPU kernels are always compiled (with OpenMP, like torch); CUDA kernels when the
installed torch is a CUDA build and nvcc is found (no GPU needed to build).
Environment overrides:
  FISHER_EXT_FORCE_CPU=1    compile the CPU kernels only, and fail loudly if they do not compile
  FISHER_EXT_FORCE_CUDA=1   compile the CUDA kernels too, and fail loudly if anything does not compile
  TORCH_CUDA_ARCH_LIST      CUDA archs (default "8.0;9.0+PTX")
  CUDA_HOME                 the toolkit folder (default: found from nvcc, tools/cuda_home.py)
Without a FORCE flag, if the extension cannot be compiled, the package still installs and runs on its
pure-PyTorch path (fisher_ext.reference), warning once at import.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tools.cuda_home import find_cuda_home  # noqa: E402

cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = (
    not _flag("FISHER_EXT_FORCE_CPU") and torch.version.cuda is not None and cuda_home is not None
)
if _flag("FISHER_EXT_FORCE_CUDA") and not with_cuda:
    sys.exit(
        "FISHER_EXT_FORCE_CUDA=1 but CUDA sources cannot be compiled: "
        f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
    )

root = os.path.dirname(os.path.abspath(__file__))
sources = [os.path.join("csrc", f) for f in ("ops.cpp", "module.cpp")] + sorted(glob.glob("csrc/cpu/*.cpp"))
openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
cxx_flags = ["-O3", *openmp]  # the C++ standard is chosen by torch's BuildExtension
macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("FISHER_EXT_WITH_CUDA", None), ("FISHER_EXT_CUDA_ARCHS", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"')]
    ext = CUDAExtension(
        "fisher_ext._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=openmp,
    )
else:
    ext = CppExtension("fisher_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)


class OptionalBuildExtension(BuildExtension):
    """Builds _C, but lets the package install without it (pure-PyTorch path) when compiling fails."""

    def build_extension(self, extension):
        try:
            super().build_extension(extension)
        except Exception as err:  # a missing or broken compiler must not block the install
            if _flag("FISHER_EXT_FORCE_CUDA") or _flag("FISHER_EXT_FORCE_CPU"):
                raise  # a build asked for explicitly must fail loudly
            warnings.warn(f"fisher_ext: building {extension.name} failed ({err}); the package will use its "
                          "pure-PyTorch path.")
            self.failed = [*getattr(self, "failed", []), extension]

    def copy_extensions_to_source(self):  # editable installs: copy only what was built
        built = self.extensions
        self.extensions = [e for e in built if e not in getattr(self, "failed", [])]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built


setup(
    name="fisher_ext",
    version="0.1.0",
    description="Per-example gradient norms, Tr(F) and the Fisher Penalty for PyTorch, with C++/CUDA kernels",
    packages=find_packages(include=["fisher_ext", "fisher_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    zip_safe=False,
)
