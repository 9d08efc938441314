"""Differentiability, torch.library registration, torch.compile, build info."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fisher_ext
from fisher_ext._schemas import SCHEMAS

from test_ops import CONV_CASES, conv_kwargs, make_conv, make_linear


def _linear_fn(bias, method):
    return lambda a, g: fisher_ext.linear_sqnorm(a, g, bias=bias, method=method)


def _conv_fn(module, bias, method):
    return lambda x, g: fisher_ext.conv_sqnorm(x, g, bias=bias, method=method, **conv_kwargs(module))


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("shape", [(3, (), 4, 3), (2, (4,), 3, 5)], ids=str)
def test_linear_gradcheck(device, method, shape):
    _, a, g = make_linear(shape, True, device=device)
    inputs = (a.requires_grad_(), g.requires_grad_())
    fn = _linear_fn(True, method)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[7],
                                  (2, 16, 3, (4, 4), dict(kernel_size=2, padding="same"))],
                         ids=str)
def test_conv_gradcheck(device, case):
    module, x, g = make_conv(case, True, N=2, device=device)
    inputs = (x.requires_grad_(), g.requires_grad_())
    fn = _conv_fn(module, True, "auto")
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_low_precision_grad_dtype(device):
    _, a, g = make_linear((3, (2,), 4, 3), True, dtype=torch.bfloat16, device=device)
    a.requires_grad_()
    fisher_ext.linear_sqnorm(a, g, bias=True).sum().backward()
    assert a.grad.dtype == torch.bfloat16 and a.grad.shape == a.shape


def _op_samples(device):
    _, a, ga = make_linear((3, (4,), 5, 6), True, dtype=torch.float32, device=device)
    module, x, gx = make_conv(CONV_CASES[7], True, dtype=torch.float32, device=device)
    kw = conv_kwargs(module)
    conv_args = [kw["kernel_size"], kw["stride"], [1, 1], kw["dilation"], kw["groups"], True]
    return [
        (torch.ops.fisher_ext.linear_sqnorm.default, (a, ga, True, "ghost")),
        (torch.ops.fisher_ext.linear_sqnorm.default, (a.requires_grad_(), ga, False, "materialize")),
        (torch.ops.fisher_ext.conv_sqnorm.default, (x, gx, *conv_args, "auto")),
        (torch.ops.fisher_ext.conv_sqnorm.default, (x.clone().requires_grad_(), gx, *conv_args, "ghost")),
        (torch.ops.fisher_ext.linear_sqnorm_accumulate_.default,
         (torch.zeros(3, device=device), a.detach(), ga, True, "auto")),
        (torch.ops.fisher_ext.conv_sqnorm_accumulate_.default,
         (torch.zeros(x.shape[0], device=device), x, gx, *conv_args, "materialize")),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(device, index):
    op, args = _op_samples(device)[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module, x, gx = make_conv(CONV_CASES[5], True, dtype=torch.float32)
    _, a, ga = make_linear((3, (4,), 5, 6), True, dtype=torch.float32)

    def total(a, ga, x, gx):
        buf = fisher_ext.linear_sqnorm(a, ga, bias=True)
        return buf + fisher_ext.conv_sqnorm(x, gx, bias=True, **conv_kwargs(module))

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a, ga, x, gx), total(a, ga, x, gx))


def test_declared_ops_are_exactly_those_of_schemas_def():
    # compiled or not, the ops come from fisher_ext/schemas.def (compiled into _C, or read by Python)
    declared = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fisher_ext::")}
    assert declared == set(SCHEMAS) and len(SCHEMAS) == 6
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.fisher_ext, name).default._schema) == f"fisher_ext::{schema}"


def test_build_info_reports_backends():
    info = fisher_ext.build_info()
    expected = "compiled (fisher_ext._C)" if info["extension"] else "reference (pure PyTorch)"
    assert info["backends"]["CPU"] == {op: expected for op in SCHEMAS}
    if info["extension"]:
        assert info["compiled"]["torch_version"] == torch.__version__.split("+")[0]
        assert info["compiled"]["cuda"] == (info["backends"]["CUDA"]["linear_sqnorm"] == "compiled (fisher_ext._C)")
    else:
        assert info["fallback_reason"]
