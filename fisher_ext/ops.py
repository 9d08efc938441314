"""Public per-example squared gradient norm ops for Linear and Conv layers.

Both functions take what a module hook sees — the layer's input and the
gradient of the loss with respect to its output — and return, for each example
n, ``||dl_n/dW||^2`` (+ ``||dl_n/db||^2`` with ``bias=True``) without forming
per-example gradients in memory. The gradient passed in is used as is: if the
loss was a mean over N examples, each norm is ``1/N^2`` of the per-example
loss's norm (docs/design.md, section 2: reduction scaling).

Results are float32 (float64 for float64 inputs); float16/bfloat16 inputs are
accumulated in float32 (``precision='bf16'`` allows bfloat16 GEMMs where they are faster:
docs/precision.md). Both ops are differentiable in their two tensor inputs.

:func:`linear_grad_sqnorm` and :func:`conv_grad_sqnorm` return the batch's weight and bias
gradient together with the same norms, for a backward that needs both: on the CPU's fused
path and CUDA's materialize program each per-example tile is added into the weight gradient as
it is squared, so the norms cost little more than the weight gradient itself.
"""

from __future__ import annotations

import math
from typing import Union
from collections.abc import Sequence

import torch

from . import _registration  # noqa: F401  (fake kernels and autograd)
from ._schemas import METHODS, check_precision
from .reference import result_dtype

IntOrTuple = Union[int, Sequence[int]]
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Resolved once: looking an op up through torch.ops costs microseconds per call.
_OPS = torch.ops.fisher_ext
_LINEAR, _LINEAR_ACC = _OPS.linear_sqnorm.default, _OPS.linear_sqnorm_accumulate_.default
_CONV, _CONV_ACC = _OPS.conv_sqnorm.default, _OPS.conv_sqnorm_accumulate_.default
_LINEAR_GRAD, _CONV_GRAD = _OPS.linear_grad_sqnorm.default, _OPS.conv_grad_sqnorm.default
LayerGrads = tuple[torch.Tensor, Union[torch.Tensor, None], torch.Tensor, Union[torch.Tensor, None]]


def linear_sqnorm(
    a: torch.Tensor,
    g: torch.Tensor,
    *,
    bias: bool,
    method: str = "auto",
    accumulate: torch.Tensor | None = None,
    precision: str = "full",
) -> torch.Tensor:
    """Per-example squared gradient norm of an ``nn.Linear`` layer.

    Args:
        a: the layer's input, shape ``(N, *, d_in)``; the middle dims are T positions.
        g: gradient of the loss w.r.t. the layer's output, shape ``(N, *, d_out)``.
        bias: include the bias gradient ``||sum_t g_n,t||^2``.
        method: ``'auto'`` (cost model), ``'ghost'`` (Gram matrices, cheap for short T)
            or ``'materialize'`` (per-example ``A_n^T G_n``, blocked).
        accumulate: optional ``(N,)`` buffer of the result dtype; the norms are added
            into it (per-example totals across layers) and it is returned.
        precision: ``'full'`` (float32 accumulation of the inputs as given) or ``'bf16'``
            (float32 or bfloat16 inputs may be rounded to bfloat16 where the device's bfloat16
            GEMMs are faster; the same arithmetic elsewhere; docs/precision.md).

    Returns:
        ``(N,)`` float32 (float64 for float64 inputs).
    """
    check_precision(precision)
    return _dispatch(_LINEAR, _LINEAR_ACC, (*_linear_args(a, g, bias, method), precision), accumulate, "a")


def conv_sqnorm(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Union[IntOrTuple, str] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    bias: bool,
    method: str = "auto",
    accumulate: torch.Tensor | None = None,
    precision: str = "full",
) -> torch.Tensor:
    """Per-example squared gradient norm of an ``nn.Conv1d/2d/3d`` layer.

    Args:
        x: the layer's input ``(N, C_in, *spatial)``; its rank picks Conv1d, 2d or 3d.
        g: gradient of the loss w.r.t. the layer's output ``(N, C_out, *out_spatial)``.
        kernel_size, stride, padding, dilation, groups: as in ``nn.Conv*d``; padding
            may be an int, a tuple, ``'same'`` or ``'valid'`` (padding_mode 'zeros').
        bias, method, accumulate, precision: as in :func:`linear_sqnorm`.

    Returns:
        ``(N,)`` float32 (float64 for float64 inputs).
    """
    check_precision(precision)
    args = (*_conv_args(x, g, kernel_size, stride, padding, dilation, groups, bias, method), precision)
    return _dispatch(_CONV, _CONV_ACC, args, accumulate, "x")


def linear_grad_sqnorm(a: torch.Tensor, g: torch.Tensor, *, bias: bool, method: str = "auto") -> LayerGrads:
    """An ``nn.Linear`` layer's batch gradients and per-example squared norms from one pass.

    Args: as in :func:`linear_sqnorm`.

    Returns:
        ``(weight_grad, bias_grad, weight_sqnorm, bias_sqnorm)``: ``sum_n G_n^T A_n`` of shape
        ``(d_out, d_in)`` and ``sum_{n,t} g_n,t`` of shape ``(d_out,)``, both in the inputs'
        dtype, and the weight's and the bias's ``(N,)`` per-example squared norms (their sum is
        :func:`linear_sqnorm` with ``bias``); the bias parts are None without ``bias``. Not
        differentiable.
    """
    return _LINEAR_GRAD(*_linear_args(a, g, bias, method))


