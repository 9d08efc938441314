"""Fisher Penalty steps at one point, in float64, against python_tests/oracle.py (autograd with
create_graph on a copy of the model); misuse and bad input. Whole training runs in float32 are
in test_penalty_training.py."""

from __future__ import annotations

import copy
import math
import warnings

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisher_ext
from fisher_ext.likelihoods import Categorical
from oracle import flat, penalty_gradients


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
TRUE = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])


def build(name, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = Categorical().sample(model(x), torch.Generator().manual_seed(1))
    return model, x, y


def ce(labels):
    return lambda out: F.cross_entropy(out, labels)


def grads(model):
    return flat([p.grad for p in model.parameters()])


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_whole_step(name, method):
    """backward(x, loss): the training gradient plus the penalty's, the training loss at theta,
    the labels it used returned, BatchNorm statistics updated once (as by a plain forward)."""
    model, x, y = build(name)
    twin = copy.deepcopy(model)
    value, penalty, train = penalty_gradients(model, x, y, 0.3, TRUE)
    want_loss = F.cross_entropy(twin(x), TRUE)  # a plain forward: the statistics' reference
    for p in model.parameters():  # the step adds on top of what is in .grad
        p.grad = torch.ones_like(p)
    loss, result = fisher_ext.FisherPenalty(model, 0.3, method=method).backward(x, ce(TRUE), labels=y)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12) and not loss.requires_grad
    assert result.value == pytest.approx(value, rel=1e-12) and torch.equal(result.labels, y)
    assert result.method == method
    # float64: exact to rounding; the finite difference within its O(r) bound, r ~ 1e-6 (1 + ||theta||) / sqrt(P)
    # (achieved: 3e-8 to 2e-7)
    assert relative(grads(model) - 1, flat(train) + flat(penalty)) < (1e-6 if method == "finite_difference"
                                                                      else 1e-12)
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)


def test_fused_finite_difference_error_is_r_H_train_v():
    """The documented price of the fused form: the training gradient is taken at theta + r v, an
    error of r H_train v + O(r^2). A tiny alpha leaves that error alone in the step's gradient."""
    model, x, y = build("cnn_groupnorm")
    r, alpha = 1e-3, 1e-9
    _, penalty, train = penalty_gradients(model, x, y, alpha, TRUE)
    fused = copy.deepcopy(model)
    fisher_ext.FisherPenalty(fused, alpha, method="finite_difference", radius=r).backward(x, ce(TRUE), labels=y)
    diff = grads(fused) - flat(train) - flat(penalty)
    params = list(model.parameters())  # oracle: r H_train v with v = gbar / ||gbar||, by double backward
    gbar = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    g_train = torch.autograd.grad(F.cross_entropy(model(x), TRUE), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(g_train, gbar)), params)
    want = flat(hv) * (r / flat(gbar).norm())
    assert relative(diff, want) < 1e-2  # the O(r^2) rest, relative O(r) (achieved: 2e-3)
    assert want.norm() > 1e-3 * flat(g_train).norm()  # the check has teeth


def test_penalty_term_equals_the_whole_step():
    model, x, y = build("cnn_groupnorm")
    twin = copy.deepcopy(model)
    penalty = fisher_ext.FisherPenalty(model, 0.2)
    with penalty.watch():
        out = model(x)
    term = penalty.penalty_term(out, labels=y)
    (F.cross_entropy(out, TRUE) + term).backward()
    _, result = fisher_ext.FisherPenalty(twin, 0.2).backward(x, ce(TRUE), labels=y)
    torch.testing.assert_close(grads(model), grads(twin), rtol=1e-10, atol=1e-13)
    assert penalty.last_result.value == pytest.approx(result.value, rel=1e-12)
    assert penalty.last_result.trace == pytest.approx(result.trace, rel=1e-10)


def test_free_trace_equals_the_monitor():
    model, x, y = build("mlp")
    _, result = fisher_ext.FisherPenalty(model, 1.0).backward(x, ce(TRUE), labels=y)
    want = fisher_ext.fisher_trace(model, x, labels=y)
    assert result.trace == pytest.approx(want.trace, rel=1e-9)
    torch.testing.assert_close(result.per_example.double(), want.per_example.double(), rtol=1e-9, atol=0)
    gbar = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert result.gbar_sqnorm == pytest.approx(float(flat(gbar).square().sum()), rel=1e-10)


