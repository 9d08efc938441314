"""fisher_ext.capture on its own: nested outputs, the batch-dimension finder, threads."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisher_ext
from fisher_ext.capture import _batch_dim, leaves
from cases import CASES_BY_ID, build, oracle


def test_leaves_of_nested_outputs():
    @dataclasses.dataclass
    class Out:
        a: torch.Tensor
        rest: dict

    t = [torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)]
    got = leaves(Out(t[0], {"b": [t[1], (t[2], None)]}))
    assert len(got) == 4 and all(x is y for x, y in zip(got, t + [None]))


def test_batch_dim_finder():
    n = 4
    g = torch.zeros(6, n, 3)  # (T, N, d): each example's loss reaches its own column only
    probes = [(i, g.clone().index_fill_(1, torch.tensor([i]), 1.0)) for i in (0, n - 1)]
    assert _batch_dim(torch.Size([6, n, 3]), probes, n) == 1
    square = torch.zeros(n, n)  # (N, T) with T == N and a loss reading only token 0: the second probe decides
    p0, p1 = square.clone(), square.clone()
    p0[0, 0] = 1.0
    p1[n - 1, 0] = 1.0
    assert _batch_dim(torch.Size([n, n]), [(0, p0), (n - 1, p1)], n) == 0
    assert _batch_dim(torch.Size([3, 2]), [(0, torch.ones(3, 2))], n) is None  # no dim of size N: a subset


def test_threads_share_nothing():
    """Concurrent estimates on separate models give each one's own oracle and leave torch as it was."""
    case = CASES_BY_ID["transformer"]
    linear = F.linear
    jobs = [build(case, seed=s) for s in range(4)]
    results = [None] * len(jobs)

    def work(i):
        model, inputs, labels = jobs[i]
        results[i] = fisher_ext.fisher_trace(model, inputs, labels=labels)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert F.linear is linear
    for (model, inputs, labels), result in zip(jobs, results):
        want = sum(oracle(case, model, inputs, labels).values())
        torch.testing.assert_close(result.per_example.double(), want, rtol=1e-9, atol=1e-12)


def _oracle_total(model, x, y):
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for n in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum").backward()
        total[n] = sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None)
    return total


class Noisy(nn.Module):
    """A parameter-owning module with randomness that is not an nn.Dropout (timm's drop-path style)
    and a buffer its forward updates: its re-run must replay both."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return F.dropout(x * self.w, 0.5, self.training) * self.calls


def test_rerun_replays_randomness_and_buffers_and_leaves_the_run_alone():
    torch.manual_seed(0)
    model = nn.Sequential(Noisy(), nn.Linear(6, 4)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.arange(5) % 4
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    result = fisher_ext.fisher_trace(model, x, labels=y)
    after = torch.rand(2)
    torch.manual_seed(1)
    with torch.no_grad():
        twin(x)  # a plain forward: the random stream and the buffer as the estimate must leave them
    assert torch.equal(torch.rand(2), after) and model[0].calls.item() == 1.0
    twin[0].calls.zero_()
    torch.manual_seed(1)
    masks = F.dropout(torch.ones(5, 6, dtype=torch.float64), 0.5)  # the draws of that forward, per example
    oracle_model = copy.deepcopy(twin)
    oracle_model[0].forward = lambda inp, m=oracle_model[0]: inp * m.w * masks[:inp.shape[0]] * 1.0
    want = torch.stack([_oracle_total(_single(oracle_model, masks, n), x[n:n + 1], y[n:n + 1])[0] for n in range(5)])
    torch.testing.assert_close(result.per_example.double(), want, rtol=1e-9, atol=1e-12)


def _single(model, masks, n):
    model = copy.deepcopy(model)
    model[0].forward = lambda inp, m=model[0]: inp * m.w * masks[n:n + 1]
    return model


def test_user_hooks_and_keyword_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.PReLU(6), nn.Linear(6, 4)).double()
    model[0].register_forward_hook(lambda mod, inp, out: out * 2)  # replaces the output
    model[2].register_forward_pre_hook(lambda mod, inp: (inp[0] * 3,))  # replaces a re-run module's input
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.arange(5) % 4
    result = fisher_ext.fisher_trace(model, x, labels=y)
    torch.testing.assert_close(result.per_example.double(), _oracle_total(model, x, y), rtol=1e-9, atol=1e-12)

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(6, 4), nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(input=self.lin(input=x))

    model = Keyword().double()
    result = fisher_ext.fisher_trace(model, x, labels=y)
    torch.testing.assert_close(result.per_example.double(), _oracle_total(model, x, y), rtol=1e-9, atol=1e-12)


def test_a_module_run_without_grad_is_unused_not_refused():
    torch.manual_seed(0)

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher, self.student = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            with torch.no_grad():
                t = self.teacher(x)
            return self.student(x) + t

    model = Teacher().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.arange(5) % 4
    result = fisher_ext.fisher_trace(model, x, labels=y)
    assert result.coverage["teacher.weight"] == "unused"
    torch.testing.assert_close(result.per_example.double(), _oracle_total(model, x, y), rtol=1e-9, atol=1e-12)


def test_packed_sequences_are_refused_clearly():
    lstm = nn.LSTM(3, 4, batch_first=True).double()

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = lstm, nn.Linear(4, 2).double()

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 3, 2]), batch_first=True)
            return self.head(self.lstm(packed)[1][0][-1])

    with pytest.raises(fisher_ext.UnsupportedModuleError, match="PackedSequence"):
        fisher_ext.fisher_trace(Packed(), torch.randn(3, 4, 3, dtype=torch.float64), labels=torch.tensor([0, 1, 0]))


def test_dict_inputs():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, batch):
            return self.lin(batch["x"])

    torch.manual_seed(0)
    model = DictModel().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.arange(5) % 4
    result = fisher_ext.fisher_trace(model, ({"x": x},), labels=y)
    torch.testing.assert_close(result.per_example.double(), _oracle_total(model.lin, x, y), rtol=1e-9, atol=1e-12)


def test_logits_picked_from_a_tuple_output():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, inp):
            return self.body(inp), inp.sum()

    x, y = torch.randn(5, 6, dtype=torch.float64), torch.arange(5) % 4
    result = fisher_ext.fisher_trace(WithAux(), x, labels=y, logits=lambda out: out[0])
    torch.testing.assert_close(result.per_example.double(), _oracle_total(body, x, y), rtol=1e-9, atol=1e-12)
