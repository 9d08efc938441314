"""Time per training step with the Fisher Penalty, against plain SGD and the common public approach.

    python bench/penalty.py [--batches 64 128] [--repeats 3] [--device cpu|cuda] [--quick] [--out bench/results]

Models: the small CNN of fisher_ext.demo and the CIFAR ResNet-18 with GroupNorm of
bench/monitor.py. Per step (median of --repeats after a warm-up), side by side in one process:
  sgd            forward + backward + SGD update; sgd-k10 the same over 10 consecutive steps,
                 the baseline of the k=10 columns (consecutive steps are not always as fast as
                 one step alone on this machine)
  db-k1, db-k10  + FisherPenalty(method='double_backward'): penalty.penalty_term on the watched
                 training forward, added to the loss; every step / every 10th step
  fd-k1, fd-k10  + FisherPenalty(method='finite_difference') through penalty.backward(x, loss):
                 the shifted pass replays the forward's decisions, the training loss is fused
                 into it (two forwards, two backwards)
  fd-check       a finite-difference step that is also checked against the exact gradient (the
                 penalty checks its steps 1, 2, 4, ..., 512, then every 1000th; the fd columns
                 above are the steps between, check_every=0)
  db-k1+tr, fd-k1+tr  the same with report_trace=True: each step's per-example norms and Tr(F)
                 from the gbar backward (the columns above run with report_trace=False, like the
                 public approach, which gives no Tr(F))
  public         the usual reimplementation: sampled labels, autograd.grad(create_graph=True) of
                 the mean loss, alpha * ||gbar||^2 added to the loss, every step
  monitor        no penalty: the training step's backward through FisherTraceMonitor.backward, which
                 also gives each example's gradient norm and Tr(F) of the empirical Fisher
k=10 is timed over 10 consecutive steps and divided by 10. With --device cuda the device is
synchronized before each clock read and the report is penalty_gpu.md/json; --quick: the ResNet only,
one batch (128), 3 repeats. The methods take turns within each
repeat; a ratio is the median over repeats of (method / its baseline in the same repeat).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fisher_ext  # noqa: E402
from fisher_ext.demo import small_cnn  # noqa: E402
from fisher_ext.experiments.models import ResNet18  # noqa: E402

LEGEND = ("Columns: db = double_backward through penalty_term (one backward for loss and penalty); fd = finite "
          "difference with the forward's decisions replayed, the loss fused into the shifted pass (backward(x, loss)); "
          "fd-check = a finite-difference step also checked against the exact gradient (steps 1, 2, 4, ..., 512, then "
          "every 1000th by default; the other fd columns are the steps between); "
          "public = sampled labels + autograd.grad(create_graph=True); -k10 = every 10th step; +tr = with "
          "report_trace (per-example norms and Tr(F) each step; the others run without); monitor = no penalty, the "
          "training backward through FisherTraceMonitor.backward (Tr(F) of the empirical Fisher each step).")
MODELS = {"small-cnn": small_cnn, "resnet18-groupnorm": lambda: ResNet18(norm=lambda c: torch.nn.GroupNorm(32, c))}
METHODS = ["sgd", "sgd-k10", "db-k1", "db-k10", "fd-k1", "fd-k10", "fd-check", "public", "db-k1+tr", "fd-k1+tr",
           "monitor"]


def make_step(model, x, y, method, alpha=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same model
    penalty = None
    if method.startswith(("db", "fd")):
        every = int(method.split("-k")[1].split("+")[0]) if "-k" in method else 1
        penalty = fisher_ext.FisherPenalty(model, alpha, method="double_backward" if method.startswith("db")
                                           else "finite_difference", every=every,
                                           report_trace=method.endswith("+tr"),
                                           check_every=1 if method == "fd-check" else 0)
    params = list(model.parameters())
    monitor = fisher_ext.FisherTraceMonitor(model) if method == "monitor" else None

    def step():
        opt.zero_grad()
        if monitor is not None:
            with monitor.watch():
                out = model(x)
            monitor.backward(F.cross_entropy(out, y, reduction="none"))
            opt.step()
            return
        if method.startswith("fd"):  # the whole step's backward in one call
            penalty.backward(x, lambda out: F.cross_entropy(out, y))
            opt.step()
            return
        if penalty is not None:
            with penalty.watch():
                out = model(x)
        else:
            out = model(x)
        loss = F.cross_entropy(out, y)
        if method.startswith("db"):  # the penalty term joins the loss: one backward for both
            loss = loss + penalty.penalty_term(out)
        if method == "public":
            yhat = torch.distributions.Categorical(logits=out.detach()).sample()
            gbar = torch.autograd.grad(F.cross_entropy(out, yhat), params, create_graph=True)
            loss = loss + alpha * sum(g.square().sum() for g in gbar)
        loss.backward()
        opt.step()

    return step


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def time_methods(steps: dict, repeats: int, min_seconds: float = 2.0, device: str = "cpu") -> dict:
    """Seconds per step of each method in each repeat; the methods take turns within a repeat,
    so a slow spell of this noisy machine falls on all of them alike. Short steps get more
    repeats: at least ``min_seconds`` of plain steps in all."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    per = {m: 10 if "-k10" in m else 1 for m in steps}
    for step in steps.values():
        step()  # warm-up
    start = clock()
    steps["sgd"]()
    repeats = max(repeats, math.ceil(min_seconds / (clock() - start)))
    times = {m: [] for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            start = clock()
            for _ in range(per[m]):
                step()
            times[m].append((clock() - start) / per[m])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="the ResNet at batch 128 only, 3 repeats (GPU check)")
    parser.add_argument("--smoke", action="store_true", help="check the harness: the small CNN, batch 4, one repeat")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the report in --out that this run does not measure again")
    args = parser.parse_args()
    min_seconds = 2.0 if args.device == "cpu" else 0.25
    if args.quick:
        args.models, args.batches, args.repeats = ["resnet18-groupnorm"], [128], 3
    if args.smoke:
        args.models, args.batches, args.repeats, min_seconds = ["small-cnn"], [4], 1, 0.0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("penalty.py: --device cuda but no CUDA device is visible")
    dev = args.device
    rows = []
    for name in args.models:
        for batch in args.batches:
            torch.manual_seed(0)
            model = MODELS[name]().to(dev)
            x, y = torch.randn(batch, 3, 32, 32, device=dev), torch.randint(0, 10, (batch,), device=dev)
            times = time_methods({m: make_step(model, x, y, m) for m in METHODS}, args.repeats, min_seconds, dev)
            seconds = {m: statistics.median(t) for m, t in times.items()}
            # the ratio within each repeat, then its median: slow drifts of the machine cancel
            base = {m: times["sgd-k10" if "-k10" in m else "sgd"] for m in times}
            ratio = {m: statistics.median(a / b for a, b in zip(t, base[m])) for m, t in times.items()}
            for method in METHODS:
                print(f"{name} B={batch} {method:9s} {seconds[method] * 1e3:9.1f} ms/step "
                      f"({ratio[method]:.2f}x its baseline)", flush=True)
            rows.append({"model": name, "batch": batch, "date": now(), "seconds": seconds, "ratio": ratio,
                         "times": times})
    os.makedirs(args.out, exist_ok=True)
    stem = "penalty" if dev == "cpu" else "penalty_gpu"
    path = os.path.join(args.out, stem + ".json")
    if args.merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        kept = [dict(r, date=r.get("date", old["meta"]["date"])) for r in old["rows"]
                if (r["model"], r["batch"]) not in {(n["model"], n["batch"]) for n in rows}]
        rows = sorted(kept + rows, key=lambda r: (list(MODELS).index(r["model"]), r["batch"]))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores" if dev == "cpu"
               else f"{torch.cuda.get_device_name()} (fisher_ext CUDA ops: "
                    f"{fisher_ext.build_info()['backends']['CUDA']['conv_sqnorm']})")
    meta = {"date": now(), "machine": machine, "torch": torch.__version__, "device": dev,
            "threads": torch.get_num_threads(), "repeats": args.repeats}
    # the +tr columns also report Tr(F) each step they run; public does not
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Fisher Penalty: time per training step ({dev.upper()})", "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; medians over "
             f"{meta['repeats']} or more repeats (2 s of plain steps at least) in which the methods take turns. "
             "Ratios to a plain SGD step (k=10 columns: to 10 consecutive plain steps). "
             "Bar: finite difference at k=1 <= 2.2, at k=10 <= 1.15; db-k1 <= public.", "", LEGEND,
             "", "| model | batch | measured | sgd ms | sgd-k10 ms/step | " + " | ".join(METHODS[2:]) + " |",
             "|" + "---|" * (len(METHODS) + 3)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['date'][5:]} | {r['seconds']['sgd'] * 1e3:.1f} | "
                     f"{r['seconds']['sgd-k10'] * 1e3:.1f} | "
                     + " | ".join(f"{r['ratio'][m]:.2f}" for m in METHODS[2:]) + " |")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
