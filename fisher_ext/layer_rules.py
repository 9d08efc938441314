"""Per-example squared gradient norms of one module's own parameters, from its captured input
and output gradient.

Each rule returns ``{parameter name (local to the module): (N,) float32/float64 tensor}``.
Linear and Conv use the fisher_ext ops; LayerNorm, GroupNorm, BatchNorm (eval) and
Embedding have closed forms; every other module with trainable parameters goes through
:func:`fallback_rule` (per-example vector-Jacobian products of that module alone, with
torch.func). The gradient passed in is ``dl_n/d output`` of per-example losses (a *sum*
over the batch), so no reduction rescaling is needed here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .ops import conv_sqnorm, linear_sqnorm
from .reference import result_dtype
from .reference import to_accumulation_dtype as _acc  # float32, float64 for float64

Norms = dict[str, torch.Tensor]


class UnsupportedModuleError(ValueError):
    """A module whose per-example gradients cannot be computed exactly (e.g. BatchNorm in train mode)."""


def _sqnorm_per_example(t: torch.Tensor) -> torch.Tensor:
    return _acc(t).reshape(t.shape[0], -1).square().sum(1)


def _bias_norm(g: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """||sum over positions of g||^2 per example, channels on ``channel_dim``."""
    g = _acc(g).movedim(channel_dim, -1)
    return g.reshape(g.shape[0], -1, g.shape[-1]).sum(1).square().sum(1)


def linear_rule(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> Norms:
    out = {"weight": linear_sqnorm(x, g.to(x.dtype), bias=False)}
    if module.bias is not None:
        out["bias"] = _bias_norm(g, -1)
    return out


def conv_rule(module: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor) -> Norms:
    out = {"weight": conv_sqnorm(x, g.to(x.dtype), kernel_size=module.kernel_size, stride=module.stride,
                                 padding=module.padding, dilation=module.dilation, groups=module.groups,
                                 bias=False)}
    if module.bias is not None:
        out["bias"] = _bias_norm(g, 1)
    return out


def _affine_norms(module: nn.Module, xhat: torch.Tensor, g: torch.Tensor, channel_dims: list[int]) -> Norms:
    """Weight and bias of an elementwise affine ``y = xhat * w + b`` whose parameters span ``channel_dims``."""
    acc = result_dtype(g.dtype)
    g, xhat = g.to(acc), xhat.to(acc)
    sum_dims = [d for d in range(1, g.dim()) if d not in channel_dims]
    out = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = _sqnorm_per_example((g * xhat).sum(sum_dims) if sum_dims else g * xhat)
    if getattr(module, "bias", None) is not None:
        out["bias"] = _sqnorm_per_example(g.sum(sum_dims) if sum_dims else g)
    return out


def layer_norm_rule(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> Norms:
    xhat = F.layer_norm(_acc(x), module.normalized_shape, None, None, module.eps)
    k = len(module.normalized_shape)
    return _affine_norms(module, xhat, g, list(range(g.dim() - k, g.dim())))


def group_norm_rule(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor) -> Norms:
    xhat = F.group_norm(_acc(x), module.num_groups, None, None, module.eps)
    return _affine_norms(module, xhat, g, [1])


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor) -> Norms:
    if module.training or module.running_mean is None:
        raise UnsupportedModuleError(
            f"{type(module).__name__}: in train mode (or without running statistics) BatchNorm normalizes each "
            "example with the batch's statistics, so examples are coupled and per-example gradients do not exist; "
            "call model.eval() for the Fisher of the eval-mode model, or replace BatchNorm by GroupNorm")
    shape = [1, -1] + [1] * (x.dim() - 2)
    x = _acc(x)
    xhat = (x - module.running_mean.to(x.dtype).view(shape)) / torch.sqrt(
        module.running_var.to(x.dtype).view(shape) + module.eps)
    return _affine_norms(module, xhat, g, [1])


def embedding_rule(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> Norms:
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError("Embedding(scale_grad_by_freq=True): the gradient is scaled by token counts "
                                     "over the whole batch, which couples examples")
    # ||sum_t onehot(i_t) g_t^T||^2 = sum_{t,s} [i_t == i_s] <g_t, g_s> (ghost form, T x T per example).
    N = idx.shape[0]
    tokens = idx.reshape(N, -1)
    G = _acc(g).reshape(N, tokens.shape[1], -1)
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
    if module.padding_idx is not None:  # the padding row receives no gradient
        keep = tokens != module.padding_idx
        same = same & keep.unsqueeze(2) & keep.unsqueeze(1)
    return {"weight": ((G @ G.mT) * same).sum((1, 2))}


RULES: dict[type, Callable[[Any, torch.Tensor, torch.Tensor], Norms]] = {
    nn.Linear: linear_rule,
    nn.Conv1d: conv_rule,
    nn.Conv2d: conv_rule,
    nn.Conv3d: conv_rule,
    nn.LayerNorm: layer_norm_rule,
    nn.GroupNorm: group_norm_rule,
    nn.BatchNorm1d: batch_norm_rule,
    nn.BatchNorm2d: batch_norm_rule,
    nn.BatchNorm3d: batch_norm_rule,
    nn.Embedding: embedding_rule,
}


def rule_for(module: nn.Module) -> str:
    """The name of the rule that handles this module's own parameters."""
    kind = type(module)
    if kind in RULES and not (isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros"):
        return RULES[kind].__name__.removesuffix("_rule")
    return "fallback"


def closed_form_norms(module: nn.Module, args: tuple, grads: tuple) -> Norms:
    return RULES[type(module)](module, args[0], grads[0])


def batch_dim(module: nn.Module) -> int:
    """The batch dimension of a module's tensors (nn.MultiheadAttention is sequence-first by default)."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def _check_replayable(module: nn.Module) -> None:
    """The rules that re-run a module need it to be deterministic."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise UnsupportedModuleError(
                f"{type(module).__name__}: its parameters have no closed-form rule, and the rules that re-run the "
                "module cannot replay its dropout masks; evaluate in eval mode")
    if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
        raise UnsupportedModuleError("MultiheadAttention(dropout > 0) in train mode: its attention dropout cannot be "
                                     "replayed by the rules that re-run the module; evaluate in eval mode")


