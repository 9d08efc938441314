"""The penalty and the monitor across 2 processes (torch.distributed, gloo on loopback, the model
wrapped in DistributedDataParallel) against one process on the concatenated batch: the global
batch's semantics, to float64 rounding (the finite difference to its own rounding over r).
ddp_worker.py runs every scenario in one spawn; each test here checks one."""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fisher_ext
from ddp_worker import ALPHA, SPLITS, WORLD, batch, flat_grads, make_model, part

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results of every scenario (one spawn of 2 processes for the module)."""
    import ddp_worker

    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(ddp_worker.run, args=(_free_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):  # False: some still running
            if time.monotonic() > deadline:  # a rank that hangs: stop them all
                for process in context.processes:
                    process.kill()
                pytest.fail("the ranks did not finish within 240 s (a collective that not every rank joined?)")
    except mp.ProcessRaisedException as e:  # the scenario's own traceback is in the results
        pytest.fail(f"a rank failed: {str(e)[-3000:]}")
    except mp.ProcessExitedException as e:
        pytest.fail(f"a rank exited: {e}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ce(labels):
    return lambda out: F.cross_entropy(out, labels)


def single_step(method: str, step: int = 0, model=None, **kwargs):
    """One penalty step of one process on the global batch: (gradient, result)."""
    model = model or make_model()
    x, t, y = batch(step)
    _, result = fisher_ext.FisherPenalty(model, ALPHA, method=method, check_every=0, **kwargs).backward(
        x, ce(t), labels=y)
    return flat_grads(model), result


@pytest.mark.parametrize("method,tol", [("double_backward", 1e-12), ("finite_difference", 1e-7)])
def test_penalty_step_is_the_global_batchs(ranks, method, tol):
    grad, result = single_step(method)
    for r, got in enumerate(r[f"penalty_{method}"] for r in ranks):
        assert rel(got["grad"], grad) < tol, r
        assert got["value"] == pytest.approx(result.value, rel=1e-12)
        assert got["gbar_sqnorm"] == pytest.approx(result.gbar_sqnorm, rel=1e-12)
        assert got["trace"] == pytest.approx(result.trace, rel=1e-12)
        (mine,) = part(0, r, result.per_example)
        torch.testing.assert_close(got["per_example"], mine, rtol=1e-10, atol=0)
    # ranks with uneven batches: the check has teeth
    assert SPLITS[0][0] != SPLITS[0][1]


def test_penalty_term_in_the_callers_own_backward(ranks):
    grad, result = single_step("double_backward")
    for r in range(WORLD):
        got = ranks[r]["penalty_term"]
        assert rel(got["grad"], grad) < 1e-12
        assert got["term"] == pytest.approx(result.value, rel=1e-12)  # the global penalty's value
        assert got["trace"] == pytest.approx(result.trace, rel=1e-12)


@pytest.mark.parametrize("method,tol", [("double_backward", 1e-11), ("finite_difference", 1e-7)])
def test_training_run_takes_the_single_process_steps(ranks, method, tol):
    """Momentum, the penalty every 2nd step, an uneven last batch: the parameters after 4 steps
    are one process's on the concatenated batches, and bit-equal across the ranks."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    penalty = fisher_ext.FisherPenalty(model, ALPHA, method=method, every=2)
    for step in range(4):
        x, t, y = batch(step)
        opt.zero_grad()
        penalty.backward(x, ce(t), labels=y)
        opt.step()
    want = torch.cat([p.detach().flatten() for p in model.parameters()])
    first = ranks[0][f"run_{method}"]
    assert rel(first["params"] - torch.cat([p.detach().flatten() for p in make_model().parameters()]),
               want - torch.cat([p.detach().flatten() for p in make_model().parameters()])) < tol
    assert torch.equal(first["params"], ranks[1][f"run_{method}"]["params"])  # replicas stay identical
    if method == "finite_difference":  # the checks ran (penalty steps 1 and 2) on the global gradients
        assert [c is not None for c in first["checks"]] == [True, False, True, False]
        assert first["checks"] == ranks[1][f"run_{method}"]["checks"]


def test_local_scope_is_each_ranks_own_penalty(ranks):
    grads = []
    for r in range(WORLD):
        model = make_model()
        x, t, y = part(0, r, *batch(0))
        _, result = fisher_ext.FisherPenalty(model, ALPHA).backward(x, ce(t), labels=y)
        grads.append(flat_grads(model))
        assert ranks[r]["local_scope"]["value"] == pytest.approx(result.value, rel=1e-12)
    for r in range(WORLD):  # DDP averages the ranks' own steps
        assert rel(ranks[r]["local_scope"]["grad"], sum(grads) / WORLD) < 1e-12


