"""fisher_ext.rules.conv (Conv and ConvTranspose) against the per-example oracle."""

import pytest
import torch
from torch import nn

from rule_oracle import assert_rule_matches

CONVS = {
    "conv1d_stride": (nn.Conv1d(3, 4, 3, stride=2, padding=1), (5, 3, 11)),
    "conv2d_groups_dilation": (nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (5, 4, 7, 7)),
    "conv3d": (nn.Conv3d(2, 3, 2, bias=False), (5, 2, 4, 4, 4)),
    "conv_transpose1d": (nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (5, 3, 6)),
    "conv_transpose2d_groups": (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), (5, 4, 5, 5)),
    "conv_transpose3d": (nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), (5, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_matches_oracle(name):
    torch.manual_seed(0)
    module, shape = CONVS[name]
    assert_rule_matches(module, (torch.randn(shape, dtype=torch.float64),), [0], [0])


def test_other_padding_modes_go_to_the_fallback():
    from fisher_ext.rules import rule_for
    assert rule_for(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")) is None
