"""fisher_ext: per-example gradient norms, Tr(F) and the Fisher Penalty for PyTorch.

The ops (``linear_sqnorm``, ``conv_sqnorm``, and ``linear_grad_sqnorm``, ``conv_grad_sqnorm``
which also return the batch's weight and bias gradients) run on compiled C++/CUDA kernels
when ``fisher_ext._C`` is built, and on ``fisher_ext.reference`` otherwise.
"""

from __future__ import annotations

from typing import Any

from . import _loader, likelihoods, reference  # noqa: F401  (public submodules, not re-exported names)
from ._schemas import SCHEMAS
from .monitor import FisherTraceMonitor, FisherTraceResult, fisher_trace
from .ops import conv_grad_sqnorm, conv_sqnorm, linear_grad_sqnorm, linear_sqnorm
from .penalty import FisherPenalty, PenaltyResult
from .rules import UnsupportedModuleError, register_rule

__all__ = ["linear_sqnorm", "conv_sqnorm", "linear_grad_sqnorm", "conv_grad_sqnorm", "fisher_trace",
           "FisherTraceMonitor", "FisherTraceResult", "FisherPenalty",
           "PenaltyResult", "UnsupportedModuleError", "register_rule", "build_info"]
__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What was compiled, and which backend each op uses on each device.

    Returns a dict with ``extension`` (whether ``fisher_ext._C`` is loaded),
    ``fallback_reason``, ``compiled`` (``_C``'s own report: CUDA or not, CUDA
    archs, the torch version it was built against, CPU threading) and
    ``backends`` (``{'CPU'|'CUDA': {op: 'compiled (fisher_ext._C)' | 'reference (pure PyTorch)'}}``).
    """
    return {
        "extension": _loader.C is not None,
        "fallback_reason": _loader.FALLBACK_REASON,
        "compiled": dict(_loader.C.build_info()) if _loader.C is not None else None,
        "backends": {key: {op: _loader.backend(op, key) for op in SCHEMAS} for key in _loader.DEVICE_KEYS},
    }