def test_report_trace_off_leaves_the_model_unhooked():
    model, x, y = build("mlp")
    twin = copy.deepcopy(model)
    fisher_ext.FisherPenalty(model, 1.0).backward(x, ce(TRUE), labels=y)
    calls = []
    twin.register_forward_hook(lambda *a: calls.append(len(twin._forward_hooks)))
    _, result = fisher_ext.FisherPenalty(twin, 1.0, report_trace=False).backward(x, ce(TRUE), labels=y)
    assert result.trace is None and result.per_example is None and calls == [1]  # only the test's hook
    torch.testing.assert_close(grads(model), grads(twin), rtol=1e-12, atol=0)


def test_batchnorm_train_has_no_free_trace_but_a_penalty():
    model, x, y = build("cnn_batchnorm_train")
    _, result = fisher_ext.FisherPenalty(model, 1.0).backward(x, ce(TRUE), labels=y)
    assert result.trace is None and result.value > 0


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_the_run_is_not_disturbed(method):
    """Labels come from the penalty's own generator: the global random stream advances exactly as
    in a plain step, dropout masks included; train/eval mode is left as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    twin = copy.deepcopy(model)
    torch.manual_seed(7)
    fisher_ext.FisherPenalty(model, 1.0, method=method).backward(x, ce(TRUE))
    after_penalty = torch.rand(3)
    torch.manual_seed(7)
    F.cross_entropy(twin(x), TRUE).backward()
    assert torch.equal(torch.rand(3), after_penalty)
    assert model.training


def test_labels_are_reproducible_per_seed():
    model, x, _ = build("mlp")

    def labels(seed, **kwargs):
        torch.manual_seed(seed)
        penalty = fisher_ext.FisherPenalty(copy.deepcopy(model), 1.0, **kwargs)
        return [penalty.backward(x, ce(TRUE))[1].labels for _ in range(2)]

    a, b, c = labels(0), labels(0), labels(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])
    mine = labels(0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(mine[0], a[0])


def test_finite_difference_replays_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.arange(8) % 4
    twin = copy.deepcopy(model)
    torch.manual_seed(7)
    fisher_ext.FisherPenalty(model, 1.0).backward(x, ce(TRUE), labels=y)
    torch.manual_seed(7)
    fisher_ext.FisherPenalty(twin, 1.0, method="finite_difference").backward(x, ce(TRUE), labels=y)
    assert relative(grads(twin), grads(model)) < 1e-6  # other masks would be O(1) off


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_parameters_without_a_gradient_keep_their_grad(method):
    """As in a plain step: a parameter the loss does not reach keeps .grad as it was (None stays None)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(6, 4), "unused": nn.Linear(6, 4)}).double()
    model.forward = lambda inp: model["used"](inp)
    x = torch.randn(8, 6, dtype=torch.float64)
    model["unused"].bias.grad = torch.full((4,), 3.0, dtype=torch.float64)
    fisher_ext.FisherPenalty(model, 1.0, method=method).backward(x, ce(TRUE))
    assert model["unused"].weight.grad is None
    assert torch.equal(model["unused"].bias.grad, torch.full((4,), 3.0, dtype=torch.float64))
    assert model["used"].weight.grad is not None


def test_every_k_steps():
    model, x, y = build("mlp")
    penalty = fisher_ext.FisherPenalty(model, 1.0, every=3)
    results = [penalty.backward(x, ce(TRUE), labels=y)[1] for _ in range(4)]
    assert [r is None for r in results] == [False, True, True, False]
    model.zero_grad()
    penalty.backward(x, ce(TRUE))  # step 5: a plain step, the training gradient alone
    _, _, train = penalty_gradients(model, x, y, 1.0, TRUE)
    torch.testing.assert_close(grads(model), flat(train), rtol=1e-12, atol=0)
    with penalty.watch():
        out = model(x)
    term = penalty.penalty_term(out)  # step 6: skipped, a zero without a graph
    assert term.item() == 0 and not term.requires_grad and penalty.last_result is None


