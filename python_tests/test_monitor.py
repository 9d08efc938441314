"""Tr(F) monitor against a float64 oracle: per-example gradients by a loop of ordinary backward passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisher_ext
from fisher_ext import UnsupportedModuleError
from fisher_ext.likelihoods import Bernoulli, Categorical, Gaussian


# ---- models ------------------------------------------------------------------------------


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 5))


def cnn_groupnorm():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4))


def cnn_batchnorm_eval():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 4))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


class TinyTransformer(nn.Module):
    """Embedding + self-attention (raw in_proj parameters: the generic fallback) + LayerNorm + head."""

    def __init__(self, vocab=11, dim=8, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h)  # (N, T, classes): a sequence output


class RawParameter(nn.Module):
    """A parameter used functionally by its owner, next to an ordinary child module."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        return self.body(x) * self.scale


def inputs_for(name, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name in ("cnn_groupnorm", "cnn_batchnorm_eval"):
        return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    if name == "transformer":
        tokens = torch.randint(0, 11, (n, 7), generator=g)
        tokens[0, -2:] = 0  # padding tokens
        return tokens
    return torch.randn(n, 6, generator=g, dtype=torch.float64)


MODELS = {"mlp": mlp, "cnn_groupnorm": cnn_groupnorm, "cnn_batchnorm_eval": cnn_batchnorm_eval,
          "transformer": TinyTransformer, "raw_parameter": RawParameter}


def build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().double()


# ---- oracle ------------------------------------------------------------------------------


def nll_by_hand(likelihood, out, labels):
    """(N,) negative log-likelihoods written out here, not taken from fisher_ext.likelihoods: a
    categorical example sums its tokens, a Gaussian divides by its variance."""
    n = out.shape[0]
    if isinstance(likelihood, Categorical):
        logp = torch.log_softmax(out, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return -logp.reshape(n, -1).sum(1)
    if isinstance(likelihood, Bernoulli):
        logp = labels * F.logsigmoid(out) + (1 - labels) * F.logsigmoid(-out)
        return -logp.reshape(n, -1).sum(1)
    return ((labels - out).square() / (2 * likelihood.variance)).reshape(n, -1).sum(1)


def oracle(model, x, labels, likelihood):
    """{parameter name: (N,) squared per-example gradient norm} by one backward per example."""
    model = copy.deepcopy(model)
    out = {k: torch.zeros(x.shape[0], dtype=torch.float64) for k, p in model.named_parameters()}
    for n in range(x.shape[0]):
        model.zero_grad()
        nll_by_hand(likelihood, model(x[n:n + 1]), labels[n:n + 1]).sum().backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                out[k][n] = p.grad.double().square().sum()
    return out


def sampled_labels(model, x, likelihood, seed=1):
    with torch.no_grad():
        return likelihood.sample(model(x), torch.Generator().manual_seed(seed))


def assert_matches(result, want):
    total = sum(want.values())
    torch.testing.assert_close(result.per_example.double(), total, rtol=1e-9, atol=1e-12)
    assert result.trace == pytest.approx(float(total.mean()), rel=1e-9)
    assert set(result.per_parameter) == set(want)
    for k, v in want.items():
        assert result.per_parameter[k] == pytest.approx(float(v.mean()), rel=1e-9, abs=1e-12), k
    assert sum(result.per_parameter.values()) == pytest.approx(result.trace, rel=1e-9)


# ---- exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_trace_matches_oracle(name):
    model, x = build(name), inputs_for(name)
    lik = Categorical()
    y = sampled_labels(model, x, lik)
    result = fisher_ext.fisher_trace(model, x, labels=y)
    assert_matches(result, oracle(model, x, y, lik))


def test_coverage_names_every_rule():
    result = fisher_ext.fisher_trace(build("transformer"), inputs_for("transformer"))
    assert result.coverage == {
        "embed.weight": "embedding", "attn.in_proj_weight": "attention", "attn.in_proj_bias": "attention",
        # MultiheadAttention uses out_proj's parameters directly, never calling out_proj as a module:
        # they go with in_proj to attn's re-run, which sees every projection as an F.linear call.
        "attn.out_proj.weight": "attention", "attn.out_proj.bias": "attention", "norm.weight": "layer_norm",
        "norm.bias": "layer_norm", "head.weight": "linear", "head.bias": "linear"}
    gn = fisher_ext.fisher_trace(build("cnn_groupnorm"), inputs_for("cnn_groupnorm")).coverage
    assert gn["0.weight"] == "conv" and gn["1.weight"] == "group_norm" and gn["6.bias"] == "linear"
    assert fisher_ext.fisher_trace(build("raw_parameter"), inputs_for("raw_parameter")).coverage["scale"] == "fallback"


class PartlyUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def test_unused_parameter_is_reported():
    result = fisher_ext.fisher_trace(PartlyUsed().double(), torch.randn(3, 4, dtype=torch.float64))
    assert result.coverage["unused.weight"] == "unused" and result.per_parameter["unused.weight"] == 0.0
    assert result.coverage["used.weight"] == "linear" and result.per_parameter["used.weight"] > 0


@pytest.mark.parametrize("lik", [Bernoulli(), Gaussian(), Gaussian(variance=0.25)],
                         ids=["bernoulli", "gauss1", "gauss.25"])
def test_other_likelihoods(lik):
    model, x = build("mlp"), inputs_for("mlp")
    y = sampled_labels(model, x, lik)
    assert_matches(fisher_ext.fisher_trace(model, x, likelihood=lik, labels=y), oracle(model, x, y, lik))


def test_string_likelihood_names():
    model, x = build("mlp"), inputs_for("mlp")
    y = sampled_labels(model, x, Bernoulli())
    a = fisher_ext.fisher_trace(model, x, likelihood="bernoulli", labels=y)
    b = fisher_ext.fisher_trace(model, x, likelihood=Bernoulli(), labels=y)
    assert a.trace == b.trace


def test_empirical_uses_true_labels():
    model, x = build("mlp"), inputs_for("mlp")
    y = torch.tensor([0, 1, 2, 3, 4])
    result = fisher_ext.fisher_trace(model, x, estimator="empirical", labels=y)
    assert_matches(result, oracle(model, x, y, Categorical()))
    with pytest.raises(ValueError, match="labels: the empirical Fisher needs the true labels"):
        fisher_ext.fisher_trace(model, x, estimator="empirical")


def test_exact_equals_closed_form_and_mc_converges():
    model, x = build("mlp"), inputs_for("mlp", n=3)
    lik = Categorical()
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    closed = torch.zeros(3, dtype=torch.float64)
    for c in range(5):  # sum_c p_c ||grad log p_c||^2
        y = torch.full((3,), c)
        closed += p[:, c] * sum(oracle(model, x, y, lik).values())
    exact = fisher_ext.fisher_trace(model, x, estimator="exact")
    torch.testing.assert_close(exact.per_example.double(), closed, rtol=1e-9, atol=0)

    draws = 400
    mc = fisher_ext.fisher_trace(model, x, samples=draws, generator=torch.Generator().manual_seed(0))
    # each draw's norm has a spread; the mean of 400 draws must sit within 4 standard errors
    spread = torch.stack([sum(oracle(model, x, torch.full((3,), c), lik).values()) for c in range(5)], 1)
    std = ((p * (spread - closed[:, None]).square()).sum(1)).sqrt()
    assert ((mc.per_example.double() - closed).abs() <= 4 * std / draws ** 0.5 + 1e-12).all()


def test_samples_average_over_draws():
    model, x = build("mlp"), inputs_for("mlp")
    gen = torch.Generator().manual_seed(3)
    got = fisher_ext.fisher_trace(model, x, samples=3, generator=gen)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out = model(x)
    lik = Categorical()
    want = sum(sum(oracle(model, x, lik.sample(out, gen), lik).values()) for _ in range(3)) / 3
    torch.testing.assert_close(got.per_example.double(), want, rtol=1e-9, atol=0)


def test_low_precision_autocast():
    model = mlp()
    x = torch.randn(6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = fisher_ext.fisher_trace(model, x, labels=torch.arange(6) % 5)
    ref = fisher_ext.fisher_trace(model, x, labels=torch.arange(6) % 5)
    assert result.trace == pytest.approx(ref.trace, rel=5e-2)


# ---- in-training use -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_monitor_in_training_leaves_grads_and_optimizer_alone(reduction):
    model, x = build("cnn_groupnorm"), inputs_for("cnn_groupnorm")
    y = torch.tensor([0, 1, 2, 3, 0])
    twin = copy.deepcopy(model)
    opt, twin_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(twin.parameters())
    for m, o in ((model, opt), (twin, twin_opt)):  # one step so the optimizers have state
        F.cross_entropy(m(x), y, reduction=reduction).backward()
        o.step()
    before = copy.deepcopy(model)

    monitor = fisher_ext.FisherTraceMonitor(model)
    with monitor.watch():
        logits = model(x)
    labels = sampled_labels(model, x, Categorical())
    result = monitor.estimate(logits, labels=labels)
    F.cross_entropy(logits, y, reduction=reduction).backward()
    opt.step()
    F.cross_entropy(twin(x), y, reduction=reduction).backward()
    twin_opt.step()

    for (k, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), k
        assert torch.equal(p, q), k
    for state, twin_state in zip(opt.state.values(), twin_opt.state.values()):
        for key in state:
            assert torch.equal(state[key], twin_state[key])
    assert_matches(result, oracle(before, x, labels, Categorical()))
    assert monitor.history == [(0, result.trace)]


def test_monitor_every_k_steps_and_hooks_removed():
    model, x = build("mlp"), inputs_for("mlp")
    monitor = fisher_ext.FisherTraceMonitor(model, every=2)
    results = []
    for _ in range(4):
        with monitor.watch():
            out = model(x)
        results.append(monitor.estimate(out))
    assert [r is None for r in results] == [False, True, False, True]
    assert all(not m._forward_hooks for m in model.modules())


def test_probe_set_in_chunks_restores_modes(capsys):
    model, x = build("cnn_batchnorm_eval"), inputs_for("cnn_batchnorm_eval", n=7)
    model.train()  # probe switches to eval for BatchNorm and restores train mode after
    monitor = fisher_ext.FisherTraceMonitor(model, estimator="exact")
    result = monitor.probe(x, chunk_size=3)
    assert model.training and all(m.training for m in model.modules())
    assert "probe: chunk 3/3, 7 examples" in capsys.readouterr().err
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    want = sum(p[:, c] * sum(oracle(model, x, torch.full((7,), c), Categorical()).values()) for c in range(4))
    torch.testing.assert_close(result.per_example.double(), want, rtol=1e-9, atol=1e-12)  # in order
    whole = fisher_ext.fisher_trace(model, x, estimator="exact")
    assert result.coverage == whole.coverage
    assert sum(result.per_parameter.values()) == pytest.approx(result.trace, rel=1e-9)
    for k, v in whole.per_parameter.items():
        assert result.per_parameter[k] == pytest.approx(v, rel=1e-9, abs=1e-15)


def test_standard_error_is_over_the_examples():
    result = fisher_ext.fisher_trace(build("mlp"), inputs_for("mlp", n=6))
    per = result.per_example.double()
    want = ((per - per.mean()).square().sum() / 5).sqrt() / 6 ** 0.5
    assert result.standard_error == pytest.approx(float(want), rel=1e-6)
    one = fisher_ext.fisher_trace(build("mlp"), inputs_for("mlp", n=1))
    assert one.standard_error == 0.0


# ---- bad input ---------------------------------------------------------------------------


def test_errors():
    x = inputs_for("mlp")
    frozen = mlp().double().requires_grad_(False)
    with pytest.raises(ValueError, match="model: expected at least one trainable parameter"):
        fisher_ext.fisher_trace(frozen, x)
    with pytest.raises(ValueError, match=r"output: expected logits \(N, C\) or \(N, T, C\)"):
        fisher_ext.fisher_trace(nn.Sequential(nn.Linear(6, 5), nn.Flatten(0)).double(), x)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        fisher_ext.fisher_trace(build("mlp"), x, estimator="laplace")
    with pytest.raises(ValueError, match="likelihood: expected one of"):
        fisher_ext.fisher_trace(build("mlp"), x, likelihood="poisson")
    with pytest.raises(ValueError, match="samples: expected an int >= 1"):
        fisher_ext.fisher_trace(build("mlp"), x, samples=0)
    with pytest.raises(ValueError, match="estimator: 'exact' sums over every label"):
        fisher_ext.fisher_trace(build("transformer"), inputs_for("transformer"), estimator="exact")
    with pytest.raises(ValueError, match="labels: expected shape"):
        fisher_ext.fisher_trace(build("mlp"), x, labels=torch.zeros(3, dtype=torch.long))


def test_batchnorm_train_mode_is_an_error():
    model = cnn_batchnorm_eval().double().train()
    with pytest.raises(UnsupportedModuleError, match="BatchNorm2d: in train mode"):
        fisher_ext.fisher_trace(model, inputs_for("cnn_batchnorm_eval"))


def test_weight_sharing_and_reuse_are_errors():
    shared = nn.Linear(6, 6)
    tied = nn.Sequential(shared, nn.ReLU(), nn.Linear(6, 6)).double()
    tied[2].weight = tied[0].weight
    with pytest.raises(UnsupportedModuleError, match="the same tensor as 0.weight"):
        fisher_ext.fisher_trace(tied, inputs_for("mlp"))
    with pytest.raises(UnsupportedModuleError, match="weight tying or a module registered twice"):
        fisher_ext.fisher_trace(nn.Sequential(shared, nn.ReLU(), shared).double(), inputs_for("mlp"))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    with pytest.raises(UnsupportedModuleError, match=r"Linear \(lin\): called more than once in one forward"):
        fisher_ext.fisher_trace(Twice().double(), inputs_for("mlp"))


def test_estimate_without_watch_is_an_error():
    monitor = fisher_ext.FisherTraceMonitor(build("mlp"))
    with pytest.raises(RuntimeError, match="no watched forward"):
        monitor.estimate(torch.zeros(2, 5, requires_grad=True))


class SeqFirstAttention(nn.Module):
    """nn.MultiheadAttention in its default (T, N, E) layout with a key padding mask passed by keyword."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x, mask):
        h = self.attn(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=mask,
                      need_weights=False)[0]
        return self.head(h.transpose(0, 1).mean(1))


@pytest.mark.parametrize("tokens", [5, 3], ids=["T==N", "T!=N"])
def test_attention_seq_first_with_mask(tokens):
    torch.manual_seed(0)
    model = SeqFirstAttention().double()
    x = torch.randn(5, tokens, 6, dtype=torch.float64)
    mask = torch.zeros(5, tokens, dtype=torch.bool)
    mask[1, -1] = True
    y = torch.tensor([0, 1, 2, 3, 0])
    result = fisher_ext.fisher_trace(model, (x, mask), labels=y)
    want = {k: torch.zeros(5, dtype=torch.float64) for k, _ in model.named_parameters()}
    for n in range(5):  # oracle: one example at a time, its own mask row
        model.zero_grad()
        nll_by_hand(Categorical(), model(x[n:n + 1], mask[n:n + 1]), y[n:n + 1]).sum().backward()
        for k, p in model.named_parameters():
            want[k][n] = p.grad.square().sum()
    assert_matches(result, want)
    assert result.coverage["attn.in_proj_weight"] == "attention"
