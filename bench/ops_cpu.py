"""CPU benchmark of the per-example squared-norm ops on the project's benchmark layers (L1-L3, C1-C7, below).

    python bench/ops_cpu.py [--threads 1] [--batches 64 32 128] [--repeats 7] [--out bench/results]

For each layer, in one process and side by side (median of --repeats runs):
  floor        the layer's own forward + backward, as inside a network: input, weight and bias
               gradients (materializing per-example gradients costs about its weight-gradient third)
  ours-*       fisher_ext ops on the captured input and output gradient, method auto / ghost / materialize
  torch-*      the plain-PyTorch formulas (fisher_ext.reference): ghost and materialize (unfold + einsum,
               what Opacus does)
  func         torch.func vmap(grad) per-example weight gradients, then their norms
  e2e          forward + backward + ours-auto, the cost a user pays for gradients plus norms
Ratios are to the floor. Writes ops_cpu.md and ops_cpu.json to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_ext  # noqa: E402
from fisher_ext import reference  # noqa: E402
from fisher_ext.ops import _conv_padding  # noqa: E402

# id: (module factory, input shape without batch, batch override)
LAYERS = {
    "L1": (lambda: nn.Linear(512, 512), (512,), None),
    "L2": (lambda: nn.Linear(256, 256), (128, 256), None),
    "L3": (lambda: nn.Linear(768, 768), (16, 768), None),
    "C1": (lambda: nn.Conv2d(3, 64, 3, padding=1), (3, 32, 32), None),
    "C2": (lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 32, 32), None),
    "C3": (lambda: nn.Conv2d(128, 128, 3, padding=1), (128, 16, 16), None),
    "C4": (lambda: nn.Conv2d(256, 256, 3, padding=1, stride=2), (256, 8, 8), None),
    "C5": (lambda: nn.Conv2d(512, 512, 3, padding=1), (512, 4, 4), None),
    "C6": (lambda: nn.Conv2d(64, 64, 3, padding=2, dilation=2, groups=4), (64, 16, 16), None),
    "C7": (lambda: nn.Conv1d(32, 64, 5, padding=2), (32, 40), 128),
}


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_methods(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict:
    """name -> zero-argument callable returning the per-example norms (or, for the floor, nothing)."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        ours = lambda m: fisher_ext.linear_sqnorm(x, gy, bias=bias, method=m)  # noqa: E731
        plain = lambda m: reference.linear_sqnorm(x, gy, bias, m)  # noqa: E731
    else:
        kw = dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                  dilation=layer.dilation, groups=layer.groups)
        lead, _ = _conv_padding(layer.padding, x.shape[2:], layer.kernel_size, layer.stride, layer.dilation)
        ours = lambda m: fisher_ext.conv_sqnorm(x, gy, bias=bias, method=m, **kw)  # noqa: E731
        plain = lambda m: reference.conv_sqnorm(x, gy, layer.kernel_size, layer.stride, lead,  # noqa: E731
                                                layer.dilation, layer.groups, bias, m)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def per_example_func():
        def inner(p, xn, gn):
            return (functional_call(layer, p, (xn.unsqueeze(0),)) * gn.unsqueeze(0)).sum()

        grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, gy)
        return sum(g.flatten(1).square().sum(1) for g in grads.values())

    x_in = x.detach().clone().requires_grad_()

    def floor():
        layer.zero_grad(set_to_none=True)
        x_in.grad = None
        layer(x_in).backward(gy)

    def end_to_end():
        floor()
        return ours("auto")

    return {
        "floor": floor,
        "ours-auto": lambda: ours("auto"),
        "ours-ghost": lambda: ours("ghost"),
        "ours-materialize": lambda: ours("materialize"),
        "torch-ghost": lambda: plain("ghost"),
        "torch-materialize": lambda: plain("materialize"),
        "func": per_example_func,
        "e2e": end_to_end,
    }