@pytest.mark.parametrize("name", ["mlp", "cnn_groupnorm"])
def test_trace_objective_is_exact(name):
    """objective='trace': alpha (1/B) sum_i ||g_i||^2 differentiated through the per-example-norm ops."""
    model, x, y = build(name)
    oracle_model = copy.deepcopy(model)
    params = list(oracle_model.parameters())
    value = 0.0
    for n in range(x.shape[0]):  # oracle: each example's gradient with create_graph
        g = torch.autograd.grad(F.cross_entropy(oracle_model(x[n:n + 1]), y[n:n + 1], reduction="sum"), params,
                                create_graph=True)
        value = value + sum(gi.square().sum() for gi in g)
    value = 0.5 * value / x.shape[0]
    want = torch.autograd.grad(value + F.cross_entropy(oracle_model(x), TRUE), params)
    _, result = fisher_ext.FisherPenalty(model, 0.5, objective="trace").backward(x, ce(TRUE), labels=y)
    assert result.value == pytest.approx(value.item(), rel=1e-9)
    assert result.trace == pytest.approx(value.item() / 0.5, rel=1e-9)
    assert math.isnan(result.gbar_sqnorm)
    torch.testing.assert_close(grads(model), flat(want), rtol=1e-9, atol=1e-13)


def test_gradient_penalty_baselines():
    """GP (true labels), GPr (random labels) and GPx (input gradients) as named constructors."""
    model, x, _ = build("mlp")
    gp = copy.deepcopy(model)
    fisher_ext.FisherPenalty.gp(gp, 0.4).backward(x, ce(TRUE), labels=TRUE)
    _, penalty, train = penalty_gradients(model, x, TRUE, 0.4, TRUE)
    torch.testing.assert_close(grads(gp), flat(train) + flat(penalty), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="labels: the GP penalty"):
        fisher_ext.FisherPenalty.gp(gp, 0.4).backward(x, ce(TRUE))

    gpr = copy.deepcopy(model)
    _, result = fisher_ext.FisherPenalty.gpr(gpr, 0.4, generator=torch.Generator().manual_seed(3)).backward(
        x, ce(TRUE))
    random = torch.randint(4, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(result.labels, random)
    _, penalty, train = penalty_gradients(model, x, random, 0.4, TRUE)
    torch.testing.assert_close(grads(gpr), flat(train) + flat(penalty), rtol=1e-10, atol=1e-13)

    gpx = copy.deepcopy(model)
    _, result = fisher_ext.FisherPenalty.gpx(gpx, 0.4).backward(x, ce(TRUE), labels=TRUE)
    ref = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (gx,) = torch.autograd.grad(F.cross_entropy(out, TRUE, reduction="sum"), xr, create_graph=True)
    value = 0.4 * gx.square().sum() / 8
    want = torch.autograd.grad(value + F.cross_entropy(out, TRUE), list(ref.parameters()))
    assert result.value == pytest.approx(value.item(), rel=1e-10)
    torch.testing.assert_close(grads(gpx), flat(want), rtol=1e-10, atol=1e-13)


def test_constructor_errors():
    model = mlp()
    for alpha in (-1.0, float("nan"), float("inf"), True, "0.1", torch.ones(2)):
        with pytest.raises(ValueError, match="alpha: expected a finite real number >= 0"):
            fisher_ext.FisherPenalty(model, alpha)
    for alpha, want in ((numpy.float32(0.5), 0.5), (torch.tensor(0.5), 0.5), (1, 1.0)):
        assert fisher_ext.FisherPenalty(model, alpha).alpha == want
    with pytest.raises(ValueError, match="every: expected an int >= 1"):
        fisher_ext.FisherPenalty(model, 1.0, every=0)
    with pytest.raises(ValueError, match="method: expected one of"):
        fisher_ext.FisherPenalty(model, 1.0, method="adjoint")
    with pytest.raises(ValueError, match="objective: expected one of"):
        fisher_ext.FisherPenalty(model, 1.0, objective="layerwise")
    for objective in ("trace", "gpx"):
        with pytest.raises(ValueError, match=f"method: objective '{objective}' is differentiated by"):
            fisher_ext.FisherPenalty(model, 1.0, objective=objective, method="finite_difference")
    with pytest.raises(ValueError, match="radius: expected a finite number > 0"):
        fisher_ext.FisherPenalty(model, 1.0, radius=0.0)
    with pytest.raises(ValueError, match="check_every: expected an int >= 0"):
        fisher_ext.FisherPenalty(model, 1.0, check_every=-1)
    with pytest.raises(ValueError, match="model: expected at least one trainable parameter"):
        fisher_ext.FisherPenalty(mlp().requires_grad_(False), 1.0)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fisher_ext.FisherPenalty(lambda t: t, 1.0)


def test_call_errors():
    model, x, y = build("mlp")
    penalty = fisher_ext.FisherPenalty(model, 0.2)
    with pytest.raises(TypeError, match="loss: expected a callable"):
        penalty.backward(x, F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"loss: expected the callable to return a scalar tensor.*shape \(8,\)"):
        penalty.backward(x, lambda o: F.cross_entropy(o, y, reduction="none"))
    with pytest.raises(ValueError, match=r"inputs: expected a batch of at least one example, got shape \(0, 6\)"):
        penalty.backward(x[:0], ce(TRUE))
    with pytest.raises(ValueError, match=r"output: expected logits"):
        fisher_ext.FisherPenalty(nn.Sequential(nn.Linear(6, 4), nn.Flatten(0)), 1.0).backward(
            torch.randn(3, 6), lambda o: o.sum())
    with pytest.raises(RuntimeError, match="no watched forward"):
        penalty.penalty_term(model(x))
    with pytest.raises(ValueError, match="penalty_term differentiates the penalty's graph"):
        fisher_ext.FisherPenalty(model, 0.2, method="finite_difference").penalty_term(model(x))
    with pytest.raises(ValueError, match="objective: 'gpx' differentiates w.r.t. the inputs"):
        fisher_ext.FisherPenalty.gpx(model, 0.2).penalty_term(model(x))


def test_penalty_term_refuses_an_output_it_did_not_watch():
    model, x, y = build("mlp")
    penalty = fisher_ext.FisherPenalty(model, 0.2)
    with penalty.watch():
        model(x)
    other = model(x * 2)
    with pytest.raises(ValueError, match=r"output: expected a tensor the watched forward returned.*shape \(8, 4\)"):
        penalty.penalty_term(other)


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_nan_loss_names_the_step_and_writes_nothing(method):
    model, x, y = build("mlp")
    penalty = fisher_ext.FisherPenalty(model, 0.2, method=method)
    penalty.backward(x, ce(TRUE))
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"step 2: the training loss is not finite.*nothing was written"):
        penalty.backward(x, lambda o: F.cross_entropy(o, TRUE) * float("nan"))
    bad = x.clone()
    bad[3, 0] = float("inf")  # tanh keeps the loss finite; the gradients through it are NaN
    with pytest.raises(FloatingPointError, match=r"step 3: the penalty is not finite"):
        penalty.backward(bad, ce(TRUE))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b)


