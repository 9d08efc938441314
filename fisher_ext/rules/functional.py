"""The fallback for modules without a closed-form rule: exact per-example gradients of the named
parameters, by re-running the module once on the whole captured batch and backpropagating, for
each example ``n``, the captured output gradient restricted to example ``n`` (all of them at once:
``autograd.grad(..., is_grads_batched=True)``, in chunks that bound the memory).

Only the outputs' batch dimensions must be known (the capture finds them); the inputs are passed
as they came, so masks shared by the batch, any input layout and keyword arguments need no
guessing. The module must be deterministic (no dropout in train mode: refused up front) and
must not mix examples (BatchNorm in train mode is refused for the whole model)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import Call, UnsupportedModuleError
from .shared import sqnorm_per_example

CHUNK_BYTES = 64 * 2 ** 20  # the cotangents of one chunk of examples


def check_replayable(module: nn.Module) -> None:
    """A rule that re-runs a module needs it to give the same output again."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise UnsupportedModuleError(
                f"{type(module).__name__}: its parameters are computed by re-running it, which cannot replay the "
                f"dropout masks of {name or 'itself'} in train mode; evaluate in eval mode (model.eval())")
        if isinstance(sub, nn.MultiheadAttention) and sub.training and sub.dropout > 0:
            raise UnsupportedModuleError(f"MultiheadAttention {name or ''}(dropout > 0) in train mode: its attention "
                                         "dropout cannot be replayed; evaluate in eval mode")
        if isinstance(sub, nn.RNNBase) and sub.training and sub.dropout > 0 and sub.num_layers > 1:
            raise UnsupportedModuleError(f"{type(sub).__name__}(dropout > 0) in train mode: the dropout between "
                                         "its layers cannot be replayed; evaluate in eval mode")


def _batched_grads(outputs: list, params: list, cotangents: list) -> tuple:
    """The gradients of ``outputs`` for each row of the batched ``cotangents`` (one vmapped backward),
    or, where an op of the graph has no batching rule (cuDNN's RNN backward, custom autograd
    Functions without vmap support), one backward per row."""
    try:
        return torch.autograd.grad(outputs, params, cotangents, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    except RuntimeError as e:
        if "atching rule" not in str(e) and "vmap" not in str(e):
            raise
    rows = [torch.autograd.grad(outputs, params, [c[j] for c in cotangents], retain_graph=True, allow_unused=True)
            for j in range(cotangents[0].shape[0])]
    return tuple(None if col[0] is None else torch.stack(col) for col in zip(*rows))


def per_example_grads(module: nn.Module, names: list, call: Call) -> dict[str, torch.Tensor]:
    """``{name: (N,) ||dl_n/d param||^2}`` for the parameters ``names`` of ``module`` (its own or its
    descendants'), from the captured call."""
    from ..capture import leaves  # the capture's own flattening of nested outputs

    params = [module.get_parameter(k) for k in names]
    n = call.n
    out = call.rerun(module)
    pairs = []
    for o, g, d, recorded in zip(leaves(out), call.grads, call.batch_dims, call.outputs):
        if g is None:
            continue
        same = isinstance(o, torch.Tensor) and o.requires_grad and o.shape == g.shape
        if same and recorded is not None:  # recorded: the module's own output, or None if changed in place since
            try:
                torch.testing.assert_close(o.detach(), recorded.detach(), equal_nan=True)
            except AssertionError:
                same = False
        if not same:
            raise UnsupportedModuleError(
                f"{type(module).__name__}: re-running it on the captured inputs gives another output than the "
                "captured call (randomness or state the re-run cannot replay?); its per-example gradients are "
                "computed by re-running it; register a rule for it (fisher_ext.register_rule)")
        pairs.append((o, g, d))
    if not pairs:
        return {}
    chunk = max(1, CHUNK_BYTES // sum(g.numel() * g.element_size() for _, g, _ in pairs))
    totals = {k: [] for k in names}
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk), device=pairs[0][1].device)
        cotangents = []
        for _, g, d in pairs:  # cotangent j: g with every example but rows[j] zeroed
            c = g.new_zeros((len(rows),) + tuple(g.shape))
            c.movedim(d + 1, 1)[torch.arange(len(rows)), rows] = g.movedim(d, 0)[rows]
            cotangents.append(c)
        grads = _batched_grads([o for o, _, _ in pairs], params, cotangents)
        for k, gr in zip(names, grads):
            if gr is not None:
                totals[k].append(sqnorm_per_example(gr))
    return {k: torch.cat(v) for k, v in totals.items() if v}
