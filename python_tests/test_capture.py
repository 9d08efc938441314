"""fisher_ext.capture on its own: nested outputs, the batch-dimension finder, threads."""

from __future__ import annotations

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
