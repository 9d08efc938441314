"""linear_sqnorm / conv_sqnorm against float64 oracles of materialized per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisher_ext
from oracle import per_example_sqnorm, per_example_sqnorm_loop

METHODS = ["auto", "ghost", "materialize"]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]

# (N, middle dims, d_in, d_out): N=1, T=1 (2-D input), several middle dims, odd sizes.
LINEAR_SHAPES = [
    (1, (), 7, 5),
    (5, (), 33, 17),
    (3, (1,), 8, 3),
    (4, (6,), 13, 9),
    (2, (3, 5), 11, 19),
    (1, (40,), 6, 4),
    (3, (70,), 5, 130),
]

# (dims, C_in, C_out, input spatial, kwargs): every class of stride/padding/dilation/groups,
# channel counts on both sides of the CPU kernel's implicit/im2col switch (16 per group).
CONV_CASES = [
    (1, 3, 4, (11,), dict(kernel_size=3)),
    (1, 32, 8, (17,), dict(kernel_size=5, padding=2)),
    (1, 20, 6, (10,), dict(kernel_size=4, padding="same")),
    (1, 6, 9, (23,), dict(kernel_size=3, stride=3, padding=4, dilation=2, groups=3)),
    (2, 3, 5, (9, 8), dict(kernel_size=3, padding=1)),
    (2, 16, 8, (7, 9), dict(kernel_size=3, padding=1)),
    (2, 32, 12, (6, 5), dict(kernel_size=(3, 2), padding=(2, 0), dilation=(1, 2), groups=2)),
    (2, 4, 6, (10, 11), dict(kernel_size=3, stride=2, padding=1, dilation=2, groups=2)),
    (2, 17, 4, (9, 9), dict(kernel_size=(2, 4), stride=(3, 1), padding="valid")),
    (2, 16, 16, (8, 8), dict(kernel_size=2, padding="same", dilation=3)),
    (2, 32, 64, (4, 4), dict(kernel_size=3, padding=1)),
    (2, 8, 8, (5, 5), dict(kernel_size=1, groups=8)),
    (2, 18, 4, (3, 3), dict(kernel_size=5, padding=2)),
    (3, 2, 4, (4, 5, 3), dict(kernel_size=(2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 2))),
    (3, 32, 4, (4, 4, 3), dict(kernel_size=2, padding=1, dilation=(1, 2, 1))),
    (2, 20, 24, (10, 10), dict(kernel_size=3, stride=2)),  # the last input row and column read by no output
    (2, 12, 40, (8, 7), dict(kernel_size=1, stride=2)),
]

CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def make_linear(shape, bias, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    N, mid, d_in, d_out = shape
    module = nn.Linear(d_in, d_out, bias=bias)
    a = torch.randn(N, *mid, d_in, dtype=torch.float64).to(dtype)
    g = torch.randn(N, *mid, d_out, dtype=torch.float64).to(dtype)
    return module, a.to(device), g.to(device)


def make_conv(case, bias, N=3, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    nd, c_in, c_out, spatial, kw = case
    module = CONV_CLASSES[nd](c_in, c_out, bias=bias, **kw).double()
    x = torch.randn(N, c_in, *spatial, dtype=torch.float64)
    with torch.no_grad():
        out_shape = module(x).shape
    g = torch.randn(out_shape, dtype=torch.float64)
    return module, x.to(dtype).to(device), g.to(dtype).to(device)


def conv_kwargs(module):
    return dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                dilation=module.dilation, groups=module.groups)


def assert_close_rel(got, want, rtol):
    """Per-example relative error, so the check is as strict for small norms as for large ones."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = ((got.double().cpu() - want) / want.abs().clamp_min(1e-30)).abs().max().item()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


