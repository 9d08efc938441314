"""precision='bf16': the Linear/Conv norms from bfloat16-rounded inputs with float32 accumulation.

The ops' bfloat16 paths (native bf16 GEMMs where the CPU has them, else the float32 kernels on
converted inputs) against a float64 oracle of the same rounded inputs; the opt-in on float32
versions of the model patterns against the float64 per-example oracle of the float64 model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fisher_ext
from cases import CASES_BY_ID, build, oracle

BF16_GEMM = bool(fisher_ext.build_info()["compiled"] and fisher_ext.build_info()["compiled"]["cpu_bf16_gemm"])


def conv_oracle(x, g, kernel, padding):
    """float64 per-example ||G_n X_n^T||^2 + ||sum_p g_n||^2 of a 2-d convolution, by unfolding."""
    X = F.unfold(x.double(), kernel, padding=padding)
    G = g.double().flatten(2)
    return (G @ X.transpose(1, 2)).square().sum((1, 2)) + G.sum(2).square().sum(1)


def linear_oracle(a, g):
    a, g = a.double(), g.double()
    return (g.transpose(1, 2) @ a).square().sum((1, 2)) + g.sum(1).square().sum(1)


@pytest.mark.parametrize("native", ["1", "0"], ids=["bf16-gemm-off", "bf16-gemm-if-available"])
@pytest.mark.parametrize("method", ["materialize", "auto", "ghost"])
def test_bf16_ops_match_the_oracle_of_their_rounded_inputs(monkeypatch, native, method):
    monkeypatch.setenv("FISHER_EXT_CPU_NO_BF16_GEMM", native)
    torch.manual_seed(0)
    for c_in, c_out, h in [(16, 24, 10), (3, 32, 12)]:  # 100 and 144 positions: past the bf16 GEMM threshold
        x, g = torch.randn(6, c_in, h, h).bfloat16(), torch.randn(6, c_out, h, h).bfloat16()
        got = fisher_ext.conv_sqnorm(x, g, kernel_size=3, padding=1, bias=True, method=method)
        assert got.dtype == torch.float32
        # each weight-gradient entry is rounded to bfloat16 once (2^-9 relative) on the native path
        torch.testing.assert_close(got.double(), conv_oracle(x, g, 3, 1), rtol=4e-3, atol=0)
    for t in (1, 8, 96):
        a, g = torch.randn(5, t, 40).bfloat16(), torch.randn(5, t, 24).bfloat16()
        got = fisher_ext.linear_sqnorm(a, g, bias=True, method=method)
        torch.testing.assert_close(got.double(), linear_oracle(a, g), rtol=4e-3, atol=0)


@pytest.mark.skipif(not BF16_GEMM, reason="this CPU has no native bfloat16 GEMMs (or the extension is not loaded)")
def test_native_bf16_path_is_the_one_that_runs(monkeypatch):
    # the native path rounds W to bfloat16; the float32 kernel does not: the switch is live
    torch.manual_seed(0)
    x, g = torch.randn(4, 16, 10, 10).bfloat16(), torch.randn(4, 24, 10, 10).bfloat16()
    results = {}
    for off in ("0", "1"):
        monkeypatch.setenv("FISHER_EXT_CPU_NO_BF16_GEMM", off)
        results[off] = fisher_ext.conv_sqnorm(x, g, kernel_size=3, padding=1, bias=False, method="materialize")
    assert not torch.equal(results["0"], results["1"])
    torch.testing.assert_close(results["0"], results["1"], rtol=4e-3, atol=0)


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
