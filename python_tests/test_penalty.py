"""Fisher Penalty gradients against a float64 autograd oracle built by hand with create_graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisher_ext
from fisher_ext.likelihoods import Categorical


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def cnn(norm):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 4))


MODELS = {
    "mlp": (mlp, (8, 6)),
    "cnn_batchnorm_train": (lambda: cnn(nn.BatchNorm2d), (8, 3, 6, 6)),
    "cnn_groupnorm": (lambda: cnn(lambda c: nn.GroupNorm(2, c)), (8, 3, 6, 6)),
}


def build(name, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = Categorical().sample(model(x), torch.Generator().manual_seed(1))
    return model, x, y


def oracle(model, x, y, alpha):
    """(alpha ||gbar||^2, its gradient) by autograd.grad(create_graph=True) on a copy of the model."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    gbar = torch.autograd.grad(loss, params, create_graph=True)
    value = alpha * sum(g.square().sum() for g in gbar)
    return value.item(), [g.detach() for g in torch.autograd.grad(value, params)]


@pytest.mark.parametrize("name", list(MODELS))
def test_double_backward_is_exact(name):
    model, x, y = build(name)
    value, want = oracle(model, x, y, alpha=0.3)
    for p in model.parameters():  # the penalty adds on top of what the user's loss put there
        p.grad = torch.ones_like(p)
    result = fisher_ext.FisherPenalty(model, 0.3).backward(x, labels=y)
    assert result.value == pytest.approx(value, rel=1e-10)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad - 1, w, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_finite_difference_within_its_bound(name):
    model, x, y = build(name)
    _, want = oracle(model, x, y, alpha=0.3)
    before = [p.detach().clone() for p in model.parameters()]
    fisher_ext.FisherPenalty(model, 0.3, method="finite_difference").backward(x, labels=y)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = torch.cat([w.flatten() for w in want])
    # float64 with r ~ 1e-6 (1 + ||theta||) / sqrt(P): truncation O(r) relative
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # parameters restored bit for bit


def test_free_trace_equals_the_monitor():
    model, x, y = build("mlp")
    result = fisher_ext.FisherPenalty(model, 1.0).backward(x, labels=y)
    want = fisher_ext.fisher_trace(model, x, labels=y)
    assert result.trace == pytest.approx(want.trace, rel=1e-9)
    torch.testing.assert_close(result.per_example.double(), want.per_example.double(), rtol=1e-9, atol=0)
    # E||gbar||^2 ~ Tr(F)/B: here only checked for consistency of the two reported numbers
    gbar = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert result.gbar_sqnorm == pytest.approx(float(sum(g.square().sum() for g in gbar)), rel=1e-10)


def test_report_trace_off_leaves_the_model_unhooked():
    model, x, y = build("mlp")
    twin = copy.deepcopy(model)
    fisher_ext.FisherPenalty(model, 1.0).backward(x, labels=y)
    penalty = fisher_ext.FisherPenalty(twin, 1.0, report_trace=False)
    calls = []
    twin.register_forward_hook(lambda *a: calls.append(len(twin._forward_hooks)))
    result = penalty.backward(x, labels=y)
    assert result.trace is None and result.per_example is None and calls == [1]  # only the test's hook
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


def test_batchnorm_train_has_no_free_trace_but_a_penalty():
    model, x, y = build("cnn_batchnorm_train")
    result = fisher_ext.FisherPenalty(model, 1.0).backward(x, labels=y)
    assert result.trace is None and result.value > 0


def test_hygiene_batchnorm_stats_mode_and_rng():
    model, x, y = build("cnn_batchnorm_train")
    stats = [b.clone() for b in model[1].buffers()]
    torch.manual_seed(5)
    fisher_ext.FisherPenalty(model, 1.0, method="finite_difference").backward(x, labels=y)
    after_penalty = torch.rand(3)
    torch.manual_seed(5)
    model(x)  # one ordinary forward advances the random stream as much (no dropout here: not at all)
    assert torch.equal(torch.rand(3), after_penalty)
    with torch.no_grad():
        for b, s in zip(model[1].buffers(), stats):
            b.copy_(s)
    model.eval()
    fisher_ext.FisherPenalty(model, 1.0).backward(x, labels=y)
    assert not model.training
    for b, s in zip(model[1].buffers(), stats):
        assert torch.equal(b, s)


