"""Where ghost and materialize cross: a Linear layer's per-example norms against the number of
positions T, ours (each method, and 'auto') side by side with the installed peers.

    python bench/crossover_cpu.py [--d 256] [--batch 32] [--threads 1] [--out bench/results]

The layer is nn.Linear(d, d) on inputs (batch, T, d); every method starts from the same captured
input and output gradient (bench/peers_cpu.py's methods, checked against its float64 oracle).
Ghost costs ~2 T^2 (d_in + d_out) per example and materialize ~2 T d_in d_out, so by flops they
cross at T = d_in d_out / (d_in + d_out) (128 for d = 256); 'auto' should follow the lower curve.
Writes crossover_cpu.md, .json and .png to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_ext  # noqa: E402
from ops_cpu import _cpu_name  # noqa: E402
from peers_cpu import PEERS, _versions, interleaved_medians, methods, oracle  # noqa: E402

TS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def measure(d: int, batch: int, T: int, repeats: int, installed: dict) -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(d, d)
    x = torch.randn(batch, T, d)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    want = oracle(layer, x, g)
    table = methods(layer, x, g, installed)
    fns = {"auto": table["ours"]}
    for method in ("ghost", "materialize"):
        fns[method] = lambda m=method: fisher_ext.linear_sqnorm(x, g, bias=True, method=m)
    fns.update({k: v for k, v in table.items() if k in PEERS})
    errors = {}
    for name, fn in list(fns.items()):
        try:
            err = ((fn().double() - want).abs() / want.abs()).max().item()
        except Exception as e:  # noqa: BLE001  (a peer that cannot handle the shape)
            errors[name], _ = f"failed: {type(e).__name__}", fns.pop(name)
            continue
        if err > 1e-3:
            errors[name], _ = f"wrong: relative error {err:.1e}", fns.pop(name)
    seconds = interleaved_medians(fns, repeats)
    peers = {k: v for k, v in seconds.items() if k in PEERS}
    best = min(peers, key=peers.get) if peers else None
    return {"T": T, "seconds": seconds, "errors": errors, "best_peer": best,
            "ratio": seconds["auto"] / peers[best] if best else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    installed = _versions()
    rows = []
    for T in TS:
        rows.append(measure(args.d, args.batch, T, args.repeats, installed))
        print(f"T={T}: auto/{rows[-1]['best_peer']} = {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.machine()}", "torch": torch.__version__,
            "d": args.d, "batch": args.batch, "threads": args.threads, "repeats": args.repeats, "peers": installed}
    write(rows, meta, args.out)


def write(rows: list[dict], meta: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "crossover_cpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    names = ["auto", "ghost", "materialize", *PEERS]
    lines = [f"# Ghost / materialize crossover: nn.Linear({meta['d']}, {meta['d']}) on (batch {meta['batch']}, T, "
             f"{meta['d']}) (CPU)", "",
             f"{meta['date']}; {meta['cpu']}; torch {meta['torch']}; {meta['threads']} thread(s); median of "
             f"{meta['repeats']} interleaved rounds; ms per call. ratio: auto / the fastest correct peer.", "",
             "| T | " + " | ".join(names) + " | ratio | best peer |", "|---" * (len(names) + 3) + "|"]
    for r in rows:
        cells = [f"{r['seconds'][n] * 1e3:.3f}" if n in r["seconds"] else r["errors"].get(n, "n/a") for n in names]
        lines.append(f"| {r['T']} | " + " | ".join(cells) + f" | **{r['ratio']:.2f}** | {r['best_peer']} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names:
            pts = [(r["T"], r["seconds"][n] * 1e3) for r in rows if n in r["seconds"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n, linewidth=2.5 if n == "auto" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("positions T")
        ax.set_ylabel("ms per call")
        ax.set_title(f"per-example norms, Linear({meta['d']}, {meta['d']}), batch {meta['batch']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "crossover_cpu.png"), dpi=110)
        plt.close(fig)
        lines += ["", "![time against T](crossover_cpu.png)"]
    except ImportError:
        pass
    with open(os.path.join(out, "crossover_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
