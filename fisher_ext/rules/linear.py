"""nn.Linear: the Linear rule on the input and output gradient (all middle dims are positions)."""

from __future__ import annotations

from torch import nn

from ..ops import linear_grad_sqnorm, linear_sqnorm
from .registry import Call, register_rule
from .shared import batch_first, bias_norm, bias_sums


def linear_gradients(module: nn.Linear, names: list, call: Call):
    """The weight gradient and its norms from one fused pass; the bias's from the output gradient."""
    x, g = batch_first(call, call.args[0], call.grad)
    grads, norms = {}, {}
    if "weight" in names:
        grads["weight"], _, norms["weight"] = linear_grad_sqnorm(x, g.to(x.dtype), bias=False)
    if "bias" in names:  # each example's bias gradient, squared for its norm and summed for the batch's
        sums = bias_sums(g, -1)
        grads["bias"] = sums.sum(0).to(g.dtype)
        norms["bias"] = sums.square().sum(1)
    return grads, norms


@register_rule(nn.Linear, differentiable=True, gradients=linear_gradients)
def linear_rule(module: nn.Linear, names: list, call: Call):
    x, g = batch_first(call, call.args[0], call.grad)
    out = {}
    if "weight" in names:
        out["weight"] = linear_sqnorm(x, g.to(x.dtype), bias=False, precision=call.precision)
    if "bias" in names:
        out["bias"] = bias_norm(g, -1)
    return out