def conv_grad_sqnorm(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Union[IntOrTuple, str] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    bias: bool,
    method: str = "auto",
) -> LayerGrads:
    """An ``nn.Conv1d/2d/3d`` layer's batch gradients and per-example squared norms from one pass.

    Args: as in :func:`conv_sqnorm`.

    Returns:
        ``(weight_grad, bias_grad, weight_sqnorm, bias_sqnorm)``: the weight gradient ``(C_out,
        C_in / groups, *kernel_size)`` and the bias gradient ``(C_out,)``, both in the inputs'
        dtype, and the weight's and the bias's ``(N,)`` per-example squared norms (their sum is
        :func:`conv_sqnorm` with ``bias``); the bias parts are None without ``bias``. Not
        differentiable.
    """
    return _CONV_GRAD(*_conv_args(x, g, kernel_size, stride, padding, dilation, groups, bias, method))


# ---- helpers ------------------------------------------------------------------


def _linear_args(a, g, bias, method) -> tuple:
    """The checked arguments of the linear ops."""
    _check_pair("a", a, g)
    if a.dim() < 2:
        raise ValueError(f"a: expected shape (N, *, d_in) of rank >= 2, got {tuple(a.shape)}")
    if g.shape[:-1] != a.shape[:-1] or g.dim() != a.dim():
        raise ValueError(
            f"g: expected shape (N, *, d_out) with (N, *) = {tuple(a.shape[:-1])} as in a, got {tuple(g.shape)}"
        )
    _check_method(method)
    return (a, g, bool(bias), method)


def _conv_args(x, g, kernel_size, stride, padding, dilation, groups, bias, method) -> tuple:
    """The checked arguments of the conv ops (padding as the leading pad per dim)."""
    _check_pair("x", x, g)
    nd = x.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"x: expected (N, C_in, *spatial) with 1 to 3 spatial dims, got shape {tuple(x.shape)}")
    ks = _ntuple("kernel_size", kernel_size, nd)
    st = _ntuple("stride", stride, nd)
    dil = _ntuple("dilation", dilation, nd)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    if x.shape[1] % groups:
        raise ValueError(f"x: expected C_in divisible by groups={groups}, got C_in={x.shape[1]}")
    lead_pad, out_size = _conv_padding(padding, x.shape[2:], ks, st, dil)
    if g.dim() != x.dim() or g.shape[0] != x.shape[0] or tuple(g.shape[2:]) != out_size or g.shape[1] % groups:
        raise ValueError(
            f"g: expected shape (N={x.shape[0]}, C_out divisible by groups={groups}, *{out_size}) for x of shape "
            f"{tuple(x.shape)}, kernel_size={ks}, stride={st}, padding={padding!r}, dilation={dil}; "
            f"got {tuple(g.shape)}"
        )
    _check_method(method)
    return (x, g, list(ks), list(st), list(lead_pad), list(dil), groups, bool(bias), method)


def _dispatch(op, accumulate_op, args, accumulate, first_name: str):
    """Calls the functional op, or the fused accumulating op when no gradient is needed; ``first_name``
    names ``args[0]`` in errors."""
    if accumulate is None:
        return op(*args)
    first = args[0]
    expected = result_dtype(first.dtype)
    if (
        not isinstance(accumulate, torch.Tensor)
        or accumulate.shape != (first.shape[0],)
        or accumulate.dtype != expected
        or accumulate.device != first.device
    ):
        got = (
            f"{tuple(accumulate.shape)} {accumulate.dtype} on {accumulate.device}"
            if isinstance(accumulate, torch.Tensor)
            else type(accumulate).__name__
        )
        raise ValueError(f"accumulate: expected a ({first.shape[0]},) {expected} tensor on {first.device}, got {got}")
    for name, t in ((first_name, args[0]), ("g", args[1])):
        if accumulate.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            raise ValueError(f"accumulate: expected a buffer of its own, got one that shares memory with {name}")
    tensors = (accumulate, args[0], args[1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return accumulate.add_(op(*args))
    accumulate_op(accumulate, *args)
    return accumulate


def _check_pair(name: str, t: torch.Tensor, g: torch.Tensor) -> None:
    for arg, value in ((name, t), ("g", g)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _DTYPES:
            raise TypeError(f"{arg}: expected float32, float64, float16 or bfloat16, got {value.dtype}")
    if g.dtype != t.dtype:
        raise TypeError(f"g: expected dtype {t.dtype} like {name}, got {g.dtype}")
    if g.device != t.device:
        raise ValueError(f"g: expected device {t.device} like {name}, got {g.device}")
    if g.dim() >= 1 and t.dim() >= 1 and g.shape[0] != t.shape[0]:
        raise ValueError(f"g: expected batch size N={t.shape[0]} like {name}, got {g.shape[0]}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def _ntuple(name: str, value: IntOrTuple, n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{name}: expected an int >= 1 or {n} of them, got {value!r}")
    return values


def _conv_padding(padding, in_size, ks, st, dil) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Leading pad per dim and the output size, as nn.Conv*d computes them."""
    nd = len(ks)
    if padding == "valid":
        padding = 0
    if padding == "same":
        if any(s != 1 for s in st):
            raise ValueError(f"padding: 'same' needs stride 1, got stride={st}")
        # PyTorch pads (d (k-1)) // 2 in front and the rest behind.
        return tuple(d * (k - 1) // 2 for k, d in zip(ks, dil)), tuple(in_size)
    if isinstance(padding, str):
        raise ValueError(f"padding: expected an int, a tuple, 'same' or 'valid', got {padding!r}")
    pads = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    if len(pads) != nd or not all(isinstance(p, int) and p >= 0 for p in pads):
        raise ValueError(f"padding: expected an int >= 0 or {nd} of them, got {padding!r}")
    out = tuple(
        math.floor((s + 2 * p - d * (k - 1) - 1) / t) + 1 for s, p, d, k, t in zip(in_size, pads, dil, ks, st)
    )
    return pads, out
