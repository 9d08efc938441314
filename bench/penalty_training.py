"""Does each Fisher Penalty method train right? Whole training runs on MNIST-1D, side by side.

    pip install mnist1d   # the data set is generated locally (make_dataset), nothing is downloaded
    python bench/penalty_training.py [--epochs 150] [--seeds 0 1 2] [--jobs 2] [--out bench/results]

A 3-layer strided Conv1d ReLU network (32 channels, Linear head, no BatchNorm) trained with SGD
(momentum 0.9, lr 0.01, batch 128) without a penalty, with the exact penalty (double_backward)
and with the finite difference, every step (alpha 0.1) and every 10th step (alpha 1), and with
20% of the training labels replaced by another class. Per run: final test and train accuracy
(on the noisy labels, the share of the noisy examples fitted), the peak and final Tr(F) (exact
Fisher over 512 fixed training examples, each epoch), whether the finite difference's run-time
checks passed, and the wall time. Results: bench/results/penalty_training.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fisher_ext

RUNS = {  # name: (method, alpha, every, label noise)
    "plain": (None, 0.0, 1, 0.0),
    "exact a=0.1": ("double_backward", 0.1, 1, 0.0),
    "fd a=0.1": ("finite_difference", 0.1, 1, 0.0),
    "exact a=1 k=10": ("double_backward", 1.0, 10, 0.0),
    "fd a=1 k=10": ("finite_difference", 1.0, 10, 0.0),
    "noisy plain": (None, 0.0, 1, 0.2),
    "noisy exact a=0.1": ("double_backward", 0.1, 1, 0.2),
    "noisy fd a=0.1": ("finite_difference", 0.1, 1, 0.2),
}


def mnist1d() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset  # generated from its templates, offline

    data = make_dataset(get_dataset_args())
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return as_x(data["x"]), torch.tensor(data["y"]), as_x(data["x_test"]), torch.tensor(data["y_test"])


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 32, 5, stride=2, padding=2), nn.ReLU(),
                         nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 5, 10))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(task: tuple) -> dict:
    name, seed, epochs = task
    torch.set_num_threads(1)
    method, alpha, every, noise = RUNS[name]
    x, y, xt, yt = mnist1d()
    g = torch.Generator().manual_seed(100 + seed)
    noisy = torch.rand(len(y), generator=g) < noise
    y_train = y.clone()
    y_train[noisy] = (y[noisy] + torch.randint(1, 10, (int(noisy.sum()),), generator=g)) % 10
    torch.manual_seed(seed)
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    penalty = fisher_ext.FisherPenalty(model, alpha, method=method, every=every, report_trace=False) if method else None
    probe = x[:512]
    traces, checks, fallbacks = [], [], 0
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 128):
                idx = order[i:i + 128]
                opt.zero_grad()
                loss = lambda out, t=y_train[idx]: F.cross_entropy(out, t)  # noqa: E731
                if penalty is None:
                    loss(model(x[idx])).backward()
                else:
                    _, result = penalty.backward(x[idx], loss)
                    if result is not None and result.check is not None:
                        checks.append(result.check.relative_error)
                opt.step()
            traces.append(fisher_ext.fisher_trace(model, probe, estimator="exact").trace)
        fallbacks = sum("FisherPenalty" in str(w.message) for w in caught)
    out = {"name": name, "seed": seed, "test_acc": accuracy(model, xt, yt), "train_acc": accuracy(model, x, y_train),
           "peak_trace": max(traces), "final_trace": traces[-1], "traces": traces, "seconds": time.perf_counter() - start,
           "checks": checks, "warnings": fallbacks}
    if noise:
        out["noisy_fitted"] = accuracy(model, x[noisy], y_train[noisy])
        out["clean_fitted"] = accuracy(model, x[~noisy], y_train[~noisy])
    print(f"{name} seed {seed}: test {out['test_acc']:.3f} train {out['train_acc']:.3f} peak Tr(F) "
          f"{out['peak_trace']:.1f} ({out['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    tasks = [(name, seed, args.epochs) for name in args.runs for seed in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run, tasks)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "epochs": args.epochs, "seeds": args.seeds}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "penalty_training.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1)
    lines = ["# Fisher Penalty methods over whole training runs (MNIST-1D)", "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}; {args.epochs} epochs; seeds {args.seeds}. "
             "3-layer strided Conv1d ReLU CNN, SGD momentum 0.9, lr 0.01, batch 128; Tr(F): exact Fisher on 512 "
             "training examples after each epoch. Per seed, separated by /. fd checks: the finite difference's "
             "run-time comparisons with the exact gradient (largest relative error of the penalty's gradient); "
             "warnings: fallbacks to the exact method.", "",
             "| run | test acc | train acc | noisy labels fitted | peak Tr(F) | final Tr(F) | fd checks | warnings | "
             "s/run |", "|" + "---|" * 9]
    for name in args.runs:
        rs = [r for r in results if r["name"] == name]
        per = lambda key, fmt: " / ".join(format(r[key], fmt) for r in rs) if key in rs[0] else ""  # noqa: E731
        checks = [c for r in rs for c in r["checks"]]
        lines.append(f"| {name} | {per('test_acc', '.3f')} | {per('train_acc', '.3f')} | {per('noisy_fitted', '.3f')} | "
                     f"{per('peak_trace', '.0f')} | {per('final_trace', '.0f')} | "
                     f"{f'{len(checks)}, max {max(checks):.1e}' if checks else ''} | {sum(r['warnings'] for r in rs)} | "
                     f"{statistics.median(r['seconds'] for r in rs):.0f} |")
    with open(os.path.join(args.out, "penalty_training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
