"""fisher_ext.rules.linear against the per-example oracle."""

import pytest
import torch
from torch import nn

from rule_oracle import assert_rule_matches, output_grads, run_rule

X = torch.randn(5, 7, 6, dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
def test_batch_first_positions(bias):
    assert_rule_matches(nn.Linear(6, 4, bias=bias), (X,), [0], [0])


def test_rows_only():
    assert_rule_matches(nn.Linear(6, 4), (X[:, 0],), [0], [0])


def test_sequence_first():
    """(T, N, d): the batch on dim 1, as the capture finds it."""
    assert_rule_matches(nn.Linear(6, 4), (X.transpose(0, 1).contiguous(),), [1], [1])


def test_only_the_named_parameters():
    module = nn.Linear(6, 4).double()
    module.weight.requires_grad_(False)
    _, grads = output_grads(module, (X,), {}, [0])
    assert set(run_rule(module, (X,), grads, [0])) == {"bias"}
