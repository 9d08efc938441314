"""CUDA-only cases of the tiled kernels (skipped without a GPU; bench/gpu_check.sh runs them).

Every device-parametrized test of test_ops.py also runs on CUDA; these add the shapes that cross
the kernels' tile edges (64 x 64 output tiles, 16-deep slices), many examples, non-contiguous
inputs, every dtype and program, run-to-run determinism, and agreement with the CPU backend.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisher_ext
from oracle import per_example_sqnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}

LINEAR = [  # (N, T, d_in, d_out): T and d off the tile and slice sizes, T = 1 (row norm), many examples
    (3, 70, 67, 9),
    (2, 130, 13, 131),
    (2000, 1, 37, 13),
    (5, 17, 200, 3),
]
CONV = [  # (N, C_in, C_out, spatial, kwargs)
    (4, 6, 70, (10, 10), dict(kernel_size=3, padding=2, dilation=2)),  # 2 row tiles, 55 columns
    (3, 12, 130, (9, 7), dict(kernel_size=3, stride=2, padding=1, groups=2)),
    (2, 3, 5, (17,), dict(kernel_size=5, padding=2)),  # Conv1d
    (2, 4, 6, (5, 6, 4), dict(kernel_size=(3, 1, 2), padding=(1, 0, 1))),  # Conv3d
    (300, 8, 8, (4, 4), dict(kernel_size=4)),  # one output position per example
]


def _linear(shape, dtype, device, bias=True):
    torch.manual_seed(0)
    N, T, d_in, d_out = shape
    module = nn.Linear(d_in, d_out, bias=bias)
    a = torch.randn(N, T, d_in, dtype=torch.float64).to(dtype)
    g = torch.randn(N, T, d_out, dtype=torch.float64).to(dtype)
    return module, a.to(device), g.to(device)


def _conv(case, dtype, device, bias=True):
    torch.manual_seed(0)
    N, c_in, c_out, spatial, kw = case
    module = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(spatial)](c_in, c_out, bias=bias, **kw).double()
    x = torch.randn(N, c_in, *spatial, dtype=torch.float64)
    with torch.no_grad():
        g = torch.randn(module(x).shape, dtype=torch.float64)
    kwargs = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                  dilation=module.dilation, groups=module.groups)
    return module, x.to(dtype).to(device), g.to(dtype).to(device), kwargs


def _check(got, want, dtype):
    err = ((got.double().cpu() - want) / want.abs().clamp_min(1e-30)).abs().max().item()
    assert err <= RTOL[dtype], f"relative error {err:.3e} > {RTOL[dtype]:.1e}"


@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR, ids=str)
def test_linear_tiles(shape, dtype, method):
    module, a, g = _linear(shape, dtype, "cuda")
    want = per_example_sqnorm(module, a.cpu(), g.cpu())  # float64 on the same rounded inputs
    _check(fisher_ext.linear_sqnorm(a, g, bias=True, method=method), want, dtype)


@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV, ids=lambda c: f"{len(c[3])}d-{c[1]}-{c[2]}-{c[4]}")
def test_conv_tiles(case, dtype, method):
    module, x, g, kw = _conv(case, dtype, "cuda")
    want = per_example_sqnorm(module, x.cpu(), g.cpu())
    _check(fisher_ext.conv_sqnorm(x, g, bias=True, method=method, **kw), want, dtype)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_non_contiguous_and_no_bias(method):
    module, x, g, kw = _conv(CONV[0], torch.float32, "cuda", bias=False)
    x_nc = x.to(memory_format=torch.channels_last)
    g_nc = torch.cat([g, g], dim=3)[:, :, :, ::2]
    want = per_example_sqnorm(module, x.cpu(), g_nc.cpu())
    _check(fisher_ext.conv_sqnorm(x_nc, g_nc, bias=False, method=method, **kw), want, torch.float32)
    lin, a, ga = _linear(LINEAR[0], torch.float32, "cuda", bias=False)
    a_nc, ga_nc = a.transpose(1, 2).contiguous().transpose(1, 2), torch.cat([ga, ga], 2)[:, :, ::2]
    want = per_example_sqnorm(lin, a.cpu(), ga_nc.cpu())
    _check(fisher_ext.linear_sqnorm(a_nc, ga_nc, bias=False, method=method), want, torch.float32)


def test_deterministic_and_equal_to_the_cpu_backend():
    for case in CONV:
        _, x, g, kw = _conv(case, torch.float32, "cuda")
        first = fisher_ext.conv_sqnorm(x, g, bias=True, **kw)
        assert torch.equal(first, fisher_ext.conv_sqnorm(x, g, bias=True, **kw))  # run to run, bit for bit
        torch.testing.assert_close(first.cpu(), fisher_ext.conv_sqnorm(x.cpu(), g.cpu(), bias=True, **kw),
                                   rtol=2e-5, atol=0)


@pytest.mark.parametrize("op", ["norms", "accumulate", "fused"])
def test_captured_in_a_cuda_graph_on_a_side_stream(op):
    """Every launch on the current stream: captured in a CUDA graph on a side stream, a kernel
    launched on another stream (or a synchronizing call) fails the capture; replaying the graph
    on new inputs gives the op's result for them."""
    _, x, g, kw = _conv(CONV[1], torch.float32, "cuda")
    acc = torch.ones(x.shape[0], device="cuda")
    calls = {"norms": lambda: fisher_ext.conv_sqnorm(x, g, bias=True, **kw),
             "accumulate": lambda: fisher_ext.conv_sqnorm(x, g, bias=True, accumulate=acc, **kw),
             "fused": lambda: fisher_ext.conv_grad_sqnorm(x, g, bias=True, **kw)}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[op]()  # warm-up outside the capture (workspace allocations)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = calls[op]()
    x.copy_(torch.randn_like(x))
    g.copy_(torch.randn_like(g))
    acc.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    want = fisher_ext.conv_sqnorm(x, g, bias=True, **kw)
    got = {"norms": lambda: out, "accumulate": lambda: acc - 1, "fused": lambda: out[2]}[op]()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