def test_finite_difference_falls_back_on_a_different_path():
    """A shifted pass that does not make the recorded decisions (here: Python state picks another
    activation): that step is exact, with a warning, and the penalty carries on."""
    class Alternating(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.calls = 0

        def forward(self, inp):
            self.calls += 1
            return F.relu(self.a(inp)) if self.calls % 2 else torch.tanh(self.a(inp))

    torch.manual_seed(0)
    model = Alternating().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    _, penalty, train = penalty_gradients(model, x, TRUE, 0.2, TRUE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = fisher_ext.FisherPenalty(model, 0.2, method="finite_difference", check_every=0).backward(
            x, ce(TRUE), labels=TRUE)
    assert [str(w.message) for w in caught if "replayed forward" in str(w.message)]
    assert result.method == "double_backward"
    assert relative(grads(model), flat(train) + flat(penalty)) < 1e-12


def test_free_norms_are_optional_for_the_penalty():
    """A model the per-example rules refuse (a module called twice) still gets its penalty; the
    step reports no Tr(F) instead of failing."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(6, 6), nn.Linear(6, 4)

        def forward(self, inp):
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(inp)))))

    torch.manual_seed(0)
    model = Twice().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    _, penalty, train = penalty_gradients(model, x, TRUE, 0.2, TRUE)
    for method in ("double_backward", "finite_difference"):
        model.zero_grad()
        _, result = fisher_ext.FisherPenalty(model, 0.2, method=method).backward(x, ce(TRUE), labels=TRUE)
        assert result.per_example is None and result.trace is None
        assert relative(grads(model), flat(train) + flat(penalty)) < (1e-6 if method == "finite_difference" else 1e-12)
    with pytest.raises(fisher_ext.UnsupportedModuleError, match=r"Linear \(lin\): called more than once"):
        fisher_ext.FisherPenalty(model, 0.2, objective="trace").backward(x, ce(TRUE), labels=TRUE)


def test_finite_difference_repeats_what_the_watched_pass_saw():
    """The shifted pass starts from the buffers the watched pass started from (here a counter the
    forward updates) and gives a stochastic loss the same random draws; both passes together
    advance the random stream as one plain step does."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, inp):
            self.calls += 1
            return self.lin(inp) * self.calls  # the output depends on the buffer's value

    def noisy(out):
        return F.cross_entropy(out + 0.1 * torch.randn_like(out), TRUE)

    torch.manual_seed(0)
    model = Counting().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    twin = copy.deepcopy(model)
    torch.manual_seed(3)
    fisher_ext.FisherPenalty(model, 0.2, method="finite_difference", check_every=0).backward(x, noisy, labels=TRUE)
    after = torch.rand(2)
    torch.manual_seed(3)
    exact = fisher_ext.FisherPenalty(twin, 0.2, method="double_backward")
    exact.backward(x, noisy, labels=TRUE)
    assert torch.equal(torch.rand(2), after)
    assert model.calls.item() == 1 == twin.calls.item()
    assert relative(grads(model), grads(twin)) < 1e-6


def test_finite_difference_falls_back_when_the_forward_modifies_its_input():
    class Scaling(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, inp):
            return self.lin(inp.mul_(2))

    torch.manual_seed(0)
    model = Scaling().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    x0 = x.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = fisher_ext.FisherPenalty(model, 0.2, method="finite_difference").backward(x, ce(TRUE))
    assert any("modified its inputs in place" in str(w.message) for w in caught)
    assert result.method == "double_backward" and torch.equal(x, 2 * x0)  # the input scaled once


def test_check_is_skipped_where_torch_has_no_double_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Hardsigmoid(), nn.Linear(16, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = fisher_ext.FisherPenalty(model, 0.2, method="finite_difference").backward(x, ce(TRUE))
    assert any("the check is skipped" in str(w.message) for w in caught)
    assert result.method == "finite_difference" and result.check is None


def test_tuple_output_is_refused_clearly():
    model = nn.Sequential(nn.Linear(6, 4))
    model.forward = lambda inp: (model[0](inp), inp)
    with pytest.raises(ValueError, match="output: expected a floating-point tensor of logits .* got tuple"):
        fisher_ext.FisherPenalty(model, 0.2).backward(torch.randn(8, 6), lambda out: out[0].sum())


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_logits_picked_from_a_nested_output(method):
    """A model returning {'logits', 'aux'}: logits= tells the penalty where the logits are; the
    training loss gets the whole output."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).double()

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, inp):
            out = self.body(inp)
            return {"logits": out, "aux": out.square().mean()}

    model = WithAux()
    x = torch.randn(8, 6, dtype=torch.float64)
    _, penalty, train = penalty_gradients(body, x, TRUE, 0.3, TRUE)
    loss = lambda out: F.cross_entropy(out["logits"], TRUE)  # noqa: E731
    fisher_ext.FisherPenalty(model, 0.3, method=method, logits=lambda out: out["logits"]).backward(
        x, loss, labels=TRUE)
    assert relative(grads(model), flat(train) + flat(penalty)) < (1e-6 if method == "finite_difference" else 1e-12)
