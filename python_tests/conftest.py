import pytest
import torch

import fisher_ext
from fisher_ext import reference
from fisher_ext.ops import _conv_padding

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


class Backend:
    """Calls the public op (served by _C or, in fallback mode, by the reference) or the reference directly."""

    def __init__(self, name: str):
        self.name = name

    def linear(self, a, g, *, bias, method="auto"):
        if self.name == "ops":
            return fisher_ext.linear_sqnorm(a, g, bias=bias, method=method)
        return reference.linear_sqnorm(a, g, bias, method)

    def conv(self, x, g, *, kernel_size, stride, padding, dilation, groups, bias, method="auto"):
        if self.name == "ops":
            return fisher_ext.conv_sqnorm(x, g, kernel_size=kernel_size, stride=stride, padding=padding,
                                          dilation=dilation, groups=groups, bias=bias, method=method)
        nd = x.dim() - 2
        tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
        ks, st, dil = tup(kernel_size), tup(stride), tup(dilation)
        lead, _ = _conv_padding(padding, x.shape[2:], ks, st, dil)
        return reference.conv_sqnorm(x, g, ks, st, lead, dil, groups, bias, method)


@pytest.fixture(params=["ops", "reference"])
def backend(request):
    return Backend(request.param)


def pytest_report_header(config):
    info = fisher_ext.build_info()
    return f"fisher_ext: extension={info['extension']} backends={info['backends']['CPU']['linear_sqnorm']} (CPU)"
