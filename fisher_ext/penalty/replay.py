"""Running a model a second time as it ran the first time.

The penalty's extra passes must see the model exactly as the watched (training) pass saw it,
apart from the parameters they are asked to move (docs/design.md, "Extra passes"):

- :class:`FrozenDecisions` records every discrete decision a forward makes and replays it in a
  later forward: ReLU gates, clamp and hardtanh ranges, max-pool and max/min choices, and any
  non-differentiable output computed from tensors that require grad (comparisons, argmax,
  masks, detached values). A finite difference of gradients is
  then the difference along one smooth piece, whose limit is the Hessian autograd differentiates
  (it treats every such decision as constant); without it each ReLU that changes sides adds a
  gradient jump divided by the radius, which in float32 dominates the estimate.
- :class:`RandomState` replays the random stream (dropout masks) and restores it after;
- :class:`BufferState` runs the pass on copies of the buffers as they were before the watched pass;
- :func:`add_into_grads` writes a gradient into ``.grad`` as a plain backward would.
"""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..capture import tensor_args

Tensor = torch.Tensor


class DecisionMismatch(RuntimeError):
    """The replayed forward did not call what the recorded one called at the same point
    (data-dependent control flow, or a different input)."""


# ---- piecewise-linear elementwise ops: a recorded gate, a replay along the recorded piece ----------

