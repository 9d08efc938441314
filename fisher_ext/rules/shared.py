"""Small helpers the rules share."""

from __future__ import annotations

import torch
from torch import nn

from ..reference import result_dtype
from ..reference import to_accumulation_dtype as acc
from .registry import Call, UnsupportedModuleError


def batch_first(call: Call, *tensors: torch.Tensor) -> tuple:
    """The input and output gradient of a layer that maps leading dims elementwise (Linear,
    LayerNorm, Embedding) with the batch moved to dim 0 (it is where the output's batch is)."""
    d = call.batch_dim
    return tuple(t.movedim(d, 0) if d else t for t in tensors)


def require_batch_first(module: nn.Module, call: Call) -> None:
    """Layers whose input is (N, C, ...) by definition (convolutions, GroupNorm, BatchNorm)."""
    if call.batch_dim != 0:
        raise UnsupportedModuleError(f"{type(module).__name__}: its output holds the examples on dim "
                                     f"{call.batch_dim}, not 0")


def sqnorm_per_example(t: torch.Tensor) -> torch.Tensor:
    """``||t_n||^2`` over every dim but the first, in the accumulation dtype."""
    return acc(t).reshape(t.shape[0], -1).square().sum(1)


def bias_sums(g: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(N, C)``: each example's bias gradient, ``g_n`` summed over its positions, channels on
    ``channel_dim``: one pass over ``g`` in the accumulation dtype, no copy of it."""
    channel_dim %= g.dim()
    dims = [d for d in range(1, g.dim()) if d != channel_dim]
    return g.sum(dims, dtype=result_dtype(g.dtype)) if dims else acc(g)


def bias_gradients(g: torch.Tensor, channel_dim: int) -> tuple[dict, dict]:
    """A rule's ``gradients`` for a layer whose bias alone trains: the batch's bias gradient and its
    per-example norms, from one pass over ``g``."""
    sums = bias_sums(g, channel_dim)
    return {"bias": sums.sum(0).to(g.dtype)}, {"bias": sums.square().sum(1)}


def bias_norm(g: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``||sum over positions of g_n||^2`` per example, channels on ``channel_dim``."""
    return bias_sums(g, channel_dim).square().sum(1)