def test_reducer_patterns(ranks):
    """find_unused_parameters and no_sync() accumulation: no reducer error, the global gradient;
    static_graph (whose reducer waits for the model's own backward): a clear error."""
    from ddp_worker import WithUnusedBranch  # noqa: F401  (the same model as the ranks')

    grad, _ = single_step("finite_difference", model=make_model(unused_branch=True))
    for r in range(WORLD):
        got = ranks[r]["reducer_patterns"]
        assert rel(got["unused"], grad) < 1e-7
        assert "DistributedDataParallel(static_graph=True) all-reduces from a callback" in got["static"]
    model = make_model()  # two micro-batches accumulated in .grad
    for step in (1, 3):
        single_step("finite_difference", step=step, model=model)
    for r in range(WORLD):
        assert rel(ranks[r]["reducer_patterns"]["no_sync"], flat_grads(model)) < 1e-7


def test_monitor_reports_the_global_batch(ranks):
    x, t, y = batch(0)
    want = fisher_ext.fisher_trace(make_model(), x, labels=y)
    empirical = fisher_ext.fisher_trace(make_model(), x, estimator="empirical", labels=t)
    probe_x, _, _ = batch(2)
    probe = fisher_ext.FisherTraceMonitor(make_model(), estimator="exact").probe(probe_x[:7], progress=False)
    local_grads = []
    for r in range(WORLD):
        model = make_model()
        xr, tr = part(0, r, x, t)
        F.cross_entropy(model(xr), tr).backward()
        local_grads.append(flat_grads(model))
    for r in range(WORLD):
        got = ranks[r]["monitor"]
        assert got["trace"] == pytest.approx(want.trace, rel=1e-12)
        for k, v in want.per_parameter.items():
            assert got["per_parameter"][k] == pytest.approx(v, rel=1e-10, abs=1e-15), k
        (mine,) = part(0, r, want.per_example)
        torch.testing.assert_close(got["per_example"], mine, rtol=1e-10, atol=0)
        torch.testing.assert_close(got["gathered"], want.per_example, rtol=1e-10, atol=0)
        assert got["backward_trace"] == pytest.approx(empirical.trace, rel=1e-10)
        assert rel(got["grad"], sum(local_grads) / WORLD) < 1e-12  # through DDP's reducer
        assert got["probe"] == pytest.approx(probe.trace, rel=1e-10)
        assert set(got["probe_per_parameter"]) == set(probe.per_parameter)
        assert math.isclose(sum(got["probe_per_parameter"].values()), got["probe"], rel_tol=1e-9)
        assert got["standard_error"] == pytest.approx(want.standard_error, rel=1e-9)  # over all examples
        # torch.compile(DDP(..., find_unused_parameters=True)): its new output tensors are the watched forward's,
        # and monitor.backward's gradient goes through the reducer
        assert got["compiled_trace"] == pytest.approx(want.trace, rel=1e-12)
        assert rel(got["compiled_grad"], sum(local_grads) / WORLD) < 1e-12
        assert rel(got["unused_term_grad"], single_step("double_backward")[0]) < 1e-12


def test_ranks_with_different_models_are_refused(ranks):
    for r in range(WORLD):
        for who in ("different_models", "monitor_different_models"):
            assert "the ranks of the process group hold different models" in ranks[r]["errors"][who]
        assert "a DistributedDataParallel model, but torch.distributed's default process group is not initialized" \
            in ranks[r]["errors"]["no_group"]
    for name, bad in (("plain", 0), ("batchnorm", 1)):  # one rank's bad input: every rank raises, then goes on
        for step in range(3):
            if step != bad:
                assert ranks[0]["errors"][f"{name}{step}"] == ranks[1]["errors"][f"{name}{step}"] == "ok", (name, step)
        assert "this step failed on another process" in ranks[0]["errors"][f"{name}{bad}"]
        assert "inputs: expected a batch of at least one example" in ranks[1]["errors"][f"{name}{bad}"]


def test_sync_batchnorm_with_double_backward_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match=r"model: 1 is a SyncBatchNorm, which has no double backward; use "
                                         r"method='finite_difference'"):
        fisher_ext.FisherPenalty(model, ALPHA)
    fisher_ext.FisherPenalty(model, ALPHA, method="finite_difference")  # accepted


def test_bad_scope_and_uninitialized_group():
    with pytest.raises(ValueError, match=r"scope: expected one of \('global', 'local'\) or None, got 'world'"):
        fisher_ext.FisherPenalty(make_model(), ALPHA, scope="world")
    with pytest.raises(ValueError, match=r"scope: expected one of"):
        fisher_ext.FisherTraceMonitor(make_model(), scope="all")


def test_fsdp_is_refused_naming_the_module():
    """fully_shard swaps a module's class for one with FSDPModule mixed in; the same here."""
    from torch.distributed.fsdp import FSDPModule

    model = make_model()
    model[5].__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
    for build in (lambda: fisher_ext.FisherPenalty(model, ALPHA), lambda: fisher_ext.FisherTraceMonitor(model)):
        with pytest.raises(ValueError, match=r"model: 5 is sharded by FSDP \(FSDPLinear\).*DistributedDataParallel"):
            build()
