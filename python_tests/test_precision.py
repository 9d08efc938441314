"""precision='bf16': bfloat16 GEMMs for the Linear/Conv norms where they are faster.

The norm ops' `precision` argument on both CPU paths (native bf16 GEMMs where the CPU has them,
else the same arithmetic as 'full') against float64 oracles; the opt-in of fisher_trace and the
monitor on float32 versions of the model patterns against the float64 per-example oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fisher_ext
from cases import CASES_BY_ID, build, oracle

BF16_GEMM = bool(fisher_ext.build_info()["compiled"] and fisher_ext.build_info()["compiled"]["cpu_bf16_gemm"])


def conv_oracle(x, g, kernel, padding, bias=True):
    """float64 per-example ||G_n X_n^T||^2 (+ ||sum_p g_n||^2) of a 2-d convolution, by unfolding."""
    X = F.unfold(x.double(), kernel, padding=padding)
    G = g.double().flatten(2)
    return (G @ X.transpose(1, 2)).square().sum((1, 2)) + (G.sum(2).square().sum(1) if bias else 0)


def linear_oracle(a, g):
    a, g = a.double(), g.double()
    return (g.transpose(1, 2) @ a).square().sum((1, 2)) + g.sum(1).square().sum(1)


@pytest.mark.parametrize("native", ["1", "0"], ids=["bf16-gemm-off", "bf16-gemm-if-available"])
@pytest.mark.parametrize("method", ["materialize", "auto", "ghost"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_precision_matches_the_oracle(monkeypatch, native, method, dtype):
    # sizes past the bf16 GEMMs' 64 positions and columns (conv 100 x 144, linear 96 x 72) and below;
    # bfloat16 rounding of the inputs and of each weight-gradient entry: 2^-9 relative at most, much
    # less after the sums
    monkeypatch.setenv("FISHER_EXT_CPU_NO_BF16_GEMM", native)
    torch.manual_seed(0)
    for c_in, c_out, h in [(16, 24, 10), (3, 32, 12), (4, 8, 3)]:
        x, g = torch.randn(6, c_in, h, h, dtype=dtype), torch.randn(6, c_out, h, h, dtype=dtype)
        got = fisher_ext.conv_sqnorm(x, g, kernel_size=3, padding=1, bias=True, method=method, precision="bf16")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), conv_oracle(x, g, 3, 1), rtol=4e-3, atol=0)
    for t in (1, 8, 96):
        a, g = torch.randn(5, t, 72, dtype=dtype), torch.randn(5, t, 24, dtype=dtype)
        got = fisher_ext.linear_sqnorm(a, g, bias=True, method=method, precision="bf16")
        torch.testing.assert_close(got.double(), linear_oracle(a, g), rtol=4e-3, atol=0)


@pytest.mark.skipif(not BF16_GEMM, reason="this CPU has no native bfloat16 GEMMs (or the extension is not loaded)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_gemms_run_only_when_asked(monkeypatch, dtype):
    # 'bf16' rounds W (and float32 inputs) to bfloat16, 'full' does not: the results differ, and are
    # equal again with the native path turned off
    torch.manual_seed(0)
    x, g = torch.randn(4, 16, 10, 10, dtype=dtype), torch.randn(4, 24, 10, 10, dtype=dtype)

    def norms(precision):
        return fisher_ext.conv_sqnorm(x, g, kernel_size=3, padding=1, bias=False, method="materialize",
                                      precision=precision)
    full, bf16 = norms("full"), norms("bf16")
    assert not torch.equal(full, bf16)
    torch.testing.assert_close(full.double(), conv_oracle(x, g, 3, 1, bias=False), rtol=2e-5, atol=0)
    torch.testing.assert_close(bf16, full, rtol=4e-3, atol=0)
    a, ga = torch.randn(3, 96, 72, dtype=dtype), torch.randn(3, 96, 40, dtype=dtype)
    linear = {p: fisher_ext.linear_sqnorm(a, ga, bias=True, method="materialize", precision=p)
              for p in ("full", "bf16")}
    assert not torch.equal(linear["full"], linear["bf16"])
    monkeypatch.setenv("FISHER_EXT_CPU_NO_BF16_GEMM", "1")
    assert torch.equal(norms("bf16"), full)
    assert torch.equal(fisher_ext.linear_sqnorm(a, ga, bias=True, method="materialize", precision="bf16"),
                       linear["full"])


def test_bad_precision_is_refused_by_the_ops():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="precision: expected one of \\('full', 'bf16'\\), got 'fp16'"):
        fisher_ext.linear_sqnorm(a, g, bias=True, precision="fp16")
    compiled = fisher_ext.build_info()["extension"]
    with pytest.raises(RuntimeError if compiled else ValueError, match="precision: expected"):
        torch.ops.fisher_ext.linear_sqnorm(a, g, True, "auto", "fp16")  # the op's own check


PATTERNS = ["mlp", "cnn_groupnorm", "cnn_batchnorm_eval", "conv_transpose", "transformer", "lstm_h_n", "dict_output"]


@pytest.mark.parametrize("case_id", PATTERNS)
def test_bf16_opt_in_on_model_patterns(case_id):
    case = CASES_BY_ID[case_id]
    model64, inputs64, labels = build(case)
    want = sum(oracle(case, model64, inputs64, labels).values())
    model32 = copy.deepcopy(model64).float()
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs64)
    full = fisher_ext.fisher_trace(model32, inputs32, labels=labels)
    bf16 = fisher_ext.fisher_trace(model32, inputs32, labels=labels, precision="bf16")
    scale = float(want.max())
    torch.testing.assert_close(full.per_example.double(), want, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(bf16.per_example.double(), want, rtol=2e-2, atol=1e-3 * scale)
    assert bf16.trace == pytest.approx(float(want.mean()), rel=1e-2)
    assert full.coverage == bf16.coverage

    monitor = fisher_ext.FisherTraceMonitor(model32, precision="bf16")
    with monitor.watch():
        out = model32(*inputs32)
    got = monitor.estimate(out, labels=labels)
    torch.testing.assert_close(got.per_example, bf16.per_example, rtol=1e-6, atol=0)


def test_bf16_leaves_float64_models_in_float64():
    model, inputs, labels = build(CASES_BY_ID["cnn_groupnorm"])
    want = fisher_ext.fisher_trace(model, inputs, labels=labels)
    got = fisher_ext.fisher_trace(model, inputs, labels=labels, precision="bf16")
    assert torch.equal(got.per_example, want.per_example)


def test_bad_precision_is_refused():
    model, inputs, labels = build(CASES_BY_ID["mlp"])
    with pytest.raises(ValueError, match="precision: expected one of \\('full', 'bf16'\\), got 'fp16'"):
        fisher_ext.fisher_trace(model, inputs, labels=labels, precision="fp16")
    with pytest.raises(ValueError, match="precision: expected one of"):
        fisher_ext.FisherTraceMonitor(model, precision=torch.bfloat16)


@pytest.mark.parametrize("case_id", ["conv_transpose", "transformer_seq_first", "mlp"])
def test_backward_keeps_full_precision(case_id):
    # the training backward's norms (fused or not: ConvTranspose and sequence-first layers take the
    # rules) are the model's own, whatever the monitor's precision
    case = CASES_BY_ID[case_id]
    model64, inputs64, labels = build(case)
    results = {}
    for precision in ("full", "bf16"):
        model = copy.deepcopy(model64).float()
        inputs = tuple(t.float() if t.is_floating_point() else t for t in inputs64)
        monitor = fisher_ext.FisherTraceMonitor(model, precision=precision)
        with monitor.watch():
            out = model(*inputs)
        losses = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction="none")
        results[precision] = monitor.backward(losses.reshape(labels.shape[0], -1).sum(1))
    assert torch.equal(results["full"].per_example, results["bf16"].per_example)
