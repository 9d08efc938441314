"""nn.MultiheadAttention (its projections' raw parameters and out_proj, which its forward uses
directly) through the exact fallback, with the attention output's batch on dim 0 (batch_first) or
1 and the attention weights' on dim 0. Attention dropout in train mode is refused (not replayable)."""

from __future__ import annotations

from torch import nn

from .functional import check_replayable, per_example_grads
from .registry import Call, UnsupportedModuleError, register_rule


def _check(module: nn.MultiheadAttention) -> None:
    check_replayable(module)
    if module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedModuleError("MultiheadAttention(add_bias_kv=True or add_zero_attn=True) is not supported")


def _batch_dims(module: nn.MultiheadAttention, call: Call) -> list:
    return [0 if module.batch_first else 1, 0][:len(call.grads)]


@register_rule(nn.MultiheadAttention, check=_check, output_batch_dims=_batch_dims)
def attention_rule(module: nn.MultiheadAttention, names: list, call: Call):
    return per_example_grads(module, names, call, _batch_dims(module, call))
