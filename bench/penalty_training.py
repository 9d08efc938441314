"""Does each Fisher Penalty method train right? Whole training runs on MNIST-1D, side by side.

    python bench/penalty_training.py [--epochs 150] [--seeds 0 1 2] [--jobs 2] [--out bench/results]

The runs of `fisher-ext` (fisher_ext.experiments: the cnn1d model, SGD momentum 0.9, batch 128,
lr 0.01, Tr(F) probed on 512 training examples) without a penalty, with the exact penalty
(double_backward) and with the finite difference, every step (alpha 0.1) and every 10th step
(alpha 1), and with 20% of the training labels replaced by another class. Per run: final test
and train accuracy (on the noisy labels, the share of the noisy examples fitted), the peak and
final Tr(F), the finite difference's run-time checks against the exact gradient, fallbacks to
the exact method, and the training step's time. Results: bench/results/penalty_training.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from fisher_ext.experiments.runner import RunConfig
from fisher_ext.experiments.schedule import Task, execute

RUNS = {  # name: (penalty, method, alpha, every, label noise)
    "plain": ("none", "auto", 0.0, 1, 0.0),
    "exact a=0.1": ("fp", "double_backward", 0.1, 1, 0.0),
    "fd a=0.1": ("fp", "finite_difference", 0.1, 1, 0.0),
    "exact a=1 k=10": ("fp", "double_backward", 1.0, 10, 0.0),
    "fd a=1 k=10": ("fp", "finite_difference", 1.0, 10, 0.0),
    "noisy plain": ("none", "auto", 0.0, 1, 0.2),
    "noisy exact a=0.1": ("fp", "double_backward", 0.1, 1, 0.2),
    "noisy fd a=0.1": ("fp", "finite_difference", 0.1, 1, 0.2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tasks, names = [], []
        for name in args.runs:
            penalty, method, alpha, every, noise = RUNS[name]
            for seed in args.seeds:
                cfg = RunConfig(lr=0.01, seed=seed, epochs=args.epochs, penalty=penalty, method=method, alpha=alpha,
                                every=every, noise=noise)
                tasks.append(Task(cfg, Path(work) / name.replace(" ", "_") / f"seed{seed}"))
                names.append(name)
        results = execute(tasks, args.jobs)
    for name, r in zip(names, results):
        r["name"] = name
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "epochs": args.epochs, "seeds": args.seeds}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "penalty_training.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1)
    lines = ["# Fisher Penalty methods over whole training runs (MNIST-1D)", "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}; {args.epochs} epochs; seeds {args.seeds}. "
             "The cnn1d model of `fisher-ext`, SGD momentum 0.9, lr 0.01, batch 128; Tr(F): the monitor's probe on "
             "512 training examples (sampled labels). Per seed, separated by /. fd checks: the finite difference's "
             "run-time comparisons with the exact gradient (largest relative error of the penalty's gradient); "
             "fallbacks: switches to the exact method; ms/step: the training step (median over seeds).", "",
             "| run | test acc | train acc | noisy labels fitted | peak Tr(F) | final Tr(F) | fd checks | fallbacks | "
             "ms/step |", "|" + "---|" * 9]
    for name in args.runs:
        rs = [r for r in results if r["name"] == name and r["status"] == "finished"]
        if not rs:
            lines.append(f"| {name} | diverged |" + " |" * 7)
            continue
        per = lambda key, fmt: " / ".join(format(r[key], fmt) for r in rs) if key in rs[0] else ""  # noqa: E731
        checks = [c for r in rs for c in r["fd_checks"]]
        lines.append(f"| {name} | {per('test_acc', '.3f')} | {per('train_acc', '.3f')} | {per('noisy_fit', '.3f')} | "
                     f"{per('peak_trace', '.0f')} | {per('final_trace', '.0f')} | "
                     f"{f'{len(checks)}, max {max(checks):.1e}' if checks else ''} | "
                     f"{sum(r['fd_fallbacks'] for r in rs)} | "
                     f"{statistics.median(r['seconds_per_step'] for r in rs) * 1e3:.2f} |")
    with open(os.path.join(args.out, "penalty_training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
