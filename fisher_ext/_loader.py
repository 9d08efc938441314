"""The one module that loads the compiled extension ``fisher_ext._C``.

Loading ``_C`` registers the C++ (and, if compiled, CUDA) kernels under
``torch.ops.fisher_ext``. Every (op, device) pair left without a kernel — all
of them when ``_C`` is missing or ``FISHER_EXT_DISABLE_EXT=1`` — is served by
the pure-PyTorch functions of :mod:`fisher_ext.reference`, so callers see the
same ops either way.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from . import reference
from ._schemas import SCHEMAS

DEVICE_KEYS = ("CPU", "CUDA")


def _load_extension() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("FISHER_EXT_DISABLE_EXT", "0") not in ("", "0"):
        return None, "FISHER_EXT_DISABLE_EXT is set"
    try:
        from . import _C
    except ImportError as err:
        return None, f"fisher_ext._C could not be loaded ({err})"
    return _C, None


def _linear_accumulate(acc, a, g, bias, method, precision="full"):
    acc.add_(reference.linear_sqnorm(a, g, bias, method, precision))


def _conv_accumulate(acc, x, g, kernel_size, stride, padding, dilation, groups, bias, method, precision="full"):
    acc.add_(reference.conv_sqnorm(x, g, kernel_size, stride, padding, dilation, groups, bias, method, precision))


_REFERENCE_KERNELS = {
    "linear_sqnorm": reference.linear_sqnorm,
    "linear_sqnorm_accumulate_": _linear_accumulate,
    "conv_sqnorm": reference.conv_sqnorm,
    "conv_sqnorm_accumulate_": _conv_accumulate,
    "linear_grad_sqnorm": reference.linear_grad_sqnorm,
    "conv_grad_sqnorm": reference.conv_grad_sqnorm,
}

C, FALLBACK_REASON = _load_extension()
if C is None:
    warnings.warn(
        f"fisher_ext: {FALLBACK_REASON}; the ops run on the pure-PyTorch kernels of fisher_ext.reference",
        RuntimeWarning,
        stacklevel=2,
    )
    _def_lib = torch.library.Library("fisher_ext", "DEF")
    for _schema in SCHEMAS.values():
        _def_lib.define(_schema)


def has_compiled_kernel(op: str, key: str) -> bool:
    """Whether ``fisher_ext::op`` has a compiled (C++/CUDA) kernel for dispatch key ``key``."""
    return C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fisher_ext::{op}", key)


_COMPILED = {(op, key): has_compiled_kernel(op, key) for op in SCHEMAS for key in DEVICE_KEYS}
_impl_lib = torch.library.Library("fisher_ext", "IMPL")
for (_op, _key), _compiled in _COMPILED.items():
    if not _compiled:
        _impl_lib.impl(_op, _REFERENCE_KERNELS[_op], _key)


def backend(op: str, key: str) -> str:
    """Which implementation serves ``op`` on dispatch key ``key`` ('CPU' or 'CUDA')."""
    if _COMPILED[(op, key)]:
        return "compiled (fisher_ext._C)"
    return "reference (pure PyTorch)"