# ---- exactness in float64 ---------------------------------------------------------------


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_linear_float64(backend, device, shape, bias, method):
    module, a, g = make_linear(shape, bias, device=device)
    want = per_example_sqnorm(module, a.cpu(), g.cpu())
    got = backend.linear(a, g, bias=bias, method=method)
    assert got.dtype == torch.float64 and got.device.type == device
    assert_close_rel(got, want, 1e-10)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-{c[1]}-{c[2]}-{c[4]}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_conv_float64(backend, device, case, bias, method):
    module, x, g = make_conv(case, bias, device=device)
    want = per_example_sqnorm(module, x.cpu(), g.cpu())
    got = backend.conv(x, g, bias=bias, method=method, **conv_kwargs(module))
    assert got.dtype == torch.float64
    assert_close_rel(got, want, 1e-10)


def test_oracles_agree():
    """The vmap oracle and the loop oracle are two independent computations of one quantity."""
    module, x, g = make_conv(CONV_CASES[7], True)
    torch.testing.assert_close(per_example_sqnorm(module, x, g), per_example_sqnorm_loop(module, x, g))


# ---- reduced precision: float32 accumulation on the dtype's own inputs ---------------------

RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("shape", [LINEAR_SHAPES[1], LINEAR_SHAPES[4], LINEAR_SHAPES[6]], ids=str)
def test_linear_dtypes(backend, device, dtype, method, shape):
    module, a, g = make_linear(shape, True, dtype=dtype, device=device)
    want = per_example_sqnorm(module, a.cpu(), g.cpu())  # the oracle sees the same rounded inputs
    got = backend.linear(a, g, bias=True, method=method)
    assert got.dtype == torch.float32
    assert_close_rel(got, want, RTOL[dtype])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[6], CONV_CASES[7], CONV_CASES[14]], ids=str)
def test_conv_dtypes(backend, device, dtype, method, case):
    module, x, g = make_conv(case, True, dtype=dtype, device=device)
    want = per_example_sqnorm(module, x.cpu(), g.cpu())
    got = backend.conv(x, g, bias=True, method=method, **conv_kwargs(module))
    assert got.dtype == torch.float32
    assert_close_rel(got, want, RTOL[dtype])


# ---- layouts and edge cases ----------------------------------------------------------------


def test_linear_non_contiguous(backend, device):
    module, a, g = make_linear((4, (6,), 9, 5), True, device=device)
    a_nc = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (54, 1, 6)
    g_nc = torch.cat([g, g], dim=2)[:, :, ::2]  # every other column
    assert not a_nc.is_contiguous() and not g_nc.is_contiguous()
    want = per_example_sqnorm(module, a.cpu(), g_nc.cpu())
    for method in ["ghost", "materialize"]:
        assert_close_rel(backend.linear(a_nc, g_nc, bias=True, method=method), want, 1e-10)


@pytest.mark.parametrize("case", [CONV_CASES[5], CONV_CASES[7]], ids=str)
def test_conv_non_contiguous(backend, device, case):
    module, x, g = make_conv(case, True, device=device)
    x_nc = x.to(memory_format=torch.channels_last)
    g_nc = torch.cat([g, g], dim=3)[:, :, :, ::2]
    want = per_example_sqnorm(module, x.cpu(), g_nc.cpu())
    for method in ["ghost", "materialize"]:
        assert_close_rel(backend.conv(x_nc, g_nc, bias=True, method=method, **conv_kwargs(module)), want, 1e-10)


def test_empty_batch(backend, device):
    _, a, g = make_linear((0, (3,), 4, 5), True, device=device)
    assert backend.linear(a, g, bias=True).shape == (0,)
    module, x, g = make_conv(CONV_CASES[5], True, N=0, device=device)
    assert backend.conv(x, g, bias=True, **conv_kwargs(module)).shape == (0,)


