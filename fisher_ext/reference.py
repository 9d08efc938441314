"""Pure-PyTorch per-example squared gradient norms.

These functions are the fallback that serves ``torch.ops.fisher_ext.*`` when
the C++ extension is not built, the backward of every op (its exact
vector-Jacobian product, through autograd), and the plain-PyTorch baseline of
the benchmarks. They take the op's arguments exactly (``padding`` = leading
pad per spatial dim, output size from ``g``); argument checking lives in
``fisher_ext.ops``.

Math (docs/design.md, section 2): with activations ``A_n`` (T x d_in) and output gradients
``G_n`` (T x d_out), ``||dl_n/dW||^2 = ||A_n^T G_n||_F^2`` (materialize)
``= <A_n A_n^T, G_n G_n^T>_F`` (ghost), plus ``||sum_t G_n,t||^2`` for a bias.
A convolution is the same rule on its im2col matrix, one rule per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._schemas import METHODS, check_precision


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and result dtype for an input dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_accumulation_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: float32, or float64 for float64."""
    return t.to(result_dtype(t.dtype))


def choose_method(method: str, T: int, d_in: int, d_out: int) -> str:
    """Resolve ``'auto'`` by flop count: ghost costs ~2T^2(d_in+d_out), materialize ~2T d_in d_out."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "ghost" if T * (d_in + d_out) <= d_in * d_out else "materialize"


def _rule(A: torch.Tensor, G: torch.Tensor, method: str) -> torch.Tensor:
    """Squared Frobenius norm of ``A^T G`` over the last two dims: A (..., T, d_in), G (..., T, d_out)."""
    method = choose_method(method, A.shape[-2], A.shape[-1], G.shape[-1])
    if method == "ghost":
        return (A @ A.mT * (G @ G.mT)).sum((-1, -2))
    return (G.mT @ A).square().sum((-1, -2))


def linear_sqnorm(a: torch.Tensor, g: torch.Tensor, bias: bool, method: str, precision: str = "full") -> torch.Tensor:
    """Per-example ``||dl_n/dW||^2 (+ ||dl_n/db||^2)`` of a Linear layer; a (N, *, d_in), g (N, *, d_out).
    ``precision`` is checked, and the result is the full-precision one either way."""
    check_precision(precision)
    acc = result_dtype(a.dtype)
    N, T = a.shape[0], math.prod(a.shape[1:-1])
    A = a.to(acc).reshape(N, T, a.shape[-1])
    G = g.to(acc).reshape(N, T, g.shape[-1])
    s = _rule(A, G, method)
    if bias:
        s = s + G.sum(1).square().sum(1)
    return s


def im2col_view(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *out_size, *kernel_size): each output position's receptive field.

    ``padding`` is the leading pad; the trailing side is padded (or cropped) to
    exactly what ``out_size`` reads.
    """
    nd = len(kernel_size)
    pads: list[int] = []
    for i in reversed(range(nd)):  # F.pad lists the last dim first
        span = (out_size[i] - 1) * stride[i] + (kernel_size[i] - 1) * dilation[i] + 1
        pads += [padding[i], span - padding[i] - x.shape[2 + i]]
    xp = F.pad(x, pads)
    for i in range(nd):
        xp = xp.unfold(2 + i, (kernel_size[i] - 1) * dilation[i] + 1, stride[i])
    return xp[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]


def _conv_matrices(x, g, kernel_size, stride, padding, dilation, groups):
    """A convolution as per-group Linear layers: A (N, groups, P, C_in/groups * K) of im2col rows
    and G (N, groups, P, C_out/groups), in the accumulation dtype."""
    acc = result_dtype(x.dtype)
    N, C_in, C_out = x.shape[0], x.shape[1], g.shape[1]
    out_size = g.shape[2:]
    P, K = math.prod(out_size), math.prod(kernel_size)
    cols = im2col_view(x.to(acc), kernel_size, stride, padding, dilation, out_size)
    A = (
        cols.reshape(N, groups, C_in // groups, P, K)
        .transpose(2, 3)
        .reshape(N, groups, P, (C_in // groups) * K)
    )
    G = g.to(acc).reshape(N, groups, C_out // groups, P).transpose(2, 3)
    return A, G


def conv_sqnorm(
    x: torch.Tensor,
    g: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias: bool,
    method: str,
    precision: str = "full",
) -> torch.Tensor:
    """Per-example squared weight (+ bias) gradient norm of a Conv{1,2,3}d layer (``precision`` as in
    :func:`linear_sqnorm`)."""
    check_precision(precision)
    A, G = _conv_matrices(x, g, kernel_size, stride, padding, dilation, groups)
    s = _rule(A, G, method).sum(1)
    if bias:
        s = s + G.sum(2).square().sum((1, 2))
    return s


def linear_grad_sqnorm(a: torch.Tensor, g: torch.Tensor, bias: bool, method: str):
    """The batch's weight gradient ``(d_out, d_in)`` and bias gradient, both in the inputs' dtype,
    and the weight's and the bias's per-example squared norms (the bias parts None without bias)."""
    norms = linear_sqnorm(a, g, False, method)
    acc = result_dtype(a.dtype)
    A, G = to_accumulation_dtype(a).reshape(-1, a.shape[-1]), g.to(acc).reshape(-1, g.shape[-1])
    weight = (G.T @ A).to(a.dtype)
    if not bias:
        return weight, None, norms, None
    sums = G.reshape(a.shape[0], math.prod(a.shape[1:-1]), G.shape[-1]).sum(1)  # each example's bias gradient
    return weight, G.sum(0).to(g.dtype), norms, sums.square().sum(1)


def conv_grad_sqnorm(x, g, kernel_size, stride, padding, dilation, groups, bias, method):
    """The batch's weight gradient ``(C_out, C_in / groups, *kernel_size)`` and bias gradient, both
    in the inputs' dtype, and the weight's and the bias's per-example squared norms (the bias parts
    None without bias)."""
    norms = conv_sqnorm(x, g, kernel_size, stride, padding, dilation, groups, False, method)
    A, G = _conv_matrices(x, g, kernel_size, stride, padding, dilation, groups)
    weight = torch.einsum("ngpo,ngpr->gor", G, A).reshape(g.shape[1], x.shape[1] // groups, *kernel_size).to(x.dtype)
    if not bias:
        return weight, None, norms, None
    sums = G.sum(2).reshape(x.shape[0], g.shape[1])  # each example's bias gradient
    return weight, sums.sum(0).to(g.dtype), norms, sums.square().sum(1)
