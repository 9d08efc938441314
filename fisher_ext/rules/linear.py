"""nn.Linear: the Linear rule on the input and output gradient (all middle dims are positions)."""

from __future__ import annotations

from torch import nn

from ..ops import linear_sqnorm
from .registry import Call, register_rule
from .shared import batch_first, bias_norm


@register_rule(nn.Linear, differentiable=True)
def linear_rule(module: nn.Linear, names: list, call: Call):
    x, g = batch_first(call, call.args[0], call.grad)
    out = {}
    if "weight" in names:
        out["weight"] = linear_sqnorm(x, g.to(x.dtype), bias=False)
    if "bias" in names:
        out["bias"] = bias_norm(g, -1)
    return out
