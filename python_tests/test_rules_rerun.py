"""The re-running rules (fisher_ext.rules.functional, .recurrent, .attention) against the
per-example oracle, with the batch on the dims the capture would find."""

import pytest
import torch
from torch import nn

from rule_oracle import assert_rule_matches


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent(kind, batch_first):
    torch.manual_seed(0)
    module = kind(4, 3, num_layers=2, batch_first=batch_first, bidirectional=kind is nn.GRU)
    x = torch.randn(5, 6, 4, dtype=torch.float64) if batch_first else torch.randn(6, 5, 4, dtype=torch.float64)
    d = 0 if batch_first else 1
    extra = 2 if kind is nn.LSTM else 1  # h_n (and c_n), batch on dim 1
    assert_rule_matches(module, (x,), [d] + [1] * extra, [d], rtol=1e-9)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_a_shared_mask(batch_first):
    torch.manual_seed(0)
    module = nn.MultiheadAttention(6, 2, batch_first=batch_first)
    x = torch.randn(5, 5, 6, dtype=torch.float64)  # T == N: nothing to guess from sizes
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)  # shared by the batch
    d = 0 if batch_first else 1
    assert_rule_matches(module, (x, x, x), [d, 0], [d, d, d], kwargs={"attn_mask": mask}, rtol=1e-9)


def test_cross_attention_with_padding_mask_and_separate_projections():
    torch.manual_seed(0)
    module = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, batch_first=True)
    q = torch.randn(5, 3, 6, dtype=torch.float64)
    k, v = torch.randn(5, 7, 4, dtype=torch.float64), torch.randn(5, 7, 5, dtype=torch.float64)
    pad = torch.zeros(5, 7, dtype=torch.bool)
    pad[1, -2:] = True
    kwargs = {"key_padding_mask": pad, "need_weights": False}
    assert_rule_matches(module, (q, k, v), [0, 0], [0, 0, 0], kwargs=kwargs, rtol=1e-9,
                        kwarg_dims={"key_padding_mask": 0})


def test_the_fallback_takes_a_users_module():
    from fisher_ext.rules.functional import per_example_grads
    from rule_oracle import oracle, output_grads
    from fisher_ext.rules.registry import Call

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, dtype=torch.float64))

        def forward(self, x, scale):
            return torch.tanh(x * self.w) * scale

    torch.manual_seed(0)
    module, x, scale = Gate(), torch.randn(5, 3, 6, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    outs, grads = output_grads(module, (x, scale), {}, [0])
    got = per_example_grads(module, ["w"], Call((x, scale), {}, outs, grads, 5, [0]))
    want = oracle(module, (x, scale), grads, [0], [0, None])
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-10, atol=1e-12)


def test_the_fallback_takes_ops_without_a_batching_rule():
    """An op whose backward cannot be vmapped (here a backward with data-dependent control flow; on
    the GPU, cuDNN's RNN backward): one backward per example instead, same norms."""
    from fisher_ext.rules.functional import per_example_grads
    from fisher_ext.rules.registry import Call
    from rule_oracle import oracle, output_grads

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            if not bool(torch.isfinite(g).all()):  # data-dependent control flow: no batching rule
                raise FloatingPointError("non-finite output gradient")
            return 3 * x ** 2 * g

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, dtype=torch.float64))

        def forward(self, x):
            return Cube.apply(x * self.w)

    torch.manual_seed(0)
    module, x = Gate(), torch.randn(5, 3, 6, dtype=torch.float64)
    outs, grads = output_grads(module, (x,), {}, [0])
    with pytest.raises(RuntimeError, match="atching rule"):  # the batched backward really is refused
        torch.autograd.grad(outs[0], module.w, grads[0].expand(2, *grads[0].shape), retain_graph=True,
                            is_grads_batched=True)
    got = per_example_grads(module, ["w"], Call((x,), {}, outs, grads, 5, [0]))
    want = oracle(module, (x,), grads, [0], [0])
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-10, atol=1e-12)