@pytest.mark.parametrize("method", METHODS)
def test_no_output_channels(backend, device, method):
    """A layer with no outputs has no gradient: zeros (the CUDA planner used to divide by its 0 channels)."""
    a, g = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 0, device=device)
    assert torch.equal(backend.linear(a, g, bias=True, method=method), torch.zeros(3, device=device))
    x, gy = torch.randn(2, 4, 6, 6, device=device), torch.randn(2, 0, 6, 6, device=device)
    got = backend.conv(x, gy, kernel_size=3, stride=1, padding=1, dilation=1, groups=1, bias=True, method=method)
    assert torch.equal(got, torch.zeros(2, device=device))


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_stays_in_its_example(backend, device, method, bad):
    module, a, g = make_linear((4, (5,), 6, 3), True, device=device)
    a[1, 2, 3] = bad
    got = backend.linear(a, g, bias=True, method=method).cpu()
    want = per_example_sqnorm(module, a.cpu(), g.cpu())
    assert not torch.isfinite(got[1])
    keep = torch.tensor([0, 2, 3])
    assert_close_rel(got[keep], want[keep], 1e-10)

    module, x, gy = make_conv(CONV_CASES[5], True, N=4, device=device)
    x[2, 1, 3, 3] = bad
    got = backend.conv(x, gy, bias=True, method=method, **conv_kwargs(module)).cpu()
    want = per_example_sqnorm(module, x.cpu(), gy.cpu())
    assert not torch.isfinite(got[2])
    keep = torch.tensor([0, 1, 3])
    assert_close_rel(got[keep], want[keep], 1e-10)


def test_batch_larger_than_a_block(device):
    """Many examples: the CPU kernel splits them into blocks; every block must be written."""
    module, x, g = make_conv((2, 16, 16, (12, 12), dict(kernel_size=3, padding=1)), True, N=150, device=device)
    want = per_example_sqnorm(module, x.cpu(), g.cpu())
    got = fisher_ext.conv_sqnorm(x, g, bias=True, **conv_kwargs(module))
    assert_close_rel(got, want, 1e-10)


def test_backends_agree_on_auto(device):
    """The compiled kernel's cost model may pick another method than the reference's; the answer is one."""
    for case in CONV_CASES:
        module, x, g = make_conv(case, True, dtype=torch.float32, device=device)
        kw = conv_kwargs(module)
        got = fisher_ext.conv_sqnorm(x, g, bias=True, **kw)
        ref = fisher_ext.reference.conv_sqnorm(
            x, g, module.kernel_size, module.stride,
            fisher_ext.ops._conv_padding(module.padding, x.shape[2:], module.kernel_size, module.stride,
                                         module.dilation)[0],
            module.dilation, module.groups, True, "auto")
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=0)


# ---- accumulate ----------------------------------------------------------------------------


def test_accumulate_fused_and_autograd(device):
    lin, a, ga = make_linear((4, (3,), 5, 6), True, device=device)
    conv, x, gx = make_conv(CONV_CASES[5], False, N=4, device=device, seed=1)
    want = per_example_sqnorm(lin, a.cpu(), ga.cpu()) + per_example_sqnorm(conv, x.cpu(), gx.cpu()) + 1.0

    buf = torch.ones(4, dtype=torch.float64, device=device)
    out = fisher_ext.linear_sqnorm(a, ga, bias=True, accumulate=buf)
    assert out is buf
    fisher_ext.conv_sqnorm(x, gx, bias=False, accumulate=buf, **conv_kwargs(conv))
    assert_close_rel(buf, want, 1e-10)

    a.requires_grad_(True)  # the differentiable path: functional op + add_
    buf = torch.ones(4, dtype=torch.float64, device=device)
    out = fisher_ext.linear_sqnorm(a, ga, bias=True, accumulate=buf)
    fisher_ext.conv_sqnorm(x, gx, bias=False, accumulate=buf, **conv_kwargs(conv))
    assert out is buf and buf.grad_fn is not None
    assert_close_rel(buf.detach(), want, 1e-10)


