"""Conv1d/2d/3d through ``conv_sqnorm``; ConvTranspose1d/2d/3d too, with input and output gradient
swapped: a transposed convolution's weight gradient is that of the convolution (same stride,
padding, dilation, groups) whose input is the output gradient and whose output gradient is the input."""

from __future__ import annotations

from torch import nn

from ..ops import conv_sqnorm
from .registry import Call, UnsupportedModuleError, register_rule
from .shared import bias_norm


def _check_padding_mode(module: nn.Module) -> None:
    if module.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"{type(module).__name__}(padding_mode={module.padding_mode!r}): the conv rule reads zero padding; "
            "use padding_mode='zeros' (or pad explicitly before the layer)")


def _conv(module, names: list, x, g):
    out = {}
    if "weight" in names:
        out["weight"] = conv_sqnorm(x, g.to(x.dtype), kernel_size=module.kernel_size, stride=module.stride,
                                    padding=module.padding, dilation=module.dilation, groups=module.groups,
                                    bias=False)
    return out


@register_rule((nn.Conv1d, nn.Conv2d, nn.Conv3d), check=_check_padding_mode, differentiable=True)
def conv_rule(module: nn.modules.conv._ConvNd, names: list, call: Call):
    x, g = call.args[0], call.grad
    out = _conv(module, names, x, g)
    if "bias" in names:
        out["bias"] = bias_norm(g, 1)
    return out


def _check_transpose(module: nn.Module) -> None:
    _check_padding_mode(module)
    if any(p >= s for p, s in zip(module.output_padding, module.stride)) or isinstance(module.padding, str):
        raise UnsupportedModuleError(f"{type(module).__name__}: output_padding must be below the stride")


@register_rule((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), check=_check_transpose,
               differentiable=True)
def conv_transpose_rule(module: nn.modules.conv._ConvTransposeNd, names: list, call: Call):
    if len(call.args) > 1 or call.kwargs:
        raise UnsupportedModuleError(f"{type(module).__name__}: called with output_size; the rule needs the "
                                     "output size implied by its output_padding")
    x, g = call.args[0], call.grad
    out = _conv(module, names, g.to(x.dtype), x)  # swapped: see the module docstring
    if "bias" in names:
        out["bias"] = bias_norm(g, 1)
    return out
