"""One backward for a loss's gradient and its per-example squared norms together.

A capture's rules form each layer's per-example norms from its input and output gradient. Where
a layer's rule also gives the batch gradients (Linear and Conv, through the fused
weight-gradient ops), autograd is asked only for the layer's output gradient, and the layer's
weight and bias gradients come out of the same pass as their norms: no weight gradient is formed
twice. Every other parameter gets its gradient from autograd, as in a plain backward.

A layer is fused only where that is exact: a single output (its gradient is taken where the layer
produced it, so a change in place since does not matter), with the examples on dim 0, its
parameters in the inputs' dtype (not under autocast) and used by nothing but the layer itself
(counted on the loss's autograd graph, so a regularizer on a weight, weight tying or a parent
reading a child's weight all keep autograd's path for that layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .capture import Capture, Record, _detach
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
        i = _single_output(record)
        x = record.args[0] if record.args else None
        if i is None or record.batch_dims[i] != 0 or record.outputs[i].node is None:
            continue
        own = [by_name.get(full) for _, full in names]
        if any(p is None for p in own) or not isinstance(x, Tensor) or record.outputs[i].dtype != x.dtype \
                or any(p.dtype != x.dtype or id(p) not in wanted for p in own):
            continue
        if any(uses.get(id(p), (p, 0))[1] > 1 or capture.users.get(full, {module}) - {module}
               for p, (_, full) in zip(own, names)):
            continue
        fused[module] = i
    return fused


def _discard(i: int, g: Tensor) -> None:
    """A hook body that keeps nothing."""
    return None


def norm_layers(capture: Capture, fused: dict) -> dict[nn.Module, int]:
    """``{module: index of its output leaf}`` of the other recorded layers whose closed-form rule
    can form their norms inside the backward: one output leaf, its batch dim known."""
    if capture.error is not None:
        return {}
    found = {}
    for module, record in capture.records.items():
        rule = rule_for(module)
        if module in fused or module not in capture.owners or rule is None or rule.reruns:
            continue
        i = _single_output(record)
        if i is not None:
            found[module] = i
    return found


def _single_output(record: Record) -> int | None:
    """The index of a record's one output leaf that requires grad, if its batch dim is known; else
    None. (Its gradient is asked for at its edge, so a change in place since does not matter.)"""
    live = [i for i, o in enumerate(record.outputs) if o is not None]
    if len(live) != 1 or not record.batch_dims:
        return None
    i = live[0]
    return i if record.batch_dims[i] is not None else None


def _former(capture: Capture, module: nn.Module, n: int, fuse: bool, asked: bool, formed: dict):
    """The hook body that forms ``module``'s norms from its output gradient ``g`` into
    ``formed[module]`` as ``(gradients, norms)``: with ``fuse``, its gradients too, through the
    rule's fused ops (else None for them). It marks the output as reached with a zero-stride
    stand-in, and hands that to autograd in place of ``g`` where autograd was ``asked`` for the
    output (its node does not run). Where a rule refuses, ``g`` is kept for
    :meth:`Capture.norms_from_grads` to raise the error in its context."""
    record = capture.records[module]
    rule, names = rule_for(module), [local for local, _ in capture.owners[module]]

    def form(i: int, g: Tensor) -> Tensor | None:
        grads = [g.detach() if j == i else None for j in range(len(record.outputs))]
        call = Call(_detach(record.args), _detach(record.kwargs), record.values(), grads, n, record.batch_dims)
        if fuse:
            formed[module] = rule.gradients(module, names, call)
        else:
            try:
                norms = rule.fn(module, names, call)
            except ValueError:
                norms = {}
            if set(names) - set(norms):
                record.grads[i] = g
                return None
            formed[module] = (None, norms)
        stand_in = g.new_zeros(()).expand(g.shape)
        record.grads[i] = stand_in  # norms_from_grads counts the layer as reached
        return stand_in if asked else None
    return form


def runs(nodes: Sequence, targets: set) -> list[bool]:
    """For each of ``nodes`` (autograd graph nodes), whether a backward asked for the gradients at
    ``targets`` (graph nodes) would run it: whether one of its descendants is a target."""
    below: dict = {}  # node -> a target lies below it
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in below:
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if expanded:
                below[node] = any(c in targets or below[c] for c in children)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in below)
    return [below[node] for node in nodes]


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

    A fused layer's gradients and norms are formed by its output's tensor hook, inside the
    backward, as soon as its output gradient is complete, which is then freed as in a plain
    backward. Autograd is asked for the output itself only where nothing else would run the
    output's node (the first layer); there the hook hands autograd a zero-stride stand-in to keep.
    """
    if names is None:
        owned = {capture.param_ids[id(p)]: p for p in params if id(p) in capture.param_ids}
    else:
        owned = {name: p for name, p in zip(names, params) if name is not None}
    uses = uses if uses is not None else leaf_uses(loss)
    fused = fused_layers(capture, params, uses, owned)
    fused_ids = {id(owned[full]) for m in fused for _, full in capture.owners[m]}
    rest = [p for p in params if id(p) not in fused_ids]
    nodes = [capture.records[m].outputs[i].node for m, i in fused.items()]
    targets = {get_gradient_edge(p).node for p in rest if p.requires_grad} | set(nodes)
    asked = [not ran for ran in runs(nodes, targets)]  # else the node runs, and its hook with it
    formed: dict[nn.Module, tuple[dict, dict]] = {}
    for record in capture.records.values():
        record.grads = [None] * len(record.outputs)
    for module, ask in zip(fused, asked):
        capture.records[module].consume = _former(capture, module, n, True, ask, formed)
    if norms:  # the other layers' norms inside the backward too, where their rules allow
        for module in norm_layers(capture, fused):
            capture.records[module].consume = _former(capture, module, n, False, False, formed)
    # output gradients no rule will read are not kept: all of them without norms, else those of
    # modules without parameters (the model), unless one whose module did not run falls back on them
    runners = norms and any(m not in capture.records for m in capture.owners)
    for module, record in capture.records.items():
        if record.consume is None and not (norms and (module in capture.owners or runners)):
            record.consume = _discard
    outputs = [capture.records[m].outputs[i].edge for (m, i), ask in zip(fused.items(), asked) if ask]
    capture.collecting = True  # the other modules' hooks catch their output gradients
    try:
        got = torch.autograd.grad(loss, outputs + rest, retain_graph=retain_graph, allow_unused=True)
    finally:
        capture.collecting = False
        for record in capture.records.values():
            record.consume = None
    missed = [m for m in fused if m not in formed and any(id(owned[full]) in uses for _, full in capture.owners[m])]
    if missed:  # the loss reaches the layer's weight, so its output's node ran: a gradient would be lost
        raise RuntimeError(f"backward_with_norms: the output gradient of {capture.prefix[missed[0]]} never reached "
                           "its hook; please report this model")
    grads: dict[int, Tensor | None] = {id(p): g for p, g in zip(rest, got[len(outputs):])}
    found: dict[str, Tensor] = {}
    for module, (layer_grads, layer_norms) in formed.items():
        for local, full in capture.owners[module]:
            if layer_grads is not None:
                grads[id(owned[full])] = layer_grads[local]
            found[full] = layer_norms[local] * (scale * scale)
    ordered = [grads.get(id(p)) for p in params]
    if not norms:
        return ordered, None
    try:
        with torch.no_grad():
            found.update(capture.norms_from_grads(n, capture.used_unrecorded(params, ordered), scale=scale,
                                                  done=frozenset(formed), full_precision=True))
    except ValueError as e:  # e.g. BatchNorm in train mode couples the examples
        if norms_required:
            raise
        if errors is not None:
            errors.append(e)
        return ordered, None
    return ordered, found
