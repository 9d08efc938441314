"""linear_grad_sqnorm / conv_grad_sqnorm: the batch's weight and bias gradients against autograd
in float64 on the real nn.Linear / nn.Conv*d, the weight's and the bias's norms against the
float64 per-example oracle, on every CPU kernel path (the fused AVX-512 paths add each
per-example tile into the weight gradient; the others take ATen's)."""

from __future__ import annotations

import pytest
import torch

import fisher_ext
from oracle import per_parameter_sqnorms
from test_ops import CONV_CASES, CPU_PATHS, LINEAR_SHAPES, assert_close_rel, conv_kwargs, make_conv, make_linear


def autograd_grads(module, x, g):
    """float64 weight and bias gradients of <module(x), g> by autograd on the module itself."""
    module = module.double()
    module.zero_grad(set_to_none=True)
    (module(x.double().cpu()) * g.double().cpu()).sum().backward()  # the module stays on the CPU
    return module.weight.grad, (module.bias.grad if module.bias is not None else None)


def check(got, module, x, g, bias, tol):
    weight, bias_grad, weight_norms, bias_norms = got
    want_w, want_b = autograd_grads(module, x, g)
    want_norms = per_parameter_sqnorms(module, x.cpu(), g.cpu())
    assert weight.dtype == x.dtype and weight.shape == module.weight.shape
    scale = want_w.abs().max().clamp_min(1e-30)
    assert ((weight.double().cpu() - want_w).abs().max() / scale).item() <= tol
    if bias:
        assert bias_grad.dtype == x.dtype and bias_grad.shape == module.bias.shape
        assert ((bias_grad.double().cpu() - want_b).abs().max() / want_b.abs().max()).item() <= tol
        assert bias_norms.dtype == weight_norms.dtype
        assert_close_rel(bias_norms, want_norms["bias"], tol)
    else:
        assert bias_grad is None and bias_norms is None
    assert_close_rel(weight_norms, want_norms["weight"], tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=str)
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_linear(device, dtype, tol, method):
    for shape in LINEAR_SHAPES + [(4, (9,), 30, 17), (3, (5,), 25, 40)]:
        for bias in (True, False):
            module, a, g = make_linear(shape, bias, dtype=dtype, device=device)
            check(fisher_ext.linear_grad_sqnorm(a, g, bias=bias, method=method), module, a, g, bias, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=str)
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_conv(device, dtype, tol, method):
    # The weight gradient is cuDNN's on the GPU, which rounds float32 to TF32 unless told not to (as
    # the training backward does); against the float64 oracle, full float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for case in CONV_CASES:
            for bias in (True, False):
                module, x, g = make_conv(case, bias, N=4, dtype=dtype, device=device)
                got = fisher_ext.conv_grad_sqnorm(x, g, bias=bias, method=method, **conv_kwargs(module))
                check(got, module, x, g, bias, tol)


