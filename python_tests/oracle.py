"""Independent float64 oracles: per-example gradients materialized explicitly.

Nothing here calls fisher_ext: the norms come from autograd on the real
nn.Linear / nn.Conv*d, through torch.func (vmap of grad) or a plain loop.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def _double_module(module: nn.Module) -> nn.Module:
    return module.to(torch.float64)


def per_example_sqnorm(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """||d(<module(x_n), gy_n>)/dtheta||^2 per example n, in float64, via torch.func.vmap(grad)."""
    module = _double_module(module)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p, xn, gn):
        return (functional_call(module, p, (xn.unsqueeze(0),)) * gn.unsqueeze(0)).sum()

    grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x.double(), gy.double())
    return sum(g.flatten(1).square().sum(1) for g in grads.values())


def per_example_sqnorm_loop(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The same quantity by a loop over examples with ordinary autograd."""
    module = _double_module(module)
    out = []
    for xn, gn in zip(x.double(), gy.double()):
        module.zero_grad()
        (module(xn.unsqueeze(0)) * gn.unsqueeze(0)).sum().backward()
        out.append(sum(p.grad.square().sum() for p in module.parameters()))
    return torch.stack(out)
