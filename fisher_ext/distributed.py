"""The global batch across the processes of torch.distributed (DistributedDataParallel).

Each process (rank ``r`` of ``k``) holds ``n_r`` of the global batch's ``N = sum_r n_r``
examples. A quantity that is a mean over the global batch is the ``n_r / N``-weighted sum of the
ranks' own means, formed here with one all-reduce. A gradient written into ``.grad`` is then
averaged over the ranks (``1/k``) by DDP's reducer, or by the caller's own all-reduce, so each rank
writes its *share*: its part of the global gradient times ``k`` (``share = k n_r / N``).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Sequence

import torch
from torch import nn

Tensor = torch.Tensor
SCOPES = ("global", "local")


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the module that computes, the DistributedDataParallel wrapper around it or None); a DDP
    wrapper compiled (``torch.compile(DDP(model))``) is found inside the compiled module."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, DistributedDataParallel):
        return inner.module, inner
    return model, None


def refuse_fsdp(model: nn.Module, what: str) -> None:
    """FSDP shards the parameters: whole only inside its own forward and backward, which the
    penalty's and the monitor's gradients (autograd.grad of the parameters, re-runs of the
    forward with shifted parameters) do not go through."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel | FSDPModule):
            raise ValueError(f"{what}: {name or 'the model'} is sharded by FSDP ({type(module).__name__}), whose "
                             "parameters exist whole only inside its own forward and backward; use "
                             "DistributedDataParallel")


def refuse_static_graph(ddp: nn.Module | None) -> None:
    """The gradient is written through the reducer's per-parameter hooks; with ``static_graph``
    the reducer all-reduces once, from a callback of the model's own backward, which a gradient
    formed another way never triggers (the replicas would drift apart silently)."""
    if ddp is not None and getattr(ddp, "static_graph", False):
        raise ValueError("model: DistributedDataParallel(static_graph=True) all-reduces from a callback of the "
                         "model's own backward, which the penalty's and the monitor's gradients do not run; wrap "
                         "the model without static_graph (find_unused_parameters and no_sync() are supported)")


def process_group(ddp: nn.Module | None, scope: str | None):
    """The process group whose ranks share the global batch, or None (one process, or
    ``scope='local'``). Raises where a DDP model comes without an initialized group."""
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES} or None, got {scope!r}")
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if ddp is not None and not initialized:
        raise RuntimeError("model: a DistributedDataParallel model, but torch.distributed's default process group is "
                           "not initialized (call torch.distributed.init_process_group first, in every process)")
    if scope == "local" or not initialized:
        return None
    group = ddp.process_group if ddp is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def rank(group) -> int:
    """This process's rank in ``group`` (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank(group) if group is not None else 0


def _device(group, like: torch.device | None = None) -> torch.device:
    """Where this group's collectives take their tensors: NCCL's on the model's GPU (``like``), or
    the current one; the others' on the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return like if like is not None and like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


FAILED, NOT_FINITE = 2, 1  # agreement codes, worst first


