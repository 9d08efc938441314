"""The fused backward (gradients and per-example norms from one pass) over every model pattern of
cases.py: its gradients are autograd's, its norms the oracle's, and the layers it fuses are the
ones where that is exact."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import CASES, CASES_BY_ID, N, build, oracle, per_example_losses
from fisher_ext.capture import Capture
from fisher_ext.fused_backward import backward_with_norms, fused_layers, leaf_uses

RUNS = [c for c in CASES if not c.error or c.id in ("tied_embedding", "routed_experts",  # refused after the forward
                                                    "parent_uses_child_weight")]


def fused_step(model, inputs, labels, extra=None, required=True):
    """(grads, norms, fused layers) of the mean loss (+ ``extra(model)``) from the fused backward,
    and autograd's gradients of the same loss."""
    target = getattr(model, "_orig_mod", model)
    params = [p for p in target.parameters() if p.requires_grad]
    capture = Capture(model, strict=False)
    with capture, torch.enable_grad():
        capture.start()
        out = capture.model(*inputs)
        capture.stop()
        losses = per_example_losses(out, labels)
        loss = losses.mean() + (extra(target) if extra else 0)
        capture.find_batch_dims(losses)
        fused = fused_layers(capture, params, leaf_uses(loss))
        grads, norms = backward_with_norms(capture, loss, params, N, scale=float(N), retain_graph=True,
                                           norms_required=required)
        want = torch.autograd.grad(loss, params, allow_unused=True)
    return grads, norms, fused, want


def assert_same_grads(grads, want):
    for g, w in zip(grads, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", RUNS, ids=[c.id for c in RUNS])
def test_gradients_and_norms(case):
    model, inputs, labels = build(case)
    grads, norms, _, want = fused_step(model, inputs, labels, required=not case.error)
    assert_same_grads(grads, want)
    if case.error:
        assert norms is None
        return
    expected = oracle(case, model, inputs, labels)
    assert set(norms) == {k for k, v in expected.items() if v.any()}
    for k, v in norms.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("case_id,fused", [
    ("mlp", ["0", "2"]),  # layer 0's output, modified in place by ReLU(inplace=True) since, too
    ("cnn_groupnorm", ["0", "3", "6"]),
    ("conv_reflect_padding", ["2"]),  # reflect padding has no rule: the exact fallback
    ("conv_transpose", ["4"]),
    ("bitfit", ["0", "2"]),
    ("transformer_seq_first", ["head"]),  # the attention runs with the examples on dim 1, the head on dim 0
    ("parent_uses_child_weight", []),
])
def test_which_layers_are_fused(case_id, fused):
    model, inputs, labels = build(CASES_BY_ID[case_id])
    _, _, layers, _ = fused_step(model, inputs, labels, required=False)
    prefix = {m: name for name, m in getattr(model, "_orig_mod", model).named_modules()}
    assert sorted(prefix[m] for m in layers) == fused


def test_a_weight_used_outside_its_layer_is_not_fused():
    """A regularizer on a weight reaches it by a second graph edge: that layer keeps autograd's
    path, and the gradient includes the regularizer's part."""
    model, inputs, labels = build(CASES_BY_ID["cnn_groupnorm"])
    grads, _, layers, want = fused_step(model, inputs, labels, extra=lambda m: 0.1 * m[0].weight.square().sum())
    assert model[0] not in layers and model[3] in layers
    assert_same_grads(grads, want)


def test_autocast_layers_keep_autograd():
    """Under autocast the layer's input is bfloat16 and its weight float32: not fused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x, labels = torch.randn(N, 6), torch.randint(4, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads, norms, layers, want = fused_step(model, (x,), labels)
    assert not layers
    assert_same_grads(grads, want)


def test_float32_conv_net_on_the_compiled_kernels():
    """float32 at sizes where the CPU's fused kernel runs (several threads' partial sums)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(32 * 64, 10))
    x, labels = torch.randn(N, 8, 8, 8), torch.randint(10, (N,))
    grads, norms, layers, want = fused_step(model, (x,), labels)
    assert len(layers) == 3
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    model64 = model.double()
    _, norms64, _, _ = fused_step(model64, (x.double(),), labels)
    for k in norms64:
        torch.testing.assert_close(norms[k].double(), norms64[k], rtol=1e-4, atol=0)


