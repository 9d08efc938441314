"""fisher_ext.register_rule: registration, replacement, errors; the registered rule is used."""

import pytest
import torch
from torch import nn

import fisher_ext
from fisher_ext.rules import rule_for


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return x * self.a * 2


def test_registered_rule_is_used_and_named():
    @fisher_ext.register_rule(Doubler, name="doubler")
    def rule(module, names, call):
        x, g = call.args[0], call.grad
        return {"a": (2 * x * g).square().sum(1)}

    model = nn.Sequential(Doubler(), nn.Linear(3, 4)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.arange(5) % 4
    result = fisher_ext.fisher_trace(model, x, labels=y)
    assert result.coverage["0.a"] == "doubler" and rule_for(model[0]).name == "doubler"
    for n in range(5):  # oracle: example n alone
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum").backward()
        assert result.per_example[n].item() == pytest.approx(sum(p.grad.square().sum().item()
                                                                 for p in model.parameters()), rel=1e-10)


def test_registration_errors():
    with pytest.raises(TypeError, match="module_type: expected an nn.Module subclass"):
        fisher_ext.register_rule(int, lambda m, n, c: {})
    with pytest.raises(TypeError, match="fn: expected a callable"):
        fisher_ext.register_rule(Doubler, 3)
