"""Tr(F), the monitor and the penalty's free Tr(F) over every model pattern of cases.py: the
oracle's per-example norms (one ordinary backward per example) or the named error, raised
before the forward where the model tells it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fisher_ext
from cases import CASES, N, Scale, build, mean_ce, oracle


@fisher_ext.register_rule(Scale)
def scale_rule(module, names, call):
    x, g = call.args[0], call.grad  # y = x * scale: dl_n/dscale = x_n * g_n
    return {"scale": (x * g).square().sum(1)}


def assert_matches(result, want):
    total = sum(want.values())
    torch.testing.assert_close(result.per_example.double(), total, rtol=1e-9, atol=1e-12)
    assert set(result.per_parameter) == set(want) == set(result.coverage)
    for k, v in want.items():
        assert result.per_parameter[k] == pytest.approx(float(v.mean()), rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fisher_trace(case):
    model, inputs, labels = build(case)
    if case.error:
        buffers = [b.clone() for b in model.buffers()]
        with pytest.raises(fisher_ext.UnsupportedModuleError, match=case.error):
            fisher_ext.fisher_trace(model, inputs, labels=labels)
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers())), "ran before refusing"
        return
    result = fisher_ext.fisher_trace(model, inputs, labels=labels)
    assert_matches(result, oracle(case, model, inputs, labels))
    assert "fallback" not in result.coverage.values() or case.id == "conv_reflect_padding"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_monitor_reuses_the_training_forward(case):
    model, inputs, labels = build(case)
    monitor = fisher_ext.FisherTraceMonitor(model)
    if case.error:
        with pytest.raises(fisher_ext.UnsupportedModuleError, match=case.error):
            with monitor.watch():
                out = model(*inputs)
            monitor.estimate(out, labels=labels)
        return
    with monitor.watch():
        out = model(*inputs)
    result = monitor.estimate(out, labels=labels)
    mean_ce(labels)(out).backward()  # the caller's own backward still works
    assert_matches(result, oracle(case, model, inputs, labels))


RUNS_ANYWAY = {"batchnorm_train", "tied_embedding", "module_called_twice", "routed_experts",
               "parent_uses_child_weight"}


@pytest.mark.parametrize("case", [c for c in CASES if not c.error or c.id in RUNS_ANYWAY],
                         ids=[c.id for c in CASES if not c.error or c.id in RUNS_ANYWAY])
def test_penalty_free_trace(case):
    """The penalty's per-example norms from its gbar backward: the oracle's, or none (the penalty
    itself still runs) where the rules refuse the model; its gradient is the exact one."""
    model, inputs, labels = build(case)
    twin = copy.deepcopy(getattr(model, "_orig_mod", model))
    with sdpa_kernel(SDPBackend.MATH):  # the flash kernel has no double backward
        _, result = fisher_ext.FisherPenalty(model, 0.3).backward(inputs, mean_ce(labels), labels=labels)
    if case.error:
        assert result.per_example is None
    else:
        want = sum(oracle(case, model, inputs, labels).values())
        torch.testing.assert_close(result.per_example.double(), want, rtol=1e-9, atol=1e-12)
    params = [p for p in twin.parameters() if p.requires_grad]  # the exact step, by hand
    with sdpa_kernel(SDPBackend.MATH):
        out = twin(*inputs)
        gbar = torch.autograd.grad(mean_ce(labels)(out), params, create_graph=True, allow_unused=True)
        total = mean_ce(labels)(out) + 0.3 * sum(g.square().sum() for g in gbar if g is not None)
        want = torch.autograd.grad(total, params, allow_unused=True)
    target = getattr(model, "_orig_mod", model)
    for p, w in zip([p for p in target.parameters() if p.requires_grad], want):
        torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)


def test_missing_double_backward_is_explained():
    case = next(c for c in CASES if c.id == "transformer")
    model, inputs, labels = build(case)
    with pytest.raises(RuntimeError, match="use method='finite_difference'.*SDPBackend.MATH"):
        fisher_ext.FisherPenalty(model, 0.3).backward(inputs, mean_ce(labels), labels=labels)
    _, result = fisher_ext.FisherPenalty(model, 0.3, method="finite_difference", check_every=0).backward(
        inputs, mean_ce(labels), labels=labels)
    assert result.method == "finite_difference"


def test_empty_batch_and_foreign_output_are_refused():
    case = CASES[0]
    model, inputs, labels = build(case)
    with pytest.raises(ValueError, match=r"inputs: expected a batch of at least one example, got shape \(0, 6\)"):
        fisher_ext.fisher_trace(model, inputs[0][:0])
    monitor = fisher_ext.FisherTraceMonitor(model)
    with monitor.watch():
        model(*inputs)
    with pytest.raises(ValueError, match="output: expected a tensor the watched forward returned"):
        monitor.estimate(model(*inputs), labels=labels)


def test_monitor_does_not_change_the_run():
    """Its label draws come from its own generator: a monitored step leaves the global random
    stream where a plain step leaves it (dropout masks of later steps are the same)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 4)).double()
    x = torch.randn(N, 6, dtype=torch.float64)
    torch.manual_seed(1)
    model(x)
    plain = torch.rand(3)
    monitor = fisher_ext.FisherTraceMonitor(model)
    torch.manual_seed(1)
    with monitor.watch():
        out = model(x)
    monitor.estimate(out)
    assert torch.equal(torch.rand(3), plain)
