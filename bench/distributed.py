"""A training step with the Fisher Penalty and the monitor on 1 process against 2 processes
(torch.distributed, gloo, DistributedDataParallel), the same global batch.

    python bench/distributed.py [--batch 128] [--repeats 15] [--out bench/results]

Configurations, each with the same global batch:
  1 process, 1 thread        the whole batch in one process
  1 process, 2 threads       the same with torch's intra-op threads (the usual single-process use of 2 cores)
  2 processes, 1 thread each the batch split in two, DDP; the penalty and the monitor on the global batch
Methods per step: sgd (forward, backward, update), fd-k1 (finite-difference penalty every step),
db-k1 (double backward), monitor (FisherTraceMonitor.backward: the training backward with Tr(F)).
Each configuration times the methods in turns (median over --repeats). Writes distributed.md
and distributed.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fisher_ext  # noqa: E402
from fisher_ext.demo import small_cnn  # noqa: E402

METHODS = ("sgd", "fd-k1", "db-k1", "monitor")


def make_steps(batch: int, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = small_cnn()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,))
    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # every step sees the same model

    def loss(out):  # this rank's share of the global batch's mean loss
        return F.cross_entropy(out, y, reduction="sum") * world / batch

    def sgd():
        opt.zero_grad()
        loss(trained(x)).backward()
        opt.step()

    def penalized(method):
        penalty = fisher_ext.FisherPenalty(trained, 0.01, method=method, check_every=0)

        def step():
            opt.zero_grad()
            penalty.backward(x, loss)
            opt.step()
        return step

    monitor = fisher_ext.FisherTraceMonitor(trained)

    def monitored():
        opt.zero_grad()
        with monitor.watch():
            out = trained(x)
        monitor.backward(F.cross_entropy(out, y, reduction="none") * (world * x.shape[0] / batch))
        opt.step()

    return {"sgd": sgd, "fd-k1": penalized("finite_difference"), "db-k1": penalized("double_backward"),
            "monitor": monitored}


def time_steps(steps: dict, repeats: int, world: int) -> dict:
    sync = dist.barrier if world > 1 else (lambda: None)
    for step in steps.values():
        step()
    times = {m: [] for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def worker(rank: int, world: int, port: int, batch: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seconds = time_steps(make_steps(batch, rank, world), repeats, world)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(seconds, f)
    finally:
        dist.destroy_process_group()


def two_processes(batch: int, repeats: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        mp.spawn(worker, args=(2, port, batch, repeats, out), nprocs=2)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows[f"1 process, {threads} thread{'s' if threads > 1 else ''}"] = time_steps(make_steps(args.batch, 0, 1),
                                                                                      args.repeats, 1)
        print(list(rows.items())[-1], flush=True)
    rows["2 processes, 1 thread each"] = two_processes(args.batch, args.repeats)
    print(list(rows.items())[-1], flush=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "batch": args.batch, "repeats": args.repeats, "model": "fisher_ext.demo.small_cnn (CIFAR-sized input)"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    base = rows["1 process, 1 thread"]
    lines = ["# One process against two (torch.distributed, gloo, CPU)", "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}; {meta['model']}; global batch "
             f"{args.batch}; medians of {args.repeats} steps, the methods in turns. Columns: ms per step, and in "
             "brackets over the plain step (sgd) of the same configuration; last column: the penalty step "
             "(fd-k1) against one process with one thread.", "",
             "| configuration | " + " | ".join(METHODS) + " | fd-k1 vs 1 process, 1 thread |",
             "|---|" + "---|" * (len(METHODS) + 1)]
    for name, sec in rows.items():
        cells = [f"{sec[m] * 1e3:.1f}" + ("" if m == "sgd" else f" ({sec[m] / sec['sgd']:.2f}x)") for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sec['fd-k1'] / base['fd-k1']:.2f}x |")
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
