"""nn.RNN, nn.LSTM, nn.GRU through the exact fallback (``output`` holds the batch on dim 0 or 1,
``h_n`` and ``c_n`` on dim 1: the capture finds them). PackedSequence inputs and unbatched inputs
are refused; so is dropout between layers in train mode (not replayable)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .functional import check_replayable, per_example_grads
from .registry import Call, UnsupportedModuleError, register_rule


def _check(module: nn.RNNBase) -> None:
    check_replayable(module)


@register_rule((nn.RNN, nn.LSTM, nn.GRU), check=_check, reruns=True)
def recurrent_rule(module: nn.RNNBase, names: list, call: Call):
    x = call.args[0] if call.args else call.kwargs.get("input")
    if isinstance(x, PackedSequence):
        raise UnsupportedModuleError(f"{type(module).__name__}: PackedSequence inputs are not supported (their "
                                     "examples are interleaved by length); pass padded tensors")
    if x.dim() != 3:
        raise UnsupportedModuleError(f"{type(module).__name__}: expected a batched (3-D) input, got shape "
                                     f"{tuple(x.shape)}")
    return per_example_grads(module, names, call)
