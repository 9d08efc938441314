"""nn.Linear: the Linear rule on the input and output gradient (all middle dims are positions)."""

from __future__ import annotations

from torch import nn

from ..ops import linear_grad_sqnorm, linear_sqnorm
from .registry import Call, register_rule
from .shared import batch_first, bias_gradients, bias_norm


def linear_gradients(module: nn.Linear, names: list, call: Call):
    """The weight and bias gradients and their norms from one fused pass."""
    x, g = batch_first(call, call.args[0], call.grad)
    if "weight" not in names:  # the bias alone (BitFit): no weight gradient to form
        return bias_gradients(g, -1)
    weight, bias, weight_norms, bias_norms = linear_grad_sqnorm(x, g.to(x.dtype), bias="bias" in names)
    grads, norms = {"weight": weight}, {"weight": weight_norms}
    if "bias" in names:
        grads["bias"], norms["bias"] = bias, bias_norms
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