class _Probe(torch.autograd.Function):
    """Identity whose backward calls ``check()``: a look at what is alive at that point of a backward."""

    @staticmethod
    def forward(ctx, x, check):
        ctx.check = check
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.check()
        return g, None


def test_output_gradients_are_freed_as_the_backward_goes():
    """Each layer's output gradient is used inside the backward (fused gradients and norms, or
    another rule's norms) and freed there, as a plain backward frees it: by the time the backward
    reaches the first layer, the later layers' output gradients are gone. The gradients and norms
    are still exact, with the first layer (whose node autograd would not run) fused too."""
    torch.manual_seed(0)
    seen: list = []
    alive: list = []
    probe = nn.Module()

    def check():  # the gradients seen in this backward, so far
        alive.append([r() is not None for r in seen])
        seen.clear()

    probe.forward = lambda x: _Probe.apply(x, check)
    model = nn.Sequential(nn.Linear(6, 8), probe, nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh(),
                          nn.Linear(8, 4)).double()

    def watch(module, args, out):  # after the capture's own hooks: they see the same gradient
        out.register_hook(lambda g: seen.append(weakref.ref(g)))

    for layer in (model[3], model[4], model[6]):
        layer.register_forward_hook(watch)
    x, labels = torch.randn(N, 6, dtype=torch.float64), torch.randint(4, (N,))
    grads, norms, layers, want = fused_step(model, (x,), labels)
    assert set(layers) == {model[0], model[3], model[6]}
    assert alive[-2] == [False, False, False]  # the fused backward's (then the reference's)
    assert_same_grads(grads, want)
    params = dict(model.named_parameters())
    for n in range(N):  # the oracle: each example's own backward
        got = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), labels[n:n + 1]), list(params.values()))
        for (name, _), g in zip(params.items(), got):
            torch.testing.assert_close(norms[name][n], g.square().sum(), rtol=1e-10, atol=0, msg=name)


# ---- FisherTraceMonitor.backward: the training backward with the empirical Fisher's Tr(F) ----------

import copy  # noqa: E402

import fisher_ext  # noqa: E402
from training_setup import batches, relu_cnn, signals  # noqa: E402

