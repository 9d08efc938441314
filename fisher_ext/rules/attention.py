"""nn.MultiheadAttention: the Linear rule on each projection.

The module's own forward is re-run with its projections taken out: q, k, v (and the attention
output before ``out_proj``) are formed here with ``F.linear``, and the attention between them by
torch's own ``F.multi_head_attention_forward`` with identity projections, so masks, causal
attention and returned weights behave exactly as in the module. Backpropagating the captured
output gradients gives each projection's output gradient; ``in_proj_weight``'s q, k, v slices
are disjoint, so their squared norms add. ``out_proj``'s parameters, which the module's forward
uses directly, are covered here too. Attention dropout in train mode, ``add_bias_kv`` and
``add_zero_attn`` are refused up front."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_sqnorm
from .functional import check_replayable
from .registry import Call, UnsupportedModuleError, register_rule
from .shared import bias_norm

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _check(module: nn.MultiheadAttention) -> None:
    check_replayable(module)
    if module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedModuleError("MultiheadAttention(add_bias_kv=True or add_zero_attn=True) is not supported")


def _projection_weights(module: nn.MultiheadAttention) -> list:
    if module._qkv_same_embed_dim:
        return list(module.in_proj_weight.chunk(3))
    return [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]


@register_rule(nn.MultiheadAttention, check=_check, reruns=True)
def attention_rule(module: nn.MultiheadAttention, names: list, call: Call):
    bound = _SIGNATURE.bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    e = module.embed_dim
    biases = list(module.in_proj_bias.chunk(3)) if module.in_proj_bias is not None else [None] * 3
    inputs = [t.detach() for t in (a["query"], a["key"], a["value"])]
    with torch.enable_grad():
        projected = [F.linear(x, w.detach(), b.detach() if b is not None else None).requires_grad_()
                     for x, w, b in zip(inputs, _projection_weights(module), biases)]
        eye = torch.eye(e, dtype=projected[0].dtype, device=projected[0].device)
        core, weights = F.multi_head_attention_forward(
            *(p.transpose(0, 1) if module.batch_first else p for p in projected), e, module.num_heads,
            torch.cat([eye] * 3), None, None, None, False, 0.0, eye, None, training=False,
            key_padding_mask=a["key_padding_mask"], need_weights=a["need_weights"], attn_mask=a["attn_mask"],
            average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"])
        core = core.transpose(0, 1) if module.batch_first else core  # the attention output before out_proj
        bias = module.out_proj.bias
        out = F.linear(core, module.out_proj.weight.detach(), bias.detach() if bias is not None else None)
    pairs = [(o, g) for o, g in zip((out, weights), call.grads) if g is not None]
    if any(o is None or o.shape != g.shape for o, g in pairs):
        raise UnsupportedModuleError("MultiheadAttention: the rule's re-run does not give the module's outputs")
    dqkv = torch.autograd.grad([o for o, _ in pairs], projected, [g for _, g in pairs], allow_unused=True)

    d = call.batch_dim  # the batch dim of the output is that of query, key and value

    def first(t: torch.Tensor) -> torch.Tensor:
        return t.movedim(d, 0) if d else t

    norms: dict = {}

    def add(name: str, value: torch.Tensor) -> None:
        if name in names:  # q, k, v are disjoint slices of in_proj: their squared norms add
            norms[name] = norms[name] + value if name in norms else value

    for i, (x, g) in enumerate(zip(inputs, dqkv)):
        if g is not None:
            weight = "in_proj_weight" if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight",
                                                                          "v_proj_weight")[i]
            add(weight, linear_sqnorm(first(x).to(g.dtype), first(g), bias=False))
            add("in_proj_bias", bias_norm(first(g), -1))
    g_out = call.grads[0]
    if g_out is not None:
        add("out_proj.weight", linear_sqnorm(first(core.detach()), first(g_out).to(core.dtype), bias=False))
        add("out_proj.bias", bias_norm(first(g_out), -1))
    return norms