def run(batches: list[int], repeats: int, layer_ids: list[str]) -> list[dict]:
    rows = []
    for batch in batches:
        for lid in layer_ids:
            make, shape, batch_override = LAYERS[lid]
            B = batch_override if batch_override and batch == batches[0] else batch
            if batch_override and batch != batches[0]:
                continue  # a layer with its own batch size is measured once
            torch.manual_seed(0)
            layer = make()
            x = torch.randn(B, *shape)
            with torch.no_grad():
                gy = torch.randn_like(layer(x))
            methods = layer_methods(layer, x, gy)
            results = {name: methods[name]() for name in methods if name not in ("floor", "e2e")}
            want = results["func"]
            for name, value in results.items():  # every method must give the same numbers
                err = ((value - want).abs() / want).max().item()
                if err > 1e-3:
                    raise SystemExit(f"{lid} batch {B}: {name} disagrees with torch.func (rel. error {err:.2e})")
            times = {name: median_time(fn, repeats) for name, fn in methods.items()}
            row = {"layer": lid, "batch": B, "seconds": times,
                   "ratio": {k: v / times["floor"] for k, v in times.items() if k != "floor"}}
            plain_best = min(times["torch-ghost"], times["torch-materialize"])
            row["ours_vs_plain_best"] = times["ours-auto"] / plain_best
            rows.append(row)
            r = row["ratio"]
            print(f"{lid} B={B:4d} floor {times['floor'] * 1e3:8.2f} ms | ours-auto {r['ours-auto']:.3f}x "
                  f"ghost {r['ours-ghost']:.3f}x mat {r['ours-materialize']:.3f}x | torch ghost "
                  f"{r['torch-ghost']:.3f}x mat {r['torch-materialize']:.3f}x | func {r['func']:.3f}x | "
                  f"e2e {r['e2e']:.3f}x", flush=True)
    return rows


BAR = {"L1": 0.1, "L2": 0.45, "L3": 0.1}  # the CPU bar; every conv: 0.45


def write_report(rows: list[dict], args, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "extension": fisher_ext.build_info()["backends"]["CPU"]["conv_sqnorm"],
    }
    with open(os.path.join(out_dir, "ops_cpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = ["ours-auto", "ours-ghost", "ours-materialize", "torch-ghost", "torch-materialize", "func", "e2e"]
    lines = [
        "# Per-example squared-norm ops on the CPU",
        "",
        f"{meta['date']}; {meta['cpu']}; torch {meta['torch']}; {meta['threads']} thread(s); "
        f"median of {meta['repeats']} runs; ops served by {meta['extension']}.",
        "",
        "Each cell is the median time over the layer's own forward + backward (the floor), measured in the "
        "same process. `ours-*`: fisher_ext ops from the captured input and output gradient; `torch-*`: the "
        "same formulas in plain PyTorch (fisher_ext.reference; `materialize` is unfold + einsum as in Opacus); "
        "`func`: torch.func vmap(grad); `e2e`: forward + backward + ours-auto. Bar: at most 0.45x on every "
        "conv and on L2 (T=128), at most 0.1x on L1 and L3, and ours-auto no slower than the faster plain "
        "PyTorch method.",
        "",
        "| layer | batch | floor ms | " + " | ".join(cols) + " | bar | ours / best plain |",
        "|" + "---|" * (len(cols) + 5),
    ]
    for row in rows:
        bar = BAR.get(row["layer"], 0.45)
        ok = row["ratio"]["ours-auto"] <= bar and row["ours_vs_plain_best"] <= 1.0
        lines.append(
            f"| {row['layer']} | {row['batch']} | {row['seconds']['floor'] * 1e3:.2f} | "
            + " | ".join(f"{row['ratio'][c]:.3f}" for c in cols)
            + f" | {bar} {'met' if ok else 'MISSED'} | {row['ours_vs_plain_best']:.2f} |"
        )
    with open(os.path.join(out_dir, "ops_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.batches, args.repeats, args.layers)
    write_report(rows, args, args.out)


if __name__ == "__main__":
    main()
