"""nn.Embedding in ghost form: ``||sum_t onehot(i_t) g_t^T||^2 = sum_{t,s} [i_t == i_s] <g_t, g_s>``."""

from __future__ import annotations

from torch import nn

from ..reference import to_accumulation_dtype as acc
from .registry import Call, UnsupportedModuleError, register_rule
from .shared import batch_first


def _check(module: nn.Embedding) -> None:
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError("Embedding(scale_grad_by_freq=True): the gradient is scaled by token counts "
                                     "over the whole batch, which couples the examples")
    if module.max_norm is not None:
        raise UnsupportedModuleError("Embedding(max_norm=...): the forward renormalizes the weight in place; use "
                                     "max_norm=None")


@register_rule(nn.Embedding, check=_check, differentiable=True)
def embedding_rule(module: nn.Embedding, names: list, call: Call):
    idx, g = batch_first(call, call.args[0], call.grad)
    n = idx.shape[0]
    tokens = idx.reshape(n, -1)
    G = acc(g).reshape(n, tokens.shape[1], -1)
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
    if module.padding_idx is not None:  # the padding row receives no gradient
        keep = tokens != module.padding_idx
        same = same & keep.unsqueeze(2) & keep.unsqueeze(1)
    return {"weight": ((G @ G.mT) * same).sum((1, 2))}
