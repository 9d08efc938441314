"""Small helpers the rules share."""

from __future__ import annotations

import torch

from ..reference import to_accumulation_dtype as acc


def sqnorm_per_example(t: torch.Tensor) -> torch.Tensor:
    """``||t_n||^2`` over every dim but the first, in the accumulation dtype."""
    return acc(t).reshape(t.shape[0], -1).square().sum(1)


def bias_norm(g: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``||sum over positions of g_n||^2`` per example, channels on ``channel_dim``."""
    g = acc(g).movedim(channel_dim, -1)
    return g.reshape(g.shape[0], -1, g.shape[-1]).sum(1).square().sum(1)
