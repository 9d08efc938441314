"""LayerNorm, GroupNorm and BatchNorm (eval mode, running statistics) in closed form: each is an
elementwise affine ``y = xhat * w + b`` of a normalized input that depends on its own example only.
BatchNorm that normalizes with the batch's statistics couples the examples: refused up front."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import result_dtype
from ..reference import to_accumulation_dtype as acc
from .registry import Call, UnsupportedModuleError, register_rule
from .shared import batch_first, require_batch_first, sqnorm_per_example


def _affine_norms(names: list, xhat: torch.Tensor, g: torch.Tensor, channel_dims: list[int]):
    """Weight and bias of ``y = xhat * w + b`` whose parameters span ``channel_dims``. ``xhat`` is the
    caller's own: it is multiplied by ``g`` in place unless it is being differentiated (one tensor
    of the activation's size fewer to allocate and fault in)."""
    dtype = result_dtype(g.dtype)
    g, xhat = g.to(dtype), xhat.to(dtype)
    sum_dims = [d for d in range(1, g.dim()) if d not in channel_dims]
    out = {}
    if "weight" in names:
        prod = g * xhat if torch.is_grad_enabled() and xhat.requires_grad else xhat.mul_(g)
        out["weight"] = sqnorm_per_example(prod.sum(sum_dims) if sum_dims else prod)
    if "bias" in names:
        out["bias"] = sqnorm_per_example(g.sum(sum_dims) if sum_dims else g)
    return out


@register_rule(nn.LayerNorm, differentiable=True)
def layer_norm_rule(module: nn.LayerNorm, names: list, call: Call):
    x, g = batch_first(call, call.args[0], call.grad)
    xhat = F.layer_norm(acc(x), module.normalized_shape, None, None, module.eps)
    k = len(module.normalized_shape)
    return _affine_norms(names, xhat, g, list(range(g.dim() - k, g.dim())))


@register_rule(nn.GroupNorm, differentiable=True)
def group_norm_rule(module: nn.GroupNorm, names: list, call: Call):
    require_batch_first(module, call)
    xhat = F.group_norm(acc(call.args[0]), module.num_groups, None, None, module.eps)
    return _affine_norms(names, xhat, call.grad, [1])


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm normalizes with the batch's own statistics (train mode, or no running ones)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None)


def check_batch_norm(module: nn.Module) -> None:
    if uses_batch_statistics(module):
        raise UnsupportedModuleError(
            f"{type(module).__name__}: in train mode (or without running statistics) BatchNorm normalizes each "
            "example with the batch's statistics, so the examples are coupled and per-example gradients do not "
            "exist; call model.eval() for the Fisher of the eval-mode model, or use GroupNorm")


@register_rule((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), check=check_batch_norm, differentiable=True)
def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, names: list, call: Call):
    require_batch_first(module, call)
    x = acc(call.args[0])
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x - module.running_mean.to(x.dtype).view(shape)) / torch.sqrt(
        module.running_var.to(x.dtype).view(shape) + module.eps)
    return _affine_norms(names, xhat, call.grad, [1])