@pytest.mark.parametrize("cpu_path", list(CPU_PATHS))
def test_cpu_paths(monkeypatch, cpu_path):
    """Each CPU path's weight gradient, at sizes that span several threads' partial sums and the
    channel tails of the register tiles."""
    if not fisher_ext.build_info()["extension"]:
        pytest.skip("the compiled CPU kernel is not loaded in this run")
    for name, value in CPU_PATHS[cpu_path].items():
        monkeypatch.setenv(name, value)
    # and two with more than 32 output channels whose 27 and 117 im2col rows (13 channels in the
    # shifted layout) take the 14-column tiles
    wide = [(2, 3, 40, (8, 8), {"kernel_size": 3, "padding": 1}), (2, 13, 37, (6, 7), {"kernel_size": 3, "padding": 1})]
    for case in CONV_CASES + wide:
        module, x, g = make_conv(case, True, N=9, dtype=torch.float32)
        got = fisher_ext.conv_grad_sqnorm(x, g, bias=True, method="materialize", **conv_kwargs(module))
        check(got, module, x, g, True, 2e-5)
    for shape in [(9, (9,), 30, 17), (7, (4,), 25, 40), (5, (3,), 13, 70)]:
        module, a, g = make_linear(shape, True, dtype=torch.float32)
        check(fisher_ext.linear_grad_sqnorm(a, g, bias=True, method="materialize"), module, a, g, True, 2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision(device, dtype):
    """float32 accumulation: the norms as the norm op gives them, the gradients in the inputs' dtype
    within that dtype's rounding of the float64 result."""
    module, x, g = make_conv(CONV_CASES[5], True, N=4, dtype=dtype, device=device)
    weight, bias_grad, norms, bias_norms = fisher_ext.conv_grad_sqnorm(x, g, bias=True, **conv_kwargs(module))
    want_w, want_b = autograd_grads(module, x, g)
    eps = torch.finfo(dtype).eps
    assert weight.dtype == dtype and bias_grad.dtype == dtype and norms.dtype == bias_norms.dtype == torch.float32
    assert ((weight.double().cpu() - want_w).abs().max() / want_w.abs().max()).item() <= 4 * eps
    want = per_parameter_sqnorms(module, x.cpu(), g.cpu())
    assert_close_rel(norms, want["weight"], 2e-5)
    assert_close_rel(bias_norms, want["bias"], 2e-5)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_norms_equal_the_norm_op(device, method):
    """Given one method, the fused op's weight norms are the norm op's own without bias (same
    kernels, same summation order). Their 'auto' may differ: the fused op's weighs the weight
    gradient it gets for free."""
    module, x, g = make_conv(CONV_CASES[10], True, N=6, dtype=torch.float32, device=device)
    _, _, norms, _ = fisher_ext.conv_grad_sqnorm(x, g, bias=True, method=method, **conv_kwargs(module))
    assert torch.equal(norms, fisher_ext.conv_sqnorm(x, g, bias=False, method=method, **conv_kwargs(module)))


def test_empty_batch(device):
    module, a, g = make_linear((2, (3,), 5, 4), True, device=device)
    weight, bias_grad, norms, bias_norms = fisher_ext.linear_grad_sqnorm(a[:0], g[:0], bias=True)
    assert norms.shape == bias_norms.shape == (0,) and weight.shape == (4, 5)
    assert torch.equal(weight, torch.zeros_like(weight)) and torch.equal(bias_grad, torch.zeros(4, device=device))
    module, x, g = make_conv(CONV_CASES[4], True, device=device)
    weight, _, norms, bias_norms = fisher_ext.conv_grad_sqnorm(x[:0], g[:0], bias=True, **conv_kwargs(module))
    assert norms.shape == bias_norms.shape == (0,) and weight.shape == module.weight.shape and not weight.any()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="g: expected shape"):
        fisher_ext.linear_grad_sqnorm(torch.randn(2, 3, 4), torch.randn(2, 5, 4), bias=True)
    with pytest.raises(ValueError, match="method: expected one of"):
        fisher_ext.linear_grad_sqnorm(torch.randn(2, 4), torch.randn(2, 3), bias=True, method="fast")
    with pytest.raises(ValueError, match="g: expected shape"):
        fisher_ext.conv_grad_sqnorm(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 7, 7), kernel_size=3, bias=True)
    with pytest.raises(TypeError, match="g: expected dtype"):
        fisher_ext.conv_grad_sqnorm(torch.randn(2, 3, 8), torch.randn(2, 4, 6).double(), kernel_size=3, bias=False)


def test_fake_tensor_shapes():
    """The fake kernels give the real ops' output shapes and dtypes (torch.compile, meta tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module, x, g = make_conv(CONV_CASES[6], True, dtype=torch.float32)
    real = fisher_ext.conv_grad_sqnorm(x, g, bias=True, **conv_kwargs(module))
    with FakeTensorMode() as mode:
        fake = fisher_ext.conv_grad_sqnorm(mode.from_tensor(x), mode.from_tensor(g), bias=True, **conv_kwargs(module))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype
    _, a, gl = make_linear((3, (4,), 6, 5), False, dtype=torch.float32)
    with FakeTensorMode() as mode:
        w, b, n, bn = fisher_ext.linear_grad_sqnorm(mode.from_tensor(a), mode.from_tensor(gl), bias=False)
    assert w.shape == (5, 6) and b is None and n.shape == (3,) and bn is None
