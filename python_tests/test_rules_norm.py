"""fisher_ext.rules.norm and .embedding against the per-example oracle; their up-front checks."""

import pytest
import torch
from torch import nn

import fisher_ext
from rule_oracle import assert_rule_matches


def test_layer_norm_batch_first_and_sequence_first():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    assert_rule_matches(nn.LayerNorm(6), (x,), [0], [0])
    assert_rule_matches(nn.LayerNorm([7, 6], eps=0.1), (x,), [0], [0])
    assert_rule_matches(nn.LayerNorm(6), (x.transpose(0, 1).contiguous(),), [1], [1])


def test_group_norm():
    torch.manual_seed(0)
    assert_rule_matches(nn.GroupNorm(2, 4), (torch.randn(5, 4, 3, 3, dtype=torch.float64),), [0], [0])


def test_batch_norm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    assert_rule_matches(bn.eval(), (torch.randn(5, 4, 3, dtype=torch.float64),), [0], [0])


def test_embedding_with_padding_and_repeats():
    torch.manual_seed(0)
    idx = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 1, 4], [4, 1, 2, 3], [2, 2, 0, 1]])
    assert_rule_matches(nn.Embedding(5, 3, padding_idx=0), (idx,), [0], [0])


@pytest.mark.parametrize("module, match", [
    (nn.BatchNorm2d(3), "batch's statistics"),
    (nn.BatchNorm2d(3, track_running_stats=False).eval(), "batch's statistics"),
    (nn.Embedding(5, 3, scale_grad_by_freq=True), "token counts"),
    (nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
])
def test_refused_up_front(module, match):
    from fisher_ext.capture import validate
    with pytest.raises(fisher_ext.UnsupportedModuleError, match=match):
        validate(nn.Sequential(module))
