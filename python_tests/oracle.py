"""Independent float64 oracles: per-example gradients materialized explicitly.

Nothing here calls fisher_ext: the norms come from autograd on the real
nn.Linear / nn.Conv*d, through torch.func (vmap of grad) or a plain loop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


def _double_module(module: nn.Module) -> nn.Module:
    return module.to(torch.float64)


def per_example_sqnorm(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """||d(<module(x_n), gy_n>)/dtheta||^2 per example n, in float64, via torch.func.vmap(grad)."""
    return sum(per_parameter_sqnorms(module, x, gy).values())


def per_parameter_sqnorms(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{parameter name: ||d(<module(x_n), gy_n>)/d parameter||^2 per example n}``, in float64."""
    module = _double_module(module)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p, xn, gn):
        return (functional_call(module, p, (xn.unsqueeze(0),)) * gn.unsqueeze(0)).sum()

    grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x.double(), gy.double())
    return {k: g.flatten(1).square().sum(1) for k, g in grads.items()}


def per_example_sqnorm_loop(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The same quantity by a loop over examples with ordinary autograd."""
    module = _double_module(module)
    out = []
    for xn, gn in zip(x.double(), gy.double()):
        module.zero_grad()
        (module(xn.unsqueeze(0)) * gn.unsqueeze(0)).sum().backward()
        out.append(sum(p.grad.square().sum() for p in module.parameters()))
    return torch.stack(out)


def penalty_gradients(model: nn.Module, x: torch.Tensor, penalty_labels: torch.Tensor, alpha: float,
                      train_labels: torch.Tensor | None = None):
    """The exact parts of a Fisher Penalty step, by autograd on a copy of the model (in the model's
    own dtype): ``alpha ||gbar||^2`` (gbar: the gradient of the mean cross-entropy at
    ``penalty_labels``), its gradient, and the gradient of the mean cross-entropy at ``train_labels``.
    Returns (value, penalty gradient, training gradient or None) with one tensor per parameter."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    gbar = torch.autograd.grad(F.cross_entropy(out, penalty_labels), params, create_graph=True)
    value = alpha * sum(g.square().sum() for g in gbar)
    penalty = torch.autograd.grad(value, params, retain_graph=True)
    train = torch.autograd.grad(F.cross_entropy(out, train_labels), params) if train_labels is not None else None
    return value.item(), [g.detach() for g in penalty], train


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])
