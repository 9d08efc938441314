"""The per-process side of test_distributed.py: every scenario run on 2 processes (gloo on
loopback), its results saved for the test process to compare with one process on the
concatenated batch. The data and models are built here, by both sides, from fixed seeds."""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fisher_ext

WORLD = 2
ALPHA = 0.3
SPLITS = [(5, 3), (4, 4), (4, 4), (6, 2)]  # each step's examples per rank: the first and last uneven


class WithUnusedBranch(nn.Module):
    """A layer the forward never calls (DDP's find_unused_parameters)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.unused = body, nn.Linear(4, 4).double()

    def forward(self, x):
        return self.body(x)


def make_model(unused_branch: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 4)).double()
    return WithUnusedBranch(model) if unused_branch else model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, true labels, penalty labels) of a step's global batch."""
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SPLITS[step % len(SPLITS)])
    return (torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(4, (n,), generator=g),
            torch.randint(4, (n,), generator=g))


def part(step: int, rank: int, *tensors):
    sizes = SPLITS[step % len(SPLITS)]
    start = sum(sizes[:rank])
    return [t[start:start + sizes[rank]] for t in tensors]


def global_loss(labels: torch.Tensor, total: int):
    """This rank's part of the global batch's mean loss, scaled for DDP's average over ranks."""
    return lambda out: F.cross_entropy(out, labels, reduction="sum") * WORLD / total


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters()])


def penalty_step(rank: int, method: str) -> dict:
    x, t, y = batch(0)
    x, t, y = part(0, rank, x, t, y)
    model = make_model()
    ddp = DDP(model)
    penalty = fisher_ext.FisherPenalty(ddp, ALPHA, method=method, check_every=0)
    _, result = penalty.backward(x, global_loss(t, sum(SPLITS[0])), labels=y)
    return {"grad": flat_grads(model), "value": result.value, "gbar_sqnorm": result.gbar_sqnorm,
            "trace": result.trace, "per_example": result.per_example}


def penalty_term(rank: int) -> dict:
    """The exact penalty as a term of the caller's own loss, through DDP's own backward."""
    x, t, y = batch(0)
    x, t, y = part(0, rank, x, t, y)
    model = make_model()
    ddp = DDP(model)
    penalty = fisher_ext.FisherPenalty(ddp, ALPHA)
    with penalty.watch():
        out = ddp(x)
    term = penalty.penalty_term(out, labels=y)
    (global_loss(t, sum(SPLITS[0]))(out) + term).backward()
    return {"grad": flat_grads(model), "term": float(term), "trace": penalty.last_result.trace}


def training_run(rank: int, method: str, steps: int = 4) -> dict:
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    penalty = fisher_ext.FisherPenalty(ddp, ALPHA, method=method, every=2)
    checks = []
    for step in range(steps):
        x, t, y = batch(step)
        x, t, y = part(step, rank, x, t, y)
        opt.zero_grad()
        _, result = penalty.backward(x, global_loss(t, sum(SPLITS[step % len(SPLITS)])), labels=y)
        checks.append(None if result is None or result.check is None else result.check.relative_error)
        opt.step()
    return {"params": torch.cat([p.detach().flatten() for p in model.parameters()]), "checks": checks}


def local_scope(rank: int) -> dict:
    x, t, y = batch(0)
    x, t, y = part(0, rank, x, t, y)
    model = make_model()
    penalty = fisher_ext.FisherPenalty(DDP(model), ALPHA, scope="local")
    _, result = penalty.backward(x, lambda out: F.cross_entropy(out, t), labels=y)
    return {"grad": flat_grads(model), "value": result.value}


def reducer_patterns(rank: int) -> dict:
    """Unused parameters, static graph, no_sync() gradient accumulation: no reducer errors, and
    the accumulated gradient of two micro-steps."""
    out = {}
    x, t, y = batch(0)
    x, t, y = part(0, rank, x, t, y)
    model = make_model(unused_branch=True)
    penalty = fisher_ext.FisherPenalty(DDP(model, find_unused_parameters=True), ALPHA, method="finite_difference",
                                       check_every=0)
    penalty.backward(x, global_loss(t, sum(SPLITS[0])), labels=y)
    out["unused"] = flat_grads(model)
    try:
        fisher_ext.FisherPenalty(DDP(make_model(), static_graph=True), ALPHA)
    except ValueError as e:
        out["static"] = str(e)
    model = make_model()
    ddp = DDP(model)
    penalty = fisher_ext.FisherPenalty(ddp, ALPHA, method="finite_difference", check_every=0)
    for step in (1, 3):  # two micro-batches, the first without the gradient's all-reduce
        xs, ts, ys = batch(step)
        xs, ts, ys = part(step, rank, xs, ts, ys)
        with ddp.no_sync() if step == 1 else contextlib.nullcontext():
            penalty.backward(xs, global_loss(ts, sum(SPLITS[step])), labels=ys)
    out["no_sync"] = flat_grads(model)
    return out


