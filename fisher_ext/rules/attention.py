"""nn.MultiheadAttention (its projections' raw parameters and out_proj, which its forward uses
directly) through the exact fallback. Attention dropout in train mode is refused (not replayable)."""

from __future__ import annotations

from torch import nn

from .functional import check_replayable, per_example_grads
from .registry import Call, UnsupportedModuleError, register_rule


def _check(module: nn.MultiheadAttention) -> None:
    check_replayable(module)
    if module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedModuleError("MultiheadAttention(add_bias_kv=True or add_zero_attn=True) is not supported")


@register_rule(nn.MultiheadAttention, check=_check, reruns=True)
def attention_rule(module: nn.MultiheadAttention, names: list, call: Call):
    return per_example_grads(module, names, call)
