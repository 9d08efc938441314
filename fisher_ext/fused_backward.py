"""One backward for a loss's gradient and its per-example squared norms together.

A capture's rules form each layer's per-example norms from its input and output gradient. Where
a layer's rule also gives the batch gradients (Linear and Conv, through the fused
weight-gradient ops), autograd is asked only for the layer's output gradient, and the layer's
weight and bias gradients come out of the same pass as their norms: no weight gradient is formed
twice. Every other parameter gets its gradient from autograd, as in a plain backward.

A layer is fused only where that is exact: a single output, not modified in place since, with the
examples on dim 0, its parameters in the inputs' dtype (not under autocast) and used by nothing
but the layer itself (counted on the loss's autograd graph, so a regularizer on a weight, weight
tying or a parent reading a child's weight all keep autograd's path for that layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .capture import Capture, _detach
from .rules import rule_for
from .rules.registry import Call

Tensor = torch.Tensor


def leaf_uses(*roots: Tensor, seen: set | None = None) -> dict[int, tuple[Tensor, int]]:
    """``{id(leaf): (leaf, edges)}``: every leaf tensor the graphs of ``roots`` reach, with the number
    of graph edges into it (1 for a weight used by one op). ``seen`` (a set) receives the graph's
    nodes."""
    found: dict[int, tuple[Tensor, int]] = {}
    seen = set() if seen is None else seen
    stack = [r.grad_fn for r in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)  # AccumulateGrad: a leaf that requires grad
            if leaf is not None:
                found[id(leaf)] = (leaf, found.get(id(leaf), (leaf, 0))[1] + 1)
            else:
                stack.append(child)
    return found


def fused_layers(capture: Capture, params: Sequence[Tensor], uses: dict,
                 by_name: dict[str, Tensor] | None = None) -> dict[nn.Module, int]:
    """``{module: index of its output leaf}`` of the recorded layers the fused backward can take.
    ``by_name``: the tensors the forward used for the capture's parameters (default: its own)."""
    if capture.error is not None:
        return {}
    wanted = {id(p) for p in params}
    by_name = by_name or dict(zip(capture.param_names, capture.params))
    fused = {}
    for module, record in capture.records.items():
        rule = rule_for(module)
        names = capture.owners.get(module, [])
        if rule is None or rule.gradients is None or not names:
            continue
        live = [i for i, o in enumerate(record.outputs) if o is not None]
        if len(live) != 1:
            continue
        i = live[0]
        x = record.args[0] if record.args else None
        if record.outputs[i]._version != record.versions[i] or not record.batch_dims or record.batch_dims[i] != 0:
            continue
        own = [by_name.get(full) for _, full in names]
        if any(p is None for p in own) or not isinstance(x, Tensor) or record.outputs[i].dtype != x.dtype \
                or any(p.dtype != x.dtype or id(p) not in wanted
                                                                                  for p in own):
            continue
        if any(uses.get(id(p), (p, 0))[1] > 1 or capture.users.get(full, {module}) - {module}
               for p, (_, full) in zip(own, names)):
            continue
        fused[module] = i
    return fused


def backward_with_norms(capture: Capture, loss: Tensor, params: Sequence[Tensor], n: int, scale: float,
                        retain_graph: bool, norms_required: bool = True, names: Sequence[str] | None = None,
                        norms: bool = True, errors: list | None = None, uses: dict | None = None
                        ) -> tuple[list[Tensor | None], dict[str, Tensor] | None]:
    """``torch.autograd.grad(loss, params, allow_unused=True)`` and ``{parameter name: (N,) squared
    norms}`` of the per-example gradients (the caught output gradients times ``scale``: ``n`` for a
    mean loss), from one backward. ``capture.find_batch_dims`` must have run on the losses.

    ``names``: the capture's parameter name of each of ``params`` (None for a tensor that is none of
    them), where the forward ran on other tensors than the model's own (``functional_call``).
    ``norms=False``: the gradients only (None for the norms), with the fused layers' weight
    gradients still from their fused ops. ``uses``: :func:`leaf_uses` of ``loss``, if the caller has
    it already.
    A model the rules cannot handle raises :meth:`Capture.norms_from_grads`'s error, or, without
    ``norms_required``, gives None for the norms (the gradients stand) and appends the error to
    ``errors`` when given.
    """
    if names is None:
        owned = {capture.param_ids[id(p)]: p for p in params if id(p) in capture.param_ids}
    else:
        owned = {name: p for name, p in zip(names, params) if name is not None}
    fused = fused_layers(capture, params, uses if uses is not None else leaf_uses(loss), owned)
    fused_ids = {id(owned[full]) for m in fused for _, full in capture.owners[m]}
    rest = [p for p in params if id(p) not in fused_ids]
    outputs = [capture.records[m].outputs[i] for m, i in fused.items()]
    capture.collecting = True  # the other modules' hooks catch their output gradients
    try:
        got = torch.autograd.grad(loss, outputs + rest, retain_graph=retain_graph, allow_unused=True)
    finally:
        capture.collecting = False
    grads: dict[int, Tensor | None] = {id(p): g for p, g in zip(rest, got[len(outputs):])}
    found: dict[str, Tensor] = {}
    for (module, i), gy in zip(fused.items(), got[:len(outputs)]):
        record = capture.records[module]
        record.grads = [gy if j == i else None for j in range(len(record.outputs))]
        names = capture.owners[module]
        if gy is None:  # the loss does not reach this layer
            continue
        call = Call(_detach(record.args), _detach(record.kwargs), record.outputs, [g.detach() if g is not None
                    else None for g in record.grads], n, record.batch_dims)
        layer_grads, layer_norms = rule_for(module).gradients(module, [local for local, _ in names], call)
        for local, full in names:
            grads[id(owned[full])] = layer_grads[local]
            found[full] = layer_norms[local] * (scale * scale)
    ordered = [grads.get(id(p)) for p in params]
    if not norms:
        return ordered, None
    try:
        with torch.no_grad():
            found.update(capture.norms_from_grads(n, capture.used_unrecorded(params, ordered), scale=scale,
                                                  done=frozenset(fused), full_precision=True))
    except ValueError as e:  # e.g. BatchNorm in train mode couples the examples
        if norms_required:
            raise
        if errors is not None:
            errors.append(e)
        return ordered, None
    return ordered, found