def test_no_positions_gives_zeros(method):
    """T = 0: ghost has no tile pair to launch; every example's norm is still written (0)."""
    a, g = torch.randn(3, 0, 4, device="cuda"), torch.randn(3, 0, 5, device="cuda")
    out = fisher_ext.linear_sqnorm(a, g, bias=True, method=method)
    assert torch.equal(out, torch.zeros(3, device="cuda"))
    acc = torch.full((3,), 2.0, device="cuda")
    fisher_ext.linear_sqnorm(a, g, bias=True, method=method, accumulate=acc)
    assert torch.equal(acc, torch.full((3,), 2.0, device="cuda"))


# ---- whole models on the GPU: Tr(F), the monitor's backward and the penalty step ----------------------------

import copy  # noqa: E402

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from cases import CASES, CASES_BY_ID, build, mean_ce, oracle, per_example_losses  # noqa: E402

# Every model pattern that the rules accept, in float64 on the GPU, against the float64 oracle on the CPU
# (one ordinary backward per example). Left to the CPU suite: the compiled cases (capture does not
# depend on the device, and Triton's compile time would take the GPU check's budget) and the user
# rule (registered by test_cases.py).
ON_CUDA = [c for c in CASES if not c.error and c.id not in ("torch_compile", "module_compile", "user_rule")]


def _on_cuda(model, inputs, labels):
    getattr(model, "_orig_mod", model).to("cuda")
    return tuple(a.to("cuda") for a in inputs), labels.to("cuda")


@pytest.mark.parametrize("case", ON_CUDA, ids=[c.id for c in ON_CUDA])
def test_fisher_trace_and_monitor_backward_of_every_pattern(case):
    model, inputs, labels = build(case)
    want = sum(oracle(case, model, inputs, labels).values())
    twin = copy.deepcopy(model)
    inputs, labels = _on_cuda(model, inputs, labels)
    result = fisher_ext.fisher_trace(model, inputs, labels=labels)
    assert result.per_example.is_cuda
    torch.testing.assert_close(result.per_example.double().cpu(), want, rtol=1e-9, atol=1e-12)

    monitor = fisher_ext.FisherTraceMonitor(model)
    with monitor.watch():
        out = model(*inputs)
    result = monitor.backward(per_example_losses(out, labels))  # the fused weight-gradient ops on CUDA
    torch.testing.assert_close(result.per_example.double().cpu(), want, rtol=1e-9, atol=1e-12)
    twin.to("cuda")
    per_example_losses(twin(*inputs), labels).mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", ON_CUDA, ids=[c.id for c in ON_CUDA])
def test_penalty_step_and_its_free_trace(case):
    """The exact penalty step (double backward) with report_trace on the GPU: its gradient is the
    one written out by hand on the CPU, its per-example norms the oracle's."""
    model, inputs, labels = build(case)
    want_norms = sum(oracle(case, model, inputs, labels).values())
    twin = copy.deepcopy(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # the flash kernel has no double backward
        out = twin(*inputs)
        gbar = torch.autograd.grad(mean_ce(labels)(out), params, create_graph=True, allow_unused=True)
        total = mean_ce(labels)(out) + 0.3 * sum(g.square().sum() for g in gbar if g is not None)
        want = torch.autograd.grad(total, params, allow_unused=True)
    inputs, labels = _on_cuda(model, inputs, labels)
    rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    if rnn:  # cuDNN's RNN backward has no double backward: the error says what to do
        with pytest.raises(RuntimeError, match=r"cudnn\.flags\(enabled=False\)"):
            fisher_ext.FisherPenalty(model, 0.3).backward(inputs, mean_ce(labels), labels=labels)
        model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), torch.backends.cudnn.flags(enabled=not rnn):
        _, result = fisher_ext.FisherPenalty(model, 0.3, report_trace=True).backward(inputs, mean_ce(labels),
                                                                                     labels=labels)
    torch.testing.assert_close(result.per_example.double().cpu(), want_norms, rtol=1e-9, atol=1e-12)
    for p, w in zip([p for p in model.parameters() if p.requires_grad], want):
        assert (p.grad is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(p.grad.cpu(), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case_id", ["mlp", "cnn_groupnorm", "transformer"])
def test_finite_difference_penalty_step(case_id):
    """The finite-difference step on the GPU (the shifted pass on the fused ops) within its O(r)
    bound of the exact step computed on the CPU."""
    case = CASES_BY_ID[case_id]
    model, inputs, labels = build(case)
    twin = copy.deepcopy(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        out = twin(*inputs)
        gbar = torch.autograd.grad(mean_ce(labels)(out), params, create_graph=True)
        total = mean_ce(labels)(out) + 0.3 * sum(g.square().sum() for g in gbar)
        want = torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])
    inputs, labels = _on_cuda(model, inputs, labels)
    fisher_ext.FisherPenalty(model, 0.3, method="finite_difference", check_every=0).backward(
        inputs, mean_ce(labels), labels=labels)
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).cpu()
    assert float((got - want).norm() / want.norm()) < 1e-6  # as on the CPU (test_penalty.py)