def _worst(group, code: int, device: torch.device | None) -> int:
    import torch.distributed as dist

    t = torch.tensor([code], dtype=torch.int32, device=_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


@contextlib.contextmanager
def agreement(group, device: torch.device | None = None):
    """Local work (no collectives inside) whose failure on any rank every rank learns at its end,
    in one collective, so that all raise together rather than the others waiting for the failed
    one in the step's next collective. A FloatingPointError (a value not finite) is raised as one
    on the other ranks too (the training runner stops a diverged run on that type)."""
    if group is None:
        yield
        return
    try:
        yield
    except Exception as e:
        _worst(group, NOT_FINITE if isinstance(e, FloatingPointError) else FAILED, device)
        raise
    code = _worst(group, 0, device)
    if code == NOT_FINITE:
        raise FloatingPointError("a value is not finite on another process (its own error says which); nothing "
                                 "was written into .grad")
    if code == FAILED:
        raise RuntimeError("this step failed on another process (its own error says why); nothing was written "
                           "into .grad")


def check_same_model(group, params: Sequence[Tensor], what: str) -> None:
    """Every rank must hold the same parameters (count, shapes, dtypes): a collective call."""
    import torch.distributed as dist

    signature = zlib.crc32(repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode())  # the same in every process
    mine = torch.tensor([len(params), sum(p.numel() for p in params), signature], dtype=torch.int64,
                        device=_device(group, params[0].device if params else None))
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    for rank, other in enumerate(everyone):
        if not torch.equal(other, everyone[0]):
            first = f"{int(everyone[0][0])} trainable parameters, {int(everyone[0][1])} elements"
            raise ValueError(f"{what}: the ranks of the process group hold different models (rank 0: {first}; rank "
                             f"{rank}: {int(other[0])}, {int(other[1])}, or other shapes); every rank must build the "
                             "same model")


class Shards:
    """This rank's part of one global batch: ``n`` of ``total`` examples over ``world`` ranks."""

    def __init__(self, group, n: int, device: torch.device | None = None):
        import torch.distributed as dist

        self.group, self.n, self.device = group, n, device
        self.world = dist.get_world_size(group)
        self.total: int | None = None  # known after the first mean()

    @property
    def share(self) -> float:
        """``k n_r / N``: a rank's gradient of its own mean, times this, is its share of the
        global mean's gradient (ranks' gradients are averaged)."""
        return self.world * self.n / self.total

    def mean(self, local: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
        """The global-batch mean of quantities each rank holds as the mean over its own examples
        (None: zero, shaped as ``like``), identical on every rank: one all-reduce."""
        import torch.distributed as dist

        parts = [(t.detach() if t is not None else torch.zeros_like(ref)).reshape(-1) for t, ref in zip(local, like)]
        device = parts[0].device if parts else torch.device("cpu")
        dtype = torch.promote_types(parts[0].dtype, torch.float64) if parts and parts[0].is_floating_point() \
            else torch.float64
        flat = torch.cat([p.to(dtype) * self.n for p in parts] + [torch.tensor([float(self.n)], dtype=dtype,
                                                                                device=device)])
        dist.all_reduce(flat, group=self.group)
        self.total = int(round(float(flat[-1])))
        out, start = [], 0
        for p, ref in zip(parts, like):
            out.append((flat[start:start + p.numel()] / self.total).reshape(ref.shape).to(ref.dtype))
            start += p.numel()
        return out

    def worst(self, code: int) -> int:
        """The largest of the ranks' codes (every rank must call): 0 all well, else the worst news."""
        return _worst(self.group, code, self.device)

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The element-wise sums over the ranks (every rank must call with the same shapes)."""
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        dist.all_reduce(flat, group=self.group)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.dtype))
            start += t.numel()
        return out


def global_means(group, sums: Sequence[float], count: int,
                 device: torch.device | None = None) -> tuple[list[float], int]:
    """Means over every rank's examples of quantities each rank holds as sums over its own
    ``count`` examples, and the examples' total: one all-reduce of the sums and the counts (every
    rank must pass as many sums)."""
    import torch.distributed as dist

    t = torch.tensor([*sums, float(count)], dtype=torch.float64, device=_device(group, device))
    dist.all_reduce(t, group=group)
    total = int(round(float(t[-1])))
    return [float(v / t[-1]) if total else float("nan") for v in t[:-1]], total


def gather(group, per_example: Tensor) -> Tensor:
    """Every rank's ``per_example`` concatenated in rank order (sizes may differ), on every rank."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = _device(group, per_example.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([per_example.numel()], dtype=torch.int64, device=device), group=group)
    largest = int(max(s.item() for s in sizes))
    padded = per_example.detach().new_zeros(largest, device=device)
    padded[:per_example.numel()] = per_example.detach()
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(per_example.device)


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None], ddp: nn.Module | None) -> None:
    """Adds each gradient into its parameter's ``.grad`` as a plain backward would; under DDP
    through autograd (a backward from the parameters themselves), so that the reducer's hooks
    fire and average them over the ranks, bucket by bucket, as in a plain DDP step."""
    from .penalty.replay import add_into_grads

    if ddp is None:
        add_into_grads(params, grads)
        return
    pairs = [(p, g.detach()) for p, g in zip(params, grads) if g is not None]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
