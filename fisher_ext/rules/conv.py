"""Conv1d/2d/3d through ``conv_sqnorm``; ConvTranspose1d/2d/3d too, with input and output gradient
swapped: a transposed convolution's weight gradient is that of the convolution (same stride,
padding, dilation, groups) whose input is the output gradient and whose output gradient is the input."""

from __future__ import annotations

from torch import nn

from ..ops import conv_grad_sqnorm, conv_sqnorm
from .registry import Call, register_rule
from .shared import bias_gradients, bias_norm, require_batch_first


def _zero_padded(module: nn.Module) -> bool:
    """The rule reads zero padding; other padding modes go to the exact fallback."""
    return module.padding_mode == "zeros"


def _conv(module, names: list, call: Call, x, g):
    out = {}
    if "weight" in names:
        out["weight"] = conv_sqnorm(x, g.to(x.dtype), kernel_size=module.kernel_size, stride=module.stride,
                                    padding=module.padding, dilation=module.dilation, groups=module.groups,
                                    bias=False, precision=call.precision)
    return out


def conv_gradients(module: nn.modules.conv._ConvNd, names: list, call: Call):
    """The weight and bias gradients and their norms from one fused pass."""
    require_batch_first(module, call)
    x, g = call.args[0], call.grad
    if "weight" not in names:  # the bias alone (BitFit): no weight gradient to form
        return bias_gradients(g, 1)
    weight, bias, weight_norms, bias_norms = conv_grad_sqnorm(
        x, g.to(x.dtype), kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=module.groups, bias="bias" in names)
    grads, norms = {"weight": weight}, {"weight": weight_norms}
    if "bias" in names:
        grads["bias"], norms["bias"] = bias, bias_norms
    return grads, norms


@register_rule((nn.Conv1d, nn.Conv2d, nn.Conv3d), applies=_zero_padded, differentiable=True,
               gradients=conv_gradients)
def conv_rule(module: nn.modules.conv._ConvNd, names: list, call: Call):
    require_batch_first(module, call)
    x, g = call.args[0], call.grad
    out = _conv(module, names, call, x, g)
    if "bias" in names:
        out["bias"] = bias_norm(g, 1)
    return out


@register_rule((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), applies=_zero_padded,
               differentiable=True)
def conv_transpose_rule(module: nn.modules.conv._ConvTransposeNd, names: list, call: Call):
    require_batch_first(module, call)
    x, g = call.args[0], call.grad  # any output_padding / output_size: the extra rows read no input
    out = _conv(module, names, call, g.to(x.dtype), x)  # swapped: see the module docstring
    if "bias" in names:
        out["bias"] = bias_norm(g, 1)
    return out
