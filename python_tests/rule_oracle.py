"""Shared by the per-rule tests: run one rule on a module's call and compare with a float64
per-example oracle (one ordinary backward of <module(x_n), G_n> per example, nothing from
fisher_ext)."""

from __future__ import annotations

import torch
from torch import nn

from fisher_ext.capture import leaves
from fisher_ext.rules import rule_for
from fisher_ext.rules.registry import Call


def output_grads(module: nn.Module, args: tuple, kwargs: dict, batch_dims: list, seed: int = 0):
    """The module's output leaves and random output gradients for them (None for non-tensors)."""
    g = torch.Generator().manual_seed(seed)
    outs = leaves(module(*args, **kwargs))
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) if isinstance(o, torch.Tensor) else None for o in outs]
    return outs, grads


def run_rule(module: nn.Module, args: tuple, grads: list, batch_dims: list, kwargs: dict | None = None,
             names: list | None = None) -> dict:
    kwargs = kwargs or {}
    names = names or [k for k, p in module.named_parameters(recurse=False) if p.requires_grad]
    outs = leaves(module(*args, **kwargs))
    n = grads[0].shape[batch_dims[0]]
    call = Call(args, kwargs, [o if isinstance(o, torch.Tensor) else None for o in outs], grads, n, batch_dims)
    return rule_for(module).fn(module, names, call)


def oracle(module: nn.Module, args: tuple, grads: list, batch_dims: list, arg_dims: list,
           kwargs: dict | None = None, kwarg_dims: dict | None = None) -> dict:
    """{name: (N,) ||d <module(x_n), G_n> / d p||^2}: example n alone through the module (the
    arguments in ``arg_dims`` / ``kwarg_dims`` sliced along those dims, the others whole)."""
    kwargs, kwarg_dims = kwargs or {}, kwarg_dims or {}
    n = grads[0].shape[batch_dims[0]]
    params = dict(module.named_parameters())
    out = {k: torch.zeros(n, dtype=torch.float64) for k in params}
    for i in range(n):
        a = tuple(x.narrow(d, i, 1) if d is not None else x for x, d in zip(args, arg_dims))
        kw = {k: v.narrow(kwarg_dims[k], i, 1) if k in kwarg_dims else v for k, v in kwargs.items()}
        outs = leaves(module(*a, **kw))
        total = sum((o * g.narrow(d, i, 1)).sum() for o, g, d in zip(outs, grads, batch_dims) if g is not None)
        gs = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        for k, gr in zip(params, gs):
            if gr is not None:
                out[k][i] = gr.double().square().sum()
    return out


def assert_rule_matches(module, args, batch_dims, arg_dims, kwargs=None, rtol=1e-10, kwarg_dims=None):
    module = module.double()
    _, grads = output_grads(module, args, kwargs or {}, batch_dims)
    got = run_rule(module, args, grads, batch_dims, kwargs)
    want = oracle(module, args, grads, batch_dims, arg_dims, kwargs, kwarg_dims)
    assert set(got) == {k for k, p in module.named_parameters(recurse=False) if p.requires_grad}
    for k, v in got.items():
        torch.testing.assert_close(v.double(), want[k], rtol=rtol, atol=1e-12, msg=k)