def _first(args, kwargs, name: str, index: int, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


_INPLACE_ARG = {F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.hardsigmoid: 1,
                F.hardswish: 1}  # the position of their ``inplace`` argument


def _inplace(func, args, kwargs) -> bool:
    index = _INPLACE_ARG.get(func)
    if index is not None:
        return bool(_first(args, kwargs, "inplace", index, False))
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


class _GatedReLU(torch.autograd.Function):
    """ReLU at the shifted input whose backward gates with the recorded output's signs (the
    recorded pass's decisions): ReLU's own kernels, no mask to compute or store."""

    @staticmethod
    def forward(ctx, z, recorded, inplace):
        ctx.save_for_backward(recorded)
        if inplace:
            ctx.mark_dirty(z)
            return z.relu_()
        return torch.relu(z)

    @staticmethod
    def backward(ctx, g):
        (recorded,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g, recorded, 0), None, None


def _relu_record(func, args, kwargs):
    out = func(*args, **kwargs)
    recorded = out.detach()  # autograd keeps it for ReLU's backward anyway; shares out's version counter
    return out, (recorded, recorded._version)


def _relu_replay(func, args, kwargs, gate):
    recorded, version = gate
    if recorded._version != version:
        raise DecisionMismatch("a ReLU's output was modified in place after the watched forward, so its "
                               "decisions cannot be read back")
    return _GatedReLU.apply(args[0], recorded, _inplace(func, args, kwargs))


def _leaky_gate(func, args, kwargs):
    return (args[0] > 0,)


def _leaky_replay(func, args, kwargs, gate):
    z, slope = args[0], _first(args, kwargs, "negative_slope", 1, 0.01)
    return torch.where(gate[0], z, z * slope)


def _bounds(func, args, kwargs):
    if func is F.relu6:
        return 0.0, 6.0
    if func in (F.hardtanh, F.hardtanh_):
        return _first(args, kwargs, "min_val", 1, -1.0), _first(args, kwargs, "max_val", 2, 1.0)
    name = func.__name__
    if name.startswith("clamp_min"):
        return _first(args, kwargs, "min", 1), None
    if name.startswith("clamp_max"):
        return None, _first(args, kwargs, "max", 1)
    return _first(args, kwargs, "min", 1), _first(args, kwargs, "max", 2)


def _clamp_gate(func, args, kwargs):
    z = args[0]
    low, high = _bounds(func, args, kwargs)
    return (z < low if low is not None else None, z > high if high is not None else None)


def _clamp_replay(func, args, kwargs, gate):
    z = args[0]
    low, high = _bounds(func, args, kwargs)
    value = z
    if gate[0] is not None:
        value = torch.where(gate[0], low, value)
    if gate[1] is not None:
        value = torch.where(gate[1], high, value)
    return value


def _abs_gate(func, args, kwargs):
    return (args[0] < 0,)


def _abs_replay(func, args, kwargs, gate):
    z = args[0]
    return torch.where(gate[0], -z, z)


def _threshold_gate(func, args, kwargs):
    return (args[0] > _first(args, kwargs, "threshold", 1),)


def _threshold_replay(func, args, kwargs, gate):
    z, value = args[0], _first(args, kwargs, "value", 2)
    return torch.where(gate[0], z, value)


def _hard_gate(func, args, kwargs):
    return (args[0] <= -3, args[0] >= 3)


def _hardsigmoid_replay(func, args, kwargs, gate):
    z = args[0]
    value = torch.where(gate[0], 0.0, torch.where(gate[1], 1.0, z / 6 + 0.5))
    return value


def _hardswish_replay(func, args, kwargs, gate):
    z = args[0]
    value = torch.where(gate[0], 0.0, torch.where(gate[1], z, z * (z + 3) / 6))
    return value


def _pick_gate(func, args, kwargs):
    a, b = args[0], args[1]
    return ((a >= b) if "max" in func.__name__ else (a <= b),)


def _pick_replay(func, args, kwargs, gate):
    return torch.where(gate[0], args[0], args[1])


# ---- selections: the recorded indices pick the replayed values -----------------------------------

_POOLS = {getattr(F, f"{kind}max_pool{d}d{suffix}"): d for kind in ("", "adaptive_") for d in (1, 2, 3)
          for suffix in ("", "_with_indices")}


def _with_indices(func, kwargs) -> bool:
    return func.__name__.endswith("_with_indices") or bool(kwargs.get("return_indices", False))


def _pool_record(func, args, kwargs):
    values, indices = func(*args, **dict(kwargs, return_indices=True))
    return ((values, indices) if _with_indices(func, kwargs) else values), (indices,)


def _pool_replay(func, args, kwargs, gate):
    z, (indices,) = args[0], gate
    d = _POOLS[func]  # the indices count positions within each (example, channel) plane
    values = z.flatten(z.dim() - d).gather(-1, indices.flatten(indices.dim() - d)).view(indices.shape)
    return (values, indices) if _with_indices(func, kwargs) else values


def _reduce_dim(args, kwargs):
    dim = _first(args, kwargs, "dim", 1)
    return None if isinstance(dim, Tensor) else dim


def _select_record(func, args, kwargs):
    out = func(*args, **kwargs)
    if _first(args, kwargs, "dim", 1) is None:  # a full reduction: remember the flat position
        z = args[0]
        flat = z.detach().flatten()
        return out, ((flat == out.detach()).nonzero()[0],)
    return out, (out[1],)


def _select_replay(func, args, kwargs, gate):
    z, (indices,) = args[0], gate
    dim = _first(args, kwargs, "dim", 1)
    if dim is None:
        return z.flatten()[indices].reshape(())
    keepdim = _first(args, kwargs, "keepdim", 2, False)
    values = z.gather(dim, indices if keepdim else indices.unsqueeze(dim))
    values = values if keepdim else values.squeeze(dim)
    return _RETURN_TYPES[func.__name__]((values, indices))


def _indexed_record(func, args, kwargs):
    out = func(*args, **kwargs)
    if func in (torch.msort, torch.Tensor.msort):
        return out, (torch.argsort(args[0].detach(), dim=0, stable=True),)
    return out, (out[1],)


def _indexed_dim(func, args, kwargs) -> int:
    if func in (torch.msort, torch.Tensor.msort):
        return 0
    index = 2 if func in (torch.topk, torch.Tensor.topk, torch.kthvalue, torch.Tensor.kthvalue) else 1
    return _first(args, kwargs, "dim", index, -1)


def _indexed_replay(func, args, kwargs, gate):
    """sort / topk / kthvalue / median / mode along a dim: the values at the recorded indices."""
    z, (indices,) = args[0], gate
    dim = _indexed_dim(func, args, kwargs)
    if func in (torch.msort, torch.Tensor.msort):
        return z.gather(0, indices)
    keepdim = indices.dim() == z.dim()
    values = z.gather(dim, indices if keepdim else indices.unsqueeze(dim))
    values = values if keepdim else values.squeeze(dim)
    return _RETURN_TYPES[func.__name__]((values, indices))


_RETURN_TYPES = {"max": torch.return_types.max, "min": torch.return_types.min, "sort": torch.return_types.sort,
                 "topk": torch.return_types.topk,
                 "kthvalue": torch.return_types.kthvalue, "median": torch.return_types.median,
                 "mode": torch.return_types.mode}


def _elementwise(gate, replay):
    """A table entry for an elementwise op: its gate recorded, replayed along the recorded piece
    (in place on a copy where the op is in place)."""
    def record(func, args, kwargs):
        g = gate(func, args, kwargs)  # before the call: an in-place op overwrites its input
        return func(*args, **kwargs), g
    return record, replay, True


def _table() -> dict[Callable, tuple[Callable, Callable]]:
    T = torch.Tensor
    table: dict = {}

    def add(funcs, record, replay, elementwise=False):
        for f in funcs:
            if f is not None:
                table[f] = (record, replay, elementwise)

    add([F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_], _relu_record, _relu_replay)
    add([F.leaky_relu, F.leaky_relu_], *_elementwise(_leaky_gate, _leaky_replay))
    add([F.hardtanh, F.hardtanh_, F.relu6, torch.clamp, torch.clamp_, torch.clip, torch.clip_, T.clamp, T.clamp_,
         T.clip, T.clip_, torch.clamp_min, torch.clamp_min_, torch.clamp_max, torch.clamp_max_, T.clamp_min,
         T.clamp_min_, T.clamp_max, T.clamp_max_], *_elementwise(_clamp_gate, _clamp_replay))
    add([torch.abs, torch.abs_, T.abs, T.abs_, T.__abs__, torch.absolute, T.absolute],
        *_elementwise(_abs_gate, _abs_replay))
    add([F.threshold, F.threshold_], *_elementwise(_threshold_gate, _threshold_replay))
    add([F.hardsigmoid], *_elementwise(_hard_gate, _hardsigmoid_replay))
    add([F.hardswish], *_elementwise(_hard_gate, _hardswish_replay))
    add([torch.maximum, torch.minimum, T.maximum, T.minimum, torch.fmax, torch.fmin, T.fmax, T.fmin],
        *_elementwise(_pick_gate, _pick_replay))
    add(list(_POOLS), _pool_record, _pool_replay)
    add([torch.sort, T.sort, torch.topk, T.topk, torch.kthvalue, T.kthvalue, torch.msort, T.msort, torch.mode,
         T.mode], _indexed_record, _indexed_replay)
    return table


_SELECT = (torch.max, torch.min, torch.Tensor.max, torch.Tensor.min, torch.median, torch.Tensor.median)
# Python values read off a tensor (control flow on them): replayed as recorded
_SCALARS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
            torch.Tensor.__int__, torch.Tensor.__index__)