def test_finite_difference_replays_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.arange(8) % 4
    twin = copy.deepcopy(model)
    torch.manual_seed(7)
    fisher_ext.FisherPenalty(model, 1.0).backward(x, labels=y)
    torch.manual_seed(7)
    fisher_ext.FisherPenalty(twin, 1.0, method="finite_difference").backward(x, labels=y)
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    fd = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert ((fd - exact).norm() / exact.norm()).item() < 1e-4  # different masks would be O(1) off


def test_every_k_steps():
    model, x, y = build("mlp")
    penalty = fisher_ext.FisherPenalty(model, 1.0, every=3)
    results = [penalty.backward(x, labels=y) for _ in range(4)]
    assert [r is None for r in results] == [False, True, True, False]


def test_penalty_lowers_the_trace_in_training():
    def train(alpha):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 5))
        x, y = torch.randn(64, 10), torch.randint(0, 5, (64,))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        penalty = fisher_ext.FisherPenalty(model, alpha, generator=torch.Generator().manual_seed(0))
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if alpha:
                penalty.backward(x)
            opt.step()
        return fisher_ext.fisher_trace(model, x, estimator="exact").trace

    assert train(alpha=1.0) < 0.8 * train(alpha=0.0)


def test_errors():
    model = mlp()
    with pytest.raises(ValueError, match="alpha: expected a number >= 0"):
        fisher_ext.FisherPenalty(model, -1.0)
    with pytest.raises(ValueError, match="every: expected an int >= 1"):
        fisher_ext.FisherPenalty(model, 1.0, every=0)
    with pytest.raises(ValueError, match="method: expected one of"):
        fisher_ext.FisherPenalty(model, 1.0, method="adjoint")
    with pytest.raises(ValueError, match="model: expected at least one trainable parameter"):
        fisher_ext.FisherPenalty(mlp().requires_grad_(False), 1.0)
    with pytest.raises(ValueError, match=r"output: expected logits"):
        fisher_ext.FisherPenalty(nn.Sequential(nn.Linear(6, 4), nn.Flatten(0)), 1.0).backward(torch.randn(3, 6))


@pytest.mark.parametrize("name", ["mlp", "cnn_groupnorm"])
def test_trace_mode_is_exact(name):
    """mode='trace': alpha (1/B) sum_i ||g_i||^2 differentiated through the per-example-norm ops."""
    model, x, y = build(name)
    oracle_model = copy.deepcopy(model)
    params = list(oracle_model.parameters())
    value = 0.0
    for n in range(x.shape[0]):  # oracle: each example's gradient with create_graph
        g = torch.autograd.grad(F.cross_entropy(oracle_model(x[n:n + 1]), y[n:n + 1], reduction="sum"), params,
                                create_graph=True)
        value = value + sum(gi.square().sum() for gi in g)
    value = 0.5 * value / x.shape[0]
    want = torch.autograd.grad(value, params)
    result = fisher_ext.FisherPenalty(model, 0.5, mode="trace").backward(x, labels=y)
    assert result.value == pytest.approx(value.item(), rel=1e-9)
    assert result.trace == pytest.approx(value.item() / 0.5, rel=1e-9)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-12)


def test_trace_mode_errors():
    with pytest.raises(ValueError, match="method: mode='trace' is differentiated exactly"):
        fisher_ext.FisherPenalty(mlp(), 1.0, mode="trace", method="finite_difference")
    with pytest.raises(ValueError, match="mode: expected one of"):
        fisher_ext.FisherPenalty(mlp(), 1.0, mode="layerwise")


