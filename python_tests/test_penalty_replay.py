"""Decision replay (fisher_ext.penalty.replay): a forward replayed at other inputs differentiates
as the recorded one did at its own, which is what autograd's double backward assumes.

Oracle, for each piecewise-linear op f recorded at z0 and replayed at z1 (far: many pieces change):
the replay's vector-Jacobian product at z1 equals autograd's vjp of f at z0 (the recorded piece's
Jacobian); its value is f(z0) at z0, and at z1 either the recorded piece extended,
f(z0) + J_f(z0) (z1 - z0) (autograd's jvp at z0), or, for ReLU, which replays the value
itself and gates only its backward, f(z1) (the two differ only where z crossed 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_ext.penalty.replay import DecisionMismatch, FrozenDecisions, add_into_grads
from fisher_ext.state import RandomState

OPS = {
    "relu": F.relu,
    "relu_inplace_module": lambda z: nn.ReLU(inplace=True)(z * 1),
    "tensor_relu": lambda z: z.relu(),
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "hardtanh": lambda z: F.hardtanh(z, -0.5, 0.7),
    "relu6": lambda z: F.relu6(z * 8),
    "clamp": lambda z: z.clamp(-0.3, 0.4),
    "clamp_min": lambda z: torch.clamp_min(z, 0.1),
    "abs": torch.abs,
    "threshold": lambda z: F.threshold(z, 0.2, -1.0),
    "hardsigmoid": lambda z: F.hardsigmoid(z * 5),
    "maximum": lambda z: torch.maximum(z, z.flip(-1)),
    "max_of_two": lambda z: torch.max(z, z.roll(1, -1)),
    "max_pool1d": lambda z: F.max_pool1d(z, 3, stride=2, padding=1),
    "max_pool2d": lambda z: nn.MaxPool2d(2)(z.reshape(2, 3, 4, 4)),
    "max_pool2d_indices": lambda z: F.max_pool2d(z.reshape(2, 3, 4, 4), 2, return_indices=True)[0],
    "adaptive_max_pool1d": lambda z: F.adaptive_max_pool1d(z, 5),
    "max_pool3d": lambda z: F.max_pool3d(z.reshape(2, 3, 2, 2, 4), 2),
    "max_dim": lambda z: z.max(dim=-1).values,
    "min_dim_keepdim": lambda z: torch.min(z, -1, keepdim=True)[0],
    "max_all": lambda z: z.max(),
    "mask_from_comparison": lambda z: z * (z > 0.1),
    "where_on_sign": lambda z: torch.where(z.detach() > 0, z, 2 * z),
    "argmax_gather": lambda z: z.gather(-1, z.argmax(-1, keepdim=True)),
    "topk": lambda z: z.topk(4, dim=-1).values,
    "sort": lambda z: torch.sort(z, dim=1)[0],
    "kthvalue": lambda z: z.kthvalue(3, dim=-1, keepdim=True).values,
    "median_dim": lambda z: z.median(dim=-1).values,
    "median_all": lambda z: z.median(),
    "msort": torch.msort,
}


RELU = {"relu", "relu_inplace_module", "tensor_relu"}


@pytest.mark.parametrize("name", list(OPS))
def test_replay_follows_the_recorded_piece(name):
    op = OPS[name]
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    z1 = z0 + 1.5 * torch.randn(z0.shape, generator=g, dtype=torch.float64)  # far: many pieces change
    decisions = FrozenDecisions()
    leaf0 = z0.clone().requires_grad_()
    with decisions:
        decisions.active = True
        recorded = op(leaf0)
    assert decisions.log, "nothing recorded"
    w = torch.randn(recorded.shape, generator=g, dtype=torch.float64)
    (want_vjp,) = torch.autograd.grad(recorded, leaf0, w)
    replayed = {}
    for at in (z0, z1):
        leaf = at.clone().requires_grad_()
        with decisions.replay():
            decisions.active = True
            out = op(leaf)
        assert decisions.finished()
        (vjp,) = torch.autograd.grad(out, leaf, w)
        tol = 1e-7 if name == "hardsigmoid" else 1e-12  # autograd's hardsigmoid slope 1/6 is a float32 constant
        torch.testing.assert_close(vjp, want_vjp, rtol=tol, atol=tol)
        replayed[id(at)] = out.detach()
    torch.testing.assert_close(replayed[id(z0)], recorded.detach(), rtol=1e-15, atol=1e-15)
    plain = op(z1)
    if name in RELU:
        torch.testing.assert_close(replayed[id(z1)], plain, rtol=0, atol=0)
    else:
        _, linear = torch.func.jvp(op, (z0,), (z1 - z0,))  # autograd's derivative at z0 along the move
        torch.testing.assert_close(replayed[id(z1)] - recorded.detach(), linear, rtol=tol, atol=tol)
    leaf1 = z1.clone().requires_grad_()
    (plain_vjp,) = torch.autograd.grad(op(leaf1), leaf1, w)
    assert not torch.allclose(plain_vjp, want_vjp), "the move changed no piece: the test is blind"


def replay_at(op, z0, z1):
    decisions = FrozenDecisions()
    with decisions:
        decisions.active = True
        op(z0.clone().requires_grad_())
    with decisions.replay():
        decisions.active = True
        return op(z1.clone().requires_grad_())


def test_python_branches_on_tensor_values_are_replayed():
    op = lambda z: z * 2 if z.sum().item() > 0 else z * 3  # noqa: E731
    z0 = torch.rand(3, 4, dtype=torch.float64)
    torch.testing.assert_close(replay_at(op, z0, -z0).detach(), -2 * z0, rtol=0, atol=0)
    op = lambda z: z * 2 if z.sum() > 0 else z * 3  # noqa: E731  (Tensor.__bool__)
    torch.testing.assert_close(replay_at(op, z0, -z0).detach(), -2 * z0, rtol=0, atol=0)


@pytest.mark.parametrize("op", [nn.Hardswish(inplace=True), nn.ReLU(inplace=True), nn.Hardtanh(inplace=True)],
                         ids=["hardswish", "relu", "hardtanh"])
def test_in_place_replay_matches_out_of_place_and_backpropagates(op):
    z0 = torch.randn(4, 8, dtype=torch.float64)
    z1 = z0 + torch.randn(4, 8, dtype=torch.float64)
    out_of_place = type(op)()
    want = replay_at(lambda z: out_of_place(z * 1), z0, z1)
    leaf = z1.clone().requires_grad_()
    decisions = FrozenDecisions()
    with decisions:
        decisions.active = True
        op(z0.clone().requires_grad_() * 1)
    with decisions.replay():
        decisions.active = True
        got = op(leaf * 1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    got.sum().backward()  # the in-place replay leaves a graph autograd can run
    assert leaf.grad is not None


def test_replay_is_a_graph_autograd_differentiates():
    z0 = torch.randn(4, 8, dtype=torch.float64)
    decisions = FrozenDecisions()
    with decisions:
        decisions.active = True
        F.relu(z0.clone().requires_grad_())
    z1 = (z0 + 1).requires_grad_()
    with decisions.replay():
        decisions.active = True
        out = F.relu(z1)
    (grad,) = torch.autograd.grad(out.sum(), z1)
    assert torch.equal(grad, (z0 > 0).double())
    assert torch.equal(out, F.relu(z1))


def test_replay_of_another_call_is_refused():
    z = torch.randn(4, 8, requires_grad=True)
    decisions = FrozenDecisions()
    with decisions:
        decisions.active = True
        F.relu(z)
    with pytest.raises(DecisionMismatch, match=r"called .*hardtanh where the recorded one called relu"):
        with decisions.replay():
            decisions.active = True
            F.hardtanh(z)


def test_inactive_and_no_grad_calls_are_left_alone():
    z = torch.randn(4, 8, requires_grad=True)
    decisions = FrozenDecisions()
    with decisions:
        F.relu(z)  # not active
        decisions.active = True
        with torch.no_grad():
            F.relu(z)
        F.relu(torch.randn(3))  # no input requires grad
    assert decisions.log == []


def test_random_state_replays_and_restores():
    torch.manual_seed(3)
    state = RandomState()
    first = torch.rand(4)
    with state.replayed():
        again = torch.rand(4)
    assert torch.equal(first, again)
    torch.manual_seed(3)
    torch.rand(4)
    assert torch.equal(torch.rand(2), (torch.manual_seed(3), torch.rand(4), torch.rand(2))[2])


def test_add_into_grads_as_a_plain_backward():
    p = torch.zeros(3, 4).t().requires_grad_()  # a transposed layout
    q = torch.zeros(2, requires_grad=True)
    r = torch.zeros(2, requires_grad=True)
    q.grad = torch.ones(2)
    g = torch.arange(12.0).reshape(4, 3)
    add_into_grads([p, q, r], [g, torch.ones(2), None])
    assert p.grad.stride() == p.stride() and torch.equal(p.grad, g)
    assert torch.equal(q.grad, torch.full((2,), 2.0)) and r.grad is None
