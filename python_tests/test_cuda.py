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