def test_accumulate_bad_buffer():
    _, a, g = make_linear((4, (), 5, 6), True, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"accumulate: expected a \(4,\) torch.float32"):
        fisher_ext.linear_sqnorm(a, g, bias=True, accumulate=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="accumulate: expected"):
        fisher_ext.linear_sqnorm(a, g, bias=True, accumulate=torch.zeros(5))
    with pytest.raises(ValueError, match="accumulate: expected a buffer of its own, got one that shares memory with a"):
        fisher_ext.linear_sqnorm(a, g, bias=True, accumulate=a[:, 0])
    with pytest.raises(ValueError, match="shares memory with g"):
        fisher_ext.linear_sqnorm(a, g, bias=True, accumulate=g[:, 1])
    if fisher_ext.build_info()["extension"]:  # the op itself refuses too
        with pytest.raises(RuntimeError, match="acc: expected a buffer of its own, got one that shares memory with g"):
            torch.ops.fisher_ext.linear_sqnorm_accumulate_(g[:, 1], a, g, True, "auto")


# ---- bad input -----------------------------------------------------------------------------


def test_linear_bad_input():
    a, g = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    with pytest.raises(ValueError, match=r"g: expected batch size N=4 like a, got 3"):
        fisher_ext.linear_sqnorm(a, g[:3], bias=True)
    with pytest.raises(ValueError, match=r"a: expected shape \(N, \*, d_in\) of rank >= 2"):
        fisher_ext.linear_sqnorm(torch.randn(4), torch.randn(4), bias=True)
    with pytest.raises(ValueError, match=r"g: expected shape \(N, \*, d_out\) with \(N, \*\) = \(4, 3\)"):
        fisher_ext.linear_sqnorm(a, torch.randn(4, 2, 6), bias=True)
    with pytest.raises(TypeError, match="a: expected float32, float64, float16 or bfloat16, got torch.int64"):
        fisher_ext.linear_sqnorm(a.long(), g.long(), bias=True)
    with pytest.raises(TypeError, match="g: expected dtype torch.float32 like a, got torch.float64"):
        fisher_ext.linear_sqnorm(a, g.double(), bias=True)
    with pytest.raises(ValueError, match="method: expected one of"):
        fisher_ext.linear_sqnorm(a, g, bias=True, method="fast")
    with pytest.raises(TypeError, match="g: expected a torch.Tensor, got list"):
        fisher_ext.linear_sqnorm(a, [1.0], bias=True)


def test_conv_bad_input():
    x, g = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    kw = dict(kernel_size=3, padding=1, bias=True)
    fisher_ext.conv_sqnorm(x, g, **kw)  # the valid call
    with pytest.raises(ValueError, match=r"x: expected \(N, C_in, \*spatial\) with 1 to 3 spatial dims"):
        fisher_ext.conv_sqnorm(x[0, 0], g[0, 0], **kw)
    with pytest.raises(ValueError, match="g: expected batch size N=2 like x, got 1"):
        fisher_ext.conv_sqnorm(x, g[:1], **kw)
    with pytest.raises(ValueError, match=r"g: expected shape \(N=2, C_out divisible by groups=1, \*\(8, 8\)\)"):
        fisher_ext.conv_sqnorm(x, g[:, :, :7], **kw)
    with pytest.raises(ValueError, match="x: expected C_in divisible by groups=3, got C_in=4"):
        fisher_ext.conv_sqnorm(x, g, groups=3, **kw)
    with pytest.raises(ValueError, match="C_out divisible by groups=4"):
        fisher_ext.conv_sqnorm(x, g, groups=4, **kw)
    with pytest.raises(ValueError, match=r"kernel_size: expected an int >= 1 or 2 of them, got \(3, 3, 3\)"):
        fisher_ext.conv_sqnorm(x, g, kernel_size=(3, 3, 3), padding=1, bias=True)
    with pytest.raises(ValueError, match="padding: 'same' needs stride 1"):
        fisher_ext.conv_sqnorm(x, g, kernel_size=3, stride=2, padding="same", bias=True)
    with pytest.raises(ValueError, match="padding: expected an int, a tuple, 'same' or 'valid', got 'full'"):
        fisher_ext.conv_sqnorm(x, g, kernel_size=3, padding="full", bias=True)
    with pytest.raises(TypeError, match="x: expected float32, float64, float16 or bfloat16, got torch.int32"):
        fisher_ext.conv_sqnorm(x.int(), g.int(), **kw)


