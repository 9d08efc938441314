"""The exact Fisher trace of a whole model: ours against nngeometry and curvlinops.

    bash bench/install_peers.sh   # nngeometry 0.4, curvlinops-for-pytorch 3.0.1 and what they import
    python bench/trace_peers.py [--batch 64] [--matvecs 20] [--out bench/results]

On a CIFAR-sized ResNet-18 with GroupNorm (bench/monitor.py's), one batch, CPU float32, each
method in its own process (its peak memory is its own):

  ours             fisher_ext.fisher_trace(model, x, estimator='exact'): every class weighted
                   by its probability, per-example norms without per-example gradients
  nngeometry       nngeometry.FIM(model, (x,), PMatDiag, variant='classif_logits').trace():
                   the same exact Fisher (closed-form factor of the softmax Hessian), its diagonal
  curvlinops-ggn   curvlinops.hutchinson_trace of GGNLinearOperator (for cross-entropy the GGN is
                   the exact Fisher), --matvecs Rademacher matrix-vector products: an estimate
  curvlinops-mc    the same of FisherMCLinearOperator (one sampled label per example): an
                   estimate of a Monte-Carlo Fisher, noisier still

All use the mean over the batch (curvlinops: reduction='mean'), so every value estimates the same
Tr(F); errors are relative to ours, which nngeometry must match to float32 rounding. Ours is timed
after one warm-up call (median of --repeats); the peers, which take tens of seconds, once.
Writes trace_peers.md and .json to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from monitor import make  # noqa: E402
from ops_cpu import _cpu_name  # noqa: E402
from peers_cpu import installed_versions  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["ours", "nngeometry", "curvlinops-ggn", "curvlinops-mc"]
MODEL = "resnet18-groupnorm"


def _installed(module: str, pip_name: str) -> str | None:
    """None if ``module`` imports, else why not."""
    try:
        __import__(module)
    except ImportError as err:
        return f"{pip_name} is not installed ({err}); see bench/install_peers.sh"
    return None


def measure(method: str, batch: int, matvecs: int, repeats: int) -> dict:
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    model, x, _ = make(MODEL, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "ours":
        import fisher_ext

        def fn():
            return fisher_ext.fisher_trace(model, x, estimator="exact").trace
        fn()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            value = fn()
            runs.append(time.perf_counter() - start)
        return {"seconds": statistics.median(runs), "trace": value}
    if method == "nngeometry":
        missing = _installed("nngeometry", "nngeometry")
        if missing:
            return {"skipped": missing}
        from nngeometry import FIM
        from nngeometry.object import PMatDiag

        def fn():
            return float(FIM(model, (x,), PMatDiag, variant="classif_logits").trace())
    else:
        missing = _installed("curvlinops", "curvlinops-for-pytorch")
        if missing:
            return {"skipped": missing}
        from curvlinops import FisherMCLinearOperator, GGNLinearOperator, hutchinson_trace
        y = torch.zeros(batch, dtype=torch.long)  # the API wants labels; neither operator reads them
        operator = GGNLinearOperator if method == "curvlinops-ggn" else FisherMCLinearOperator

        def fn():
            A = operator(model, nn.CrossEntropyLoss(reduction="mean"), params, [(x, y)], check_deterministic=False)
            torch.manual_seed(0)  # the Rademacher vectors come from the global stream
            total, left = 0.0, matvecs
            while left:  # it vmaps its matrix-vector products: 10 at a time bounds the memory
                k = min(10, left)
                total += float(hutchinson_trace(A, k)) * k
                left -= k
            return total / matvecs
    start = time.perf_counter()
    value = fn()
    return {"seconds": time.perf_counter() - start, "trace": value}


def run_one(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method, "--batch", str(args.batch),
           "--matvecs", str(args.matvecs), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else proc.returncode
        return {"skipped": f"failed: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_report(rows: dict, meta: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "trace_peers.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    ours = rows.get("ours", {})
    lines = ["# The exact Fisher trace of a whole model against nngeometry and curvlinops (CPU)", "",
             f"{meta['date']}; {meta['cpu']} ({meta['machine']}); torch {meta['torch']}; {meta['threads']} threads; "
             f"ResNet-18 (GroupNorm), batch {meta['batch']}, float32; nngeometry {meta['versions']['nngeometry']}, "
             f"curvlinops-for-pytorch {meta['versions']['curvlinops-for-pytorch']}; Hutchinson with "
             f"{meta['matvecs']} matrix-vector products. Each method in its own process; ours the median of "
             f"{meta['repeats']} after a warm-up, the peers one call.", "",
             "| method | s | time / ours | Tr(F) | relative error vs ours | peak MB |", "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        if "seconds" not in r:
            lines.append(f"| {method} | {r.get('skipped', '')} | | | | |")
            continue
        ratio = f"{r['seconds'] / ours['seconds']:.1f}" if "seconds" in ours else ""
        err = f"{abs(r['trace'] - ours['trace']) / ours['trace']:.1e}" if "trace" in ours else ""
        lines.append(f"| {method} | {r['seconds']:.1f} | {ratio} | {r['trace']:.6g} | {err} | "
                     f"{r.get('peak_mb', 0):.0f} |")
    with open(os.path.join(out_dir, "trace_peers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--matvecs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--one", metavar="METHOD", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.matvecs < 1:
        parser.error(f"--matvecs: expected >= 1, got {args.matvecs}")
    if args.one:
        result = measure(args.one, args.batch, args.matvecs, args.repeats)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    rows = {}
    for method in args.methods:
        rows[method] = r = run_one(method, args)
        shown = f"{r['seconds']:.1f} s, Tr(F) {r['trace']:.6g}" if "seconds" in r else r["skipped"]
        print(f"{method:15s} {shown}", flush=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": _cpu_name(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "batch": args.batch, "matvecs": args.matvecs,
            "repeats": args.repeats,
            "versions": installed_versions({"nngeometry": ("nngeometry", "nngeometry"),
                                            "curvlinops-for-pytorch": ("curvlinops", "curvlinops-for-pytorch")})}
    write_report(rows, meta, args.out)


if __name__ == "__main__":
    main()