@pytest.mark.parametrize("report_trace", [True, False])
@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_from_output_reuses_the_training_forward(method, report_trace):
    model, x, y = build("cnn_batchnorm_train")
    twin = copy.deepcopy(model)
    true = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    _, want = oracle(model, x, y, alpha=0.3)
    penalty = fisher_ext.FisherPenalty(model, 0.3, method=method, report_trace=report_trace)
    with penalty.watch():
        out = model(x)
    result = penalty.from_output(out, labels=y)
    F.cross_entropy(out, true).backward()  # the caller's own backward still works
    F.cross_entropy(twin(x), true).backward()
    got = torch.cat([(p.grad - q.grad).flatten() for p, q in zip(model.parameters(), twin.parameters())])
    ref = torch.cat([w.flatten() for w in want])
    assert ((got - ref).norm() / ref.norm()).item() < (1e-4 if method == "finite_difference" else 1e-9)
    for b, c in zip(model.buffers(), twin.buffers()):  # statistics updated once, by the caller's forward
        assert torch.equal(b, c)
    assert result.value > 0
    with pytest.raises(RuntimeError, match="no watched forward"):
        penalty.from_output(out)


@pytest.mark.parametrize("mode", ["batch", "trace"])
def test_penalty_term_in_one_backward(mode):
    model, x, y = build("mlp")
    twin = copy.deepcopy(model)
    true = torch.arange(8) % 4
    a = fisher_ext.FisherPenalty(model, 0.2, mode=mode)
    with a.watch():
        out = model(x)
    term = a.penalty_term(out, labels=y)
    (F.cross_entropy(out, true) + term).backward()
    b = fisher_ext.FisherPenalty(twin, 0.2, mode=mode)
    F.cross_entropy(twin(x), true).backward()
    b.backward(x, labels=y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert a.last_result.value == pytest.approx(b.last_result.value, rel=1e-12)
    with pytest.raises(ValueError, match="penalty_term differentiates the penalty"):
        fisher_ext.FisherPenalty(model, 0.2, method="finite_difference").penalty_term(out)


def test_gradient_penalty_baselines():
    """GP (true labels), GPr (random labels) and GPx (input gradients) under the same interface."""
    model, x, _ = build("mlp")
    true = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    _, want = oracle(model, x, true, alpha=0.4)
    gp = copy.deepcopy(model)
    fisher_ext.FisherPenalty(gp, 0.4, target="true").backward(x, labels=true)
    for p, w in zip(gp.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="labels: target='true'"):
        fisher_ext.FisherPenalty(gp, 0.4, target="true").backward(x)

    gpr = copy.deepcopy(model)
    fisher_ext.FisherPenalty(gpr, 0.4, target="random", generator=torch.Generator().manual_seed(3)).backward(x)
    random = torch.randint(4, (8,), generator=torch.Generator().manual_seed(3))
    _, want = oracle(model, x, random, alpha=0.4)
    for p, w in zip(gpr.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-12)

    gpx = copy.deepcopy(model)
    result = fisher_ext.FisherPenalty(gpx, 0.4, mode="input").backward(x, labels=true)
    ref = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(F.cross_entropy(ref(xr), true, reduction="sum"), xr, create_graph=True)
    value = 0.4 * gx.square().sum() / 8
    want = torch.autograd.grad(value, list(ref.parameters()))
    assert result.value == pytest.approx(value.item(), rel=1e-10)
    for p, w in zip(gpx.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="mode: 'input' \\(GPx\\)"):
        fisher_ext.FisherPenalty(gpx, 0.4, mode="input").from_output(torch.zeros(2, 4))


def training_gradient(model, x, labels, at=None):
    """float64 gradient of the cross-entropy with the given labels, at the model's parameters or ``at``."""
    params = dict(model.named_parameters()) if at is None else at
    out = torch.func.functional_call(model, params, (x,)) if at is not None else model(x)
    return torch.autograd.grad(F.cross_entropy(out, labels), list(params.values()))


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_backward_with_loss_is_the_whole_step(name, method):
    """Training loss + penalty from one call: the sum of the two gradients (the oracle's), the
    training loss at theta, and BatchNorm statistics updated once, as by a plain forward."""
    model, x, y = build(name)
    true = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    twin = copy.deepcopy(model)
    _, penalty_grad = oracle(model, x, y, alpha=0.3)
    want_loss = F.cross_entropy(twin(x), true)  # a plain forward: the statistics' reference
    train_grad = training_gradient(copy.deepcopy(model), x, true)
    loss, result = fisher_ext.FisherPenalty(model, 0.3, method=method).backward_with_loss(
        x, lambda out: F.cross_entropy(out, true), labels=y)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12) and not loss.requires_grad
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = torch.cat([(t + w).flatten() for t, w in zip(train_grad, penalty_grad)])
    # float64: exact to rounding; the fused finite difference within its O(r) bound (r ~ 1e-6 here)
    assert ((got - ref).norm() / ref.norm()).item() < (1e-4 if method == "finite_difference" else 1e-10)
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)
    assert result.value > 0