def test_device_mismatch():
    a = torch.randn(4, 5)
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match=f"g: expected device cpu like a, got {other}"):
        fisher_ext.linear_sqnorm(a, torch.randn(4, 6, device=other), bias=True)


def test_op_level_errors_name_the_argument():
    """Callers of torch.ops.fisher_ext directly get the kernel's own checks."""
    with pytest.raises((RuntimeError, ValueError), match="method"):
        torch.ops.fisher_ext.linear_sqnorm(torch.randn(2, 3, 4), torch.randn(2, 3, 5), True, "fastest")
    if fisher_ext.build_info()["extension"]:
        with pytest.raises(RuntimeError, match=r"g: expected the batch size N=2 of a, got 3"):
            torch.ops.fisher_ext.linear_sqnorm(torch.randn(2, 3, 4), torch.randn(3, 3, 5), True, "auto")
        with pytest.raises(RuntimeError, match="x: expected channels divisible by groups=3"):
            torch.ops.fisher_ext.conv_sqnorm(torch.randn(2, 4, 5), torch.randn(2, 3, 3), [3], [1], [0], [1], 3,
                                             True, "auto")


CPU_PATHS = {  # environment of each CPU kernel path (read by the kernel on every call)
    "fused-auto": {},
    "fused-shifted-layout": {"FISHER_EXT_CPU_CONV_LAYOUT": "shift"},
    "fused-panel-layout": {"FISHER_EXT_CPU_CONV_LAYOUT": "panels"},
    "blas": {"FISHER_EXT_CPU_NO_AVX512": "1"},
}


@pytest.mark.parametrize("ghost_path", ["grid", "shift", "im2col"])
def test_cpu_conv_ghost_paths_agree_with_oracle(monkeypatch, ghost_path):
    """Each ghost formulation of the CPU conv kernel: the Gram matrices from the channels-last
    shifted grid (float32, where the strides allow it), the Gram of the padded input gathered per
    kernel offset (no im2col), and the Gram of the unfolded input; every stride, dilation,
    padding, group count and dimensionality of the shared cases, float32 and float64."""
    if not fisher_ext.build_info()["extension"]:
        pytest.skip("the compiled CPU kernel is not loaded in this run")
    monkeypatch.setenv("FISHER_EXT_CPU_CONV_GHOST", ghost_path)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        for case in CONV_CASES:
            for bias in (True, False):
                module, x, g = make_conv(case, bias, dtype=dtype, N=4)
                want = per_example_sqnorm(module, x, g)
                got = fisher_ext.conv_sqnorm(x, g, bias=bias, method="ghost", **conv_kwargs(module))
                assert_close_rel(got, want, tol)


@pytest.mark.parametrize("cpu_path", list(CPU_PATHS))
def test_cpu_paths_agree_with_oracle(monkeypatch, cpu_path):
    """Every path of the CPU kernel (fused AVX-512 with either conv layout, BLAS) is exact in float32."""
    if not fisher_ext.build_info()["extension"]:
        pytest.skip("the compiled CPU kernel is not loaded in this run")
    for name, value in CPU_PATHS[cpu_path].items():
        monkeypatch.setenv(name, value)
    for case in CONV_CASES:  # the shifted layout applies to the unit-stride ones, the others fall back
        module, x, g = make_conv(case, True, dtype=torch.float32, N=5)
        want = per_example_sqnorm(module, x, g)
        got = fisher_ext.conv_sqnorm(x, g, bias=True, method="materialize", **conv_kwargs(module))
        assert_close_rel(got, want, 2e-5)
    for shape in [(5, (9,), 30, 17), (3, (4,), 25, 40), (2, (), 13, 70)]:
        module, a, g = make_linear(shape, True, dtype=torch.float32)
        want = per_example_sqnorm(module, a, g)
        assert_close_rel(fisher_ext.linear_sqnorm(a, g, bias=True, method="materialize"), want, 2e-5)