def fallback_rule(module: nn.Module, names: list[str], args: tuple, kwargs: dict, grads: tuple, n: int) -> Norms:
    """Per-example gradients of the parameters ``names`` of ``module`` (its own, or descendants' it
    uses directly, like nn.MultiheadAttention's out_proj) by torch.func: ``vmap`` over the batch of
    ``grad`` of ``<module(x_n), g_n>``, re-running that module alone on each example's captured input.

    Tensors whose batch dimension has size ``n`` are split per example; others (masks shared by
    the batch) are passed whole. The module must treat examples independently and run
    deterministically (no dropout in train mode inside it).
    """
    _check_replayable(module)
    bdim = batch_dim(module)
    own = {k: p.detach() for k, p in module.named_parameters() if k in names}
    rest = {k: v for k, v in list(module.named_parameters()) + list(module.named_buffers()) if k not in own}

    def batched(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > bdim and t.shape[bdim] == n

    arg_dims = tuple(bdim if batched(a) else None for a in args)
    kw_names = sorted(kwargs)
    kw_dims = tuple(bdim if batched(kwargs[k]) else None for k in kw_names)
    grad_dims = tuple(bdim if g is not None else None for g in grads)

    def inner(params, a, kw_values, gs):
        a = tuple(t.unsqueeze(bdim) if d is not None else t for t, d in zip(a, arg_dims))
        kw = {k: (v.unsqueeze(bdim) if d is not None else v) for k, v, d in zip(kw_names, kw_values, kw_dims)}
        out = functional_call(module, {**rest, **params}, a, kw)
        outs = out if isinstance(out, tuple) else (out,)
        total = 0.0
        for o, gn in zip(outs, gs):
            if gn is not None and isinstance(o, torch.Tensor):
                total = total + (_acc(o) * _acc(gn.unsqueeze(bdim))).sum()
        return total

    per_example = vmap(grad(inner), in_dims=(None, arg_dims, kw_dims, grad_dims))(
        own, args, tuple(kwargs[k] for k in kw_names), grads)
    return {k: _sqnorm_per_example(v.detach()) for k, v in per_example.items()}


@contextlib.contextmanager
def _recording_linear_calls(tracked: dict[int, str]) -> Iterator[list]:
    """Records every ``F.linear`` call whose weight or bias is (a view of) a tracked parameter.

    ``torch.nn.functional.linear`` is swapped for a recording wrapper for the duration: Python
    code that calls it by that name (nn.MultiheadAttention's projections, user modules
    written with F.linear) is seen; a TorchFunctionMode would not see calls nested inside
    other torch functions. Not thread-safe; used only while re-running one module.
    """
    original = F.linear
    calls: list = []

    def name_of(t):
        if t is None:
            return None
        return tracked.get(id(t._base if t._base is not None else t))

    def linear(input, weight, bias=None):
        out = original(input, weight, bias)
        w, b = name_of(weight), name_of(bias)
        if w or b:
            calls.append((input, weight, bias, out, w, b))
        return out

    F.linear = linear
    try:
        yield calls
    finally:
        F.linear = original


def linear_calls_rule(module: nn.Module, names: list[str], args: tuple, kwargs: dict, grads: tuple,
                      n: int) -> Norms | None:
    """Parameters that ``module`` uses only as weights/biases of ``F.linear`` (e.g. the
    projections of nn.MultiheadAttention): re-run the module once on the whole batch, take
    each linear call's output gradient, and apply the Linear rule per call. Returns None (use
    :func:`fallback_rule`) unless every parameter is covered by calls on disjoint slices with
    an unambiguous batch dimension.
    """
    _check_replayable(module)
    params = dict(module.named_parameters())
    tracked = {id(params[k]): k for k in names}
    with torch.enable_grad(), _recording_linear_calls(tracked) as calls:
        out = module(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if not calls or not pairs:
        return None
    used: dict[str, list[tuple[int, int]]] = {}
    for _, weight, bias, _, w, b in calls:
        for name, t in ((w, weight), (b, bias)):
            if name:
                used.setdefault(name, []).append((t.storage_offset(), t.storage_offset() + t.numel()))
    for spans in used.values():  # slices of one parameter must not overlap (their norms add)
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or any(s[1] - s[0] <= 0 for s in spans):
            return None
    if set(used) != set(names):
        return None
    targets, grad_outs = [o for o, _ in pairs], [g for _, g in pairs]
    dys = torch.autograd.grad(targets, [c[3] for c in calls], grad_outs, allow_unused=True, retain_graph=True)
    probe = None  # gradients from example 0 alone: tell where a call flattened the batch into its rows
    norms: Norms = {}
    for i, ((x, weight, bias, y, w, b), dy) in enumerate(zip(calls, dys)):
        if dy is None:
            continue
        batch_dims = [d for d in range(y.dim() - 1) if y.shape[d] == n]
        if len(batch_dims) == 1:
            x_, dy_ = x.detach().movedim(batch_dims[0], 0), dy.movedim(batch_dims[0], 0)
        else:
            if probe is None:
                bdim = batch_dim(module)
                first = [torch.zeros_like(g).index_copy_(bdim, torch.tensor([0], device=g.device), g.narrow(bdim, 0, 1))
                         for g in grad_outs]
                probe = torch.autograd.grad(targets, [c[3] for c in calls], first, allow_unused=True,
                                            retain_graph=True)
            split = _split_examples(x.detach(), dy, probe[i], n)
            if split is None:
                return None  # cannot tell which rows hold which example
            x_, dy_ = split
        if w:
            norms[w] = norms.get(w, 0) + linear_sqnorm(x_.to(dy_.dtype), dy_, bias=False)
        if b:
            norms[b] = norms.get(b, 0) + _bias_norm(dy_, -1)
    return {k: v.detach() for k, v in norms.items()}


def _split_examples(x: torch.Tensor, dy: torch.Tensor, probe: torch.Tensor | None, n: int):
    """(N, rows, d) views of a linear call's input and output gradient whose leading dims hold
    the batch flattened with other positions, either example-major or example-minor; which
    one is read off ``probe``, the output gradient when only example 0 has a loss gradient."""
    rows = dy[..., 0].numel()
    if probe is None or rows % n:
        return None
    m = rows // n
    hit = probe.reshape(rows, -1).abs().sum(1) != 0  # the rows example 0 reaches
    if not hit.any():
        return None
    idx = torch.arange(rows, device=dy.device)
    major, minor = idx < m, idx % n == 0  # example 0's rows in either layout
    x2, dy2 = x.reshape(rows, x.shape[-1]), dy.reshape(rows, dy.shape[-1])
    if not (hit & ~major).any() and (hit & ~minor).any():
        return x2.reshape(n, m, -1), dy2.reshape(n, m, -1)
    if not (hit & ~minor).any() and (hit & ~major).any():
        return x2.reshape(m, n, -1).transpose(0, 1), dy2.reshape(m, n, -1).transpose(0, 1)
    return None