_TABLE = _table()


def _requires_grad(leaves: Sequence) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in leaves)


class FrozenDecisions(TorchFunctionMode):
    """Records the discrete decisions of one forward (``mode='record'``), then makes later forwards
    take the same ones (``mode='replay'``), call by call in the same order.

    Only calls made while :attr:`active` is set are recorded or replayed (the caller brackets the
    model's own forward with it). A replayed forward that calls something else at the same point
    raises :class:`DecisionMismatch`.
    """

    def __init__(self):
        super().__init__()
        self.mode = "record"
        self.active = False
        self.log: list[tuple[Callable, Any]] = []
        self._next = 0

    def replay(self) -> FrozenDecisions:
        """Switches to replaying the recorded decisions from the first one."""
        self.mode, self._next = "replay", 0
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active or not torch.is_grad_enabled():  # no_grad code and custom Functions' insides run as
            return func(*args, **kwargs)                    # they are: autograd sees no decision there
        selection = func in _SELECT and not (len(args) > 1 and isinstance(args[1], Tensor))
        handler = _TABLE.get(func)
        if func in _SELECT and handler is None and not selection:  # torch.max(a, b) is maximum
            handler = _TABLE[torch.maximum]
        if selection:
            handler = (_select_record, _select_replay, False)
        if self.mode == "record":
            return self._record(func, handler, args, kwargs)
        return self._replay(func, handler, args, kwargs)

    def _record(self, func, handler, args, kwargs):
        leaves = tensor_args(args, kwargs)
        if not _requires_grad(leaves):
            return func(*args, **kwargs)
        if handler is not None:
            out, gate = handler[0](func, args, kwargs)
            self.log.append((func, gate))
            return out
        out = func(*args, **kwargs)
        if func in _SCALARS or _is_fresh_constant(out, leaves):
            self.log.append((func, out))  # a decision or a constant: the replay returns this value
        return out

    def _replay(self, func, handler, args, kwargs):
        leaves = tensor_args(args, kwargs)
        if not _requires_grad(leaves):
            return func(*args, **kwargs)
        if handler is None and func not in _SCALARS:
            out = func(*args, **kwargs)
            if not _is_fresh_constant(out, leaves):
                return out
        payload = self._take(func)
        if handler is None:
            return payload
        if handler[2] and _inplace(func, args, kwargs):  # along the piece, out of place, then in place
            value = handler[1](func, (args[0].clone(),) + tuple(args[1:]), kwargs, payload)
            return args[0].copy_(value)
        return handler[1](func, args, kwargs, payload)

    def _take(self, func):
        if self._next >= len(self.log) or self.log[self._next][0] is not func:
            want = self.log[self._next][0] if self._next < len(self.log) else "nothing more"
            raise DecisionMismatch(f"the replayed forward called {_name(func)} where the recorded one called "
                                   f"{_name(want)} (data-dependent control flow?)")
        self._next += 1
        return self.log[self._next - 1][1]

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[FrozenDecisions]:
        """Active for the block, recording or replaying only inside ``model``'s own forward (not
        in the code around it, such as ``functional_call``'s parameter swap)."""
        def start(*_):
            self.active = True

        def stop(*_):
            self.active = False

        handles = [model.register_forward_pre_hook(start),
                   model.register_forward_hook(stop, always_call=True)]
        try:
            with self:
                yield self
        finally:
            self.active = False
            for h in handles:
                h.remove()

    def finished(self) -> bool:
        """Whether the replay used every recorded decision."""
        return self._next == len(self.log)


def _is_fresh_constant(out: Any, leaves: Sequence) -> bool:
    """A tensor result that carries no gradient and is not one of the inputs (not in place)."""
    if isinstance(out, Tensor):
        if out.requires_grad:
            return False
        outs = [out]
    else:
        outs = tree_leaves(out)
        if not outs or not all(isinstance(o, Tensor) for o in outs):
            return False
    inputs = {id(t) for t in leaves if isinstance(t, Tensor)}
    return all(not o.requires_grad and id(o) not in inputs for o in outs)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


# ---- .grad ------------------------------------------------------------------------------------------

def add_into_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Adds each gradient into its parameter's ``.grad`` as a plain backward would: in the
    parameter's own layout, taking over a fresh gradient without a copy, and leaving a parameter
    that got no gradient (None) as it was."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g.detach()
        if p.grad is not None:
            p.grad.add_(g)
        elif g.stride() == p.stride() and g.dtype == p.dtype and not g._is_view():
            p.grad = g
        else:
            p.grad = torch.empty_like(p).copy_(g)
