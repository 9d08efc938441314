"""Fake (meta) kernels and autograd of the fisher_ext ops, for every backend.

The backward of each op is the exact vector-Jacobian product of its
pure-PyTorch formula (fisher_ext.reference) taken with torch.func.vjp, so it is
itself differentiable (double backward, gradgradcheck) and identical on every
backend. It materializes what the reference's cheaper method needs
(Gram matrices or per-example weight gradients). The fused weight-gradient ops
(``*_grad_sqnorm``) have no autograd: they serve a backward, they are not differentiated.
"""

from __future__ import annotations

import torch

from . import _loader  # noqa: F401  (the ops must exist before registering)
from . import reference


@torch.library.register_fake("fisher_ext::linear_sqnorm")
def _linear_fake(a, g, bias, method, precision="full"):
    return a.new_empty(a.shape[0], dtype=reference.result_dtype(a.dtype))


@torch.library.register_fake("fisher_ext::conv_sqnorm")
def _conv_fake(x, g, kernel_size, stride, padding, dilation, groups, bias, method, precision="full"):
    return x.new_empty(x.shape[0], dtype=reference.result_dtype(x.dtype))


@torch.library.register_fake("fisher_ext::linear_sqnorm_accumulate_")
def _linear_accumulate_fake(acc, a, g, bias, method, precision="full"):
    return None


@torch.library.register_fake("fisher_ext::conv_sqnorm_accumulate_")
def _conv_accumulate_fake(acc, x, g, kernel_size, stride, padding, dilation, groups, bias, method, precision="full"):
    return None


@torch.library.register_fake("fisher_ext::linear_grad_sqnorm")
def _linear_grad_fake(a, g, bias, method):
    return (g.new_empty(g.shape[-1], a.shape[-1]), *_bias_and_norms_fake(a, g.shape[-1], bias))


@torch.library.register_fake("fisher_ext::conv_grad_sqnorm")
def _conv_grad_fake(x, g, kernel_size, stride, padding, dilation, groups, bias, method):
    return (x.new_empty(g.shape[1], x.shape[1] // groups, *kernel_size), *_bias_and_norms_fake(x, g.shape[1], bias))


def _bias_and_norms_fake(x, channels: int, bias: bool) -> tuple:
    """(bias gradient, the weight's norms, the bias's norms) of a grad op's output."""
    def norms():
        return x.new_empty(x.shape[0], dtype=reference.result_dtype(x.dtype))
    return (x.new_empty(channels), norms(), norms()) if bias else (None, norms(), None)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.args = inputs[2:]


def _vjp_backward(formula):
    def backward(ctx, grad_s):
        first, second = ctx.saved_tensors
        *args, _method, _precision = ctx.args  # the exact gradient, whatever the forward's precision
        _, vjp = torch.func.vjp(lambda t, u: formula(t, u, *args, "auto"), first, second)
        return (*vjp(grad_s), *(None for _ in ctx.args))

    return backward


torch.library.register_autograd(
    "fisher_ext::linear_sqnorm", _vjp_backward(reference.linear_sqnorm), setup_context=_save_inputs
)
torch.library.register_autograd(
    "fisher_ext::conv_sqnorm", _vjp_backward(reference.conv_sqnorm), setup_context=_save_inputs
)