MONITORED = [c for c in CASES if not c.error]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", MONITORED, ids=[c.id for c in MONITORED])
def test_monitor_backward(case, reduction):
    """.grad is the plain backward's, the norms the oracle's (each example's own loss)."""
    model, inputs, labels = build(case)
    twin = copy.deepcopy(getattr(model, "_orig_mod", model))
    monitor = fisher_ext.FisherTraceMonitor(model)
    with monitor.watch():
        out = model(*inputs)
    result = monitor.backward(per_example_losses(out, labels), reduction=reduction)
    losses = per_example_losses(twin(*inputs), labels)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    target = getattr(model, "_orig_mod", model)
    for (name, p), q in zip(target.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    want = oracle(case, model, inputs, labels)
    torch.testing.assert_close(result.per_example.double(), sum(want.values()), rtol=1e-9, atol=1e-12)
    assert set(result.coverage) == set(want)


def test_monitor_backward_reaches_tensors_outside_the_model_and_skips_steps():
    model, inputs, labels = build(CASES_BY_ID["cnn_groupnorm"])
    temperature = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    monitor = fisher_ext.FisherTraceMonitor(model, every=2)
    results = []
    for _ in range(2):
        with monitor.watch():
            out = model(*inputs)
        results.append(monitor.backward(per_example_losses(out / temperature, labels)))
    assert results[0] is not None and results[1] is None
    twin_t = temperature.detach().clone().requires_grad_()
    per_example_losses(model(*inputs) / twin_t, labels).mean().backward()
    torch.testing.assert_close(temperature.grad, 2 * twin_t.grad)
    assert [step for step, _ in monitor.history] == [0]


def test_monitor_backward_refuses_bad_input():
    model, inputs, labels = build(CASES_BY_ID["mlp"])
    monitor = fisher_ext.FisherTraceMonitor(model)
    with pytest.raises(RuntimeError, match="no watched forward"):
        monitor.backward(per_example_losses(model(*inputs), labels))
    with monitor.watch():
        out = model(*inputs)
    losses = per_example_losses(out, labels)
    with pytest.raises(ValueError, match="reduction: expected 'mean' or 'sum', got 'none'"):
        monitor.backward(losses, reduction="none")
    with pytest.raises(ValueError, match=r"losses: expected the \(N,\) per-example losses.*got shape \(\)"):
        monitor.backward(losses.mean())
    with pytest.raises(ValueError, match="not requiring grad"):
        monitor.backward(losses.detach())


def test_monitor_backward_over_a_training_run():
    """float32 training from initialization with the monitor's backward: every step's Tr(F)
    is the empirical Fisher's of the independent path (fisher_trace on a copy), and the run
    follows the plain run's trajectory."""
    x, y = signals(600, seed=0)
    model, plain = relu_cnn(0), relu_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    monitor = fisher_ext.FisherTraceMonitor(model)
    for xb, yb in batches(x, y, 64, 60, seed=0):
        want = fisher_ext.fisher_trace(copy.deepcopy(model), xb, estimator="empirical", labels=yb)
        opt.zero_grad()
        with monitor.watch():
            out = model(xb)
        result = monitor.backward(F.cross_entropy(out, yb, reduction="none"))
        torch.testing.assert_close(result.per_example, want.per_example, rtol=1e-4, atol=1e-7)
        opt.step()
        opt_plain.zero_grad()
        F.cross_entropy(plain(xb), yb).backward()
        opt_plain.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_monitor_backward_refuses_what_gives_no_per_example_norms():
    model, inputs, labels = build(CASES_BY_ID["cnn_groupnorm"])
    monitor = fisher_ext.FisherTraceMonitor(model)
    with monitor.watch():
        model(*inputs)
    with pytest.raises(ValueError, match="do not depend on it .a forward run outside"):
        monitor.backward(per_example_losses(model(*inputs), labels))
    with monitor.watch():
        out = model(*inputs)
    with pytest.raises(ValueError, match=r"read the parameter 0\.weight outside the model's forward"):
        monitor.backward(per_example_losses(out, labels) + 1e-3 * model[0].weight.square().sum())
    assert all(p.grad is None for p in model.parameters())  # refused before any backward
    with monitor.watch():
        out = model(*inputs)
    losses = per_example_losses(out, labels)
    with pytest.raises(ValueError, match=r"no per-example norms .*\.grad holds this step's gradient"):
        monitor.backward(losses - 0.5 * losses.mean())  # every loss mixes all examples
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    losses = per_example_losses(twin(*inputs), labels)
    (losses - 0.5 * losses.mean()).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("report_trace", [True, False])
def test_finite_difference_with_weight_decay_in_the_loss(report_trace):
    """A loss that reads the model's weights outside the forward: the shifted pass runs on other
    tensors, so that term's gradient must be taken at the parameters themselves."""
    model, inputs, labels = build(CASES_BY_ID["cnn_groupnorm"])
    twin = copy.deepcopy(model)
    penalty = fisher_ext.FisherPenalty(model, 0.5, method="finite_difference", check_every=0,
                                       report_trace=report_trace)

    def loss(m):
        return lambda out: F.cross_entropy(out, labels) + 0.1 * m[0].weight.square().sum()

    _, result = penalty.backward(inputs, loss(model))
    params = list(twin.parameters())
    out = twin(*inputs)
    gbar = torch.autograd.grad(F.cross_entropy(out, result.labels), params, create_graph=True)
    total = loss(twin)(out) + 0.5 * sum(g.square().sum() for g in gbar)
    want = torch.cat([w.flatten() for w in torch.autograd.grad(total, params)])
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((got - want).norm() / want.norm()) < 1e-5  # the finite difference's own error: ~1e-7


def test_penalty_refuses_a_loss_that_trains_tensors_outside_the_model():
    model, inputs, labels = build(CASES_BY_ID["mlp"])
    temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for method in ("finite_difference", "double_backward"):
        penalty = fisher_ext.FisherPenalty(model, 0.5, method=method)
        with pytest.raises(ValueError, match=r"loss: trains 1 tensor\(s\) outside the model \(shapes \(\)\)"):
            penalty.backward(inputs, lambda out: F.cross_entropy(out / temperature, labels))