def monitor(rank: int) -> dict:
    x, t, y = batch(0)
    x, t, y = part(0, rank, x, t, y)
    model = make_model()
    ddp = DDP(model)
    mon = fisher_ext.FisherTraceMonitor(ddp)
    with mon.watch():
        out = ddp(x)
    estimate = mon.estimate(out, labels=y)
    gathered = mon.gather(estimate)
    with mon.watch():
        out = ddp(x)
    result = mon.backward(F.cross_entropy(out, t, reduction="none"))
    probe_x, _, _ = batch(2)
    probe = fisher_ext.FisherTraceMonitor(ddp, estimator="exact").probe(probe_x[:7], chunk_size=2, progress=False)
    out = {"trace": estimate.trace, "per_example": estimate.per_example, "per_parameter": estimate.per_parameter,
           "gathered": gathered, "backward_trace": result.trace, "grad": flat_grads(model), "probe": probe.trace,
           "probe_per_parameter": probe.per_parameter, "standard_error": estimate.standard_error}
    # torch.compile(DDP(model)) and find_unused_parameters (DDP returns new output tensors)
    model = make_model()
    compiled = torch.compile(DDP(model, find_unused_parameters=True), backend="eager")
    mon = fisher_ext.FisherTraceMonitor(compiled)
    with mon.watch():
        out_c = compiled(x)
    out["compiled_trace"] = mon.estimate(out_c, labels=y).trace
    with mon.watch():
        out_c = compiled(x)
    mon.backward(F.cross_entropy(out_c, t, reduction="none"))
    out["compiled_grad"] = flat_grads(model)
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True)
    penalty = fisher_ext.FisherPenalty(ddp, ALPHA)
    with penalty.watch():
        out_u = ddp(x)
    (global_loss(t, sum(SPLITS[0]))(out_u) + penalty.penalty_term(out_u, labels=y)).backward()
    out["unused_term_grad"] = flat_grads(model)
    return out


def errors(rank: int) -> dict:
    out = {}
    model = make_model() if rank == 0 else nn.Sequential(make_model(), nn.Linear(4, 4).double())
    try:
        fisher_ext.FisherPenalty(model, ALPHA)
    except ValueError as e:
        out["different_models"] = str(e)
    try:
        fisher_ext.FisherTraceMonitor(model)
    except ValueError as e:
        out["monitor_different_models"] = str(e)
    x, t, y = part(0, rank, *batch(0))
    torch.manual_seed(0)  # with BatchNorm buffers, DDP's forward broadcasts them: a collective of its own
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4)).double()
    for name, model, bad_step in (("plain", make_model(), 0), ("batchnorm", bn, 1)):
        penalty = fisher_ext.FisherPenalty(DDP(model), ALPHA)
        for step in range(3):  # an empty batch on rank 1 at bad_step: every rank raises; the next step runs
            try:
                penalty.backward(x[:0] if rank == 1 and step == bad_step else x, global_loss(t, sum(SPLITS[0])),
                                 labels=y)
                out[f"{name}{step}"] = "ok"
            except (ValueError, RuntimeError) as e:
                out[f"{name}{step}"] = str(e)
    return out


SCENARIOS = {
    "penalty_double_backward": lambda rank: penalty_step(rank, "double_backward"),
    "penalty_finite_difference": lambda rank: penalty_step(rank, "finite_difference"),
    "penalty_term": penalty_term,
    "run_double_backward": lambda rank: training_run(rank, "double_backward"),
    "run_finite_difference": lambda rank: training_run(rank, "finite_difference"),
    "local_scope": local_scope,
    "reducer_patterns": reducer_patterns,
    "monitor": monitor,
    "errors": errors,
}


def run(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {}
    try:
        try:
            for name, scenario in SCENARIOS.items():
                try:
                    results[name] = scenario(rank)
                except Exception:  # reported by the test, which names the scenario
                    results[name] = {"error": traceback.format_exc()}
                    raise
            ddp = DDP(make_model())
        finally:
            dist.destroy_process_group()
        try:  # the wrapper outlives its process group
            fisher_ext.FisherPenalty(ddp, ALPHA)
        except RuntimeError as e:
            results["errors"]["no_group"] = str(e)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