def test_fused_finite_difference_error_is_r_H_train_v():
    """The documented price of the fused form: the training gradient is taken at theta + r v,
    so it differs from the unfused one by r H_train v + O(r^2)."""
    model, x, y = build("cnn_groupnorm")
    true = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    r = 1e-3
    fused, unfused = copy.deepcopy(model), copy.deepcopy(model)
    fisher_ext.FisherPenalty(fused, 0.3, method="finite_difference", radius=r).backward_with_loss(
        x, lambda out: F.cross_entropy(out, true), labels=y)
    F.cross_entropy(unfused(x), true).backward()
    fisher_ext.FisherPenalty(unfused, 0.3, method="finite_difference", radius=r).backward(x, labels=y)
    diff = torch.cat([(p.grad - q.grad).flatten() for p, q in zip(fused.parameters(), unfused.parameters())])
    # oracle: r H_train v with v = gbar / ||gbar||, by double backward in float64
    params = list(model.parameters())
    gbar = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    norm = torch.cat([g.flatten() for g in gbar]).norm()
    g_train = torch.autograd.grad(F.cross_entropy(model(x), true), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(g_train, gbar)), params)
    want = torch.cat([h.flatten() for h in hv]) * (r / norm)
    assert ((diff - want).norm() / want.norm()).item() < 1e-2  # the O(r^2) rest, relative O(r)
    assert want.norm() > 1e-3 * torch.cat([g.flatten() for g in g_train]).norm()  # the check has teeth


@pytest.mark.parametrize("mode", ["trace", "input"])
def test_backward_with_loss_in_the_other_modes(mode):
    model, x, y = build("mlp")
    true = torch.arange(8) % 4
    twin = copy.deepcopy(model)
    fisher_ext.FisherPenalty(model, 0.2, mode=mode).backward_with_loss(x, lambda o: F.cross_entropy(o, true),
                                                                       labels=y)
    F.cross_entropy(twin(x), true).backward()
    fisher_ext.FisherPenalty(twin, 0.2, mode=mode).backward(x, labels=y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_backward_with_loss_skipped_steps_and_errors():
    model, x, y = build("mlp")
    penalty = fisher_ext.FisherPenalty(model, 0.2, every=2)
    penalty.backward_with_loss(x, lambda o: F.cross_entropy(o, y))
    model.zero_grad()
    loss, result = penalty.backward_with_loss(x, lambda o: F.cross_entropy(o, y))
    assert result is None
    want = training_gradient(copy.deepcopy(model), x, y)
    for p, w in zip(model.parameters(), want):  # a plain step: the training gradient alone
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="loss: expected a callable"):
        penalty.backward_with_loss(x, F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"loss: expected the callable to return a scalar tensor.*shape \(8,\)"):
        penalty.backward_with_loss(x, lambda o: F.cross_entropy(o, y, reduction="none"))
