"""The per-example norm op against the installed peers, per layer, on the same captured tensors.

    bash bench/install_peers.sh   # Opacus 1.6.0, BackPACK 1.7.1 (and what they import)
    python bench/peers_cpu.py [--threads 1 2] [--batches 32 64 128] [--repeats 9] [--out bench/results]

With --threads 1 the process is pinned to one core.

For each layer of the benchmark list (bench/ops_cpu.py: L1-L3, C1-C7) the layer's input x and
an output gradient g are captured once; every method then computes each example's squared
gradient norm (weight and bias) from that same (x, g), in one process, one method after the
other within each round (interleaved rounds, median over rounds):

  ours            fisher_ext.linear_sqnorm / conv_sqnorm, method auto
  opacus          Opacus' per-sample gradient sampler for the layer (GradSampleModule.GRAD_SAMPLERS),
                  then the norms of the per-sample gradients
  opacus-ghost    Opacus' ghost-clipping norm sampler (NORM_SAMPLERS; Linear only)
  backpack        BackPACK's BatchL2Grad extension functions for the layer (weight and bias)
  func            torch.func: vmap(grad) of the layer's own functional call, per example
  wgrad           for reference, not a peer: the layer's own weight- and bias-gradient backward
                  through ATen (mm / convolution_backward, what autograd calls in a training step)
  fused           fisher_ext.linear_grad_sqnorm / conv_grad_sqnorm: that weight and bias gradient
                  and the per-example norms together (checked against both)

Each method's result is checked against a float64 torch.func oracle (relative error <= 1e-3);
a method that disagrees or fails is reported, not timed. A missing peer is reported as not
installed. Ratio = ours / the fastest correct peer (below 1: ours is faster). For the fused op:
fused / wgrad (what the norms add to the weight gradient a backward forms anyway) and fused /
(the fastest peer's norms + wgrad), what a backward that wants both would otherwise pay.
Writes peers_cpu.md and peers_cpu.json to --out.
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
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_ext  # noqa: E402
from ops_cpu import LAYERS, _cpu_name  # noqa: E402

PEERS = ("opacus", "opacus-ghost", "backpack", "func")


def installed_versions(packages: dict[str, tuple[str, str]]) -> dict[str, str | None]:
    """name -> the version of (module, distribution) where the module imports, else None."""
    from importlib.metadata import version

    out = {}
    for name, (module, distribution) in packages.items():
        try:
            __import__(module)
            out[name] = version(distribution)
        except ImportError:
            out[name] = None
    return out


def _versions() -> dict[str, str | None]:
    return installed_versions({"opacus": ("opacus", "opacus"), "backpack": ("backpack", "backpack-for-pytorch")})


def calls_per_sample(fn: Callable, at_least: float = 5e-3) -> int:
    """How many calls one timing sample takes to last ``at_least`` seconds: single calls of a tenth
    of a millisecond vary by 2x from one moment to the next on a shared machine."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, math.ceil(at_least / max(time.perf_counter() - start, 1e-7)))


def interleaved_medians(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Seconds per call of each function: the median over ``repeats`` rounds in which every
    function runs once (a loop of calls, for short ones), in an order that rotates from round to
    round (the first after the slowest peer runs on cold caches)."""
    loops = {name: calls_per_sample(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for k in range(repeats):
        for name in order[k % len(order):] + order[:k % len(order)]:
            start = time.perf_counter()
            for _ in range(loops[name]):
                fns[name]()
            times[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(v) for name, v in times.items()}


def _sum_sq(per_sample: dict) -> torch.Tensor:
    return sum(g.flatten(1).square().sum(1) for g in per_sample.values())


def methods(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, installed: dict) -> dict[str, Callable]:
    """name -> zero-argument callable returning the (N,) squared norms (wgrad: nothing)."""
    bias = layer.bias is not None
    linear = isinstance(layer, nn.Linear)
    out: dict[str, Callable] = {}
    if linear:
        out["ours"] = lambda: fisher_ext.linear_sqnorm(x, g, bias=bias)
    else:
        out["ours"] = lambda: fisher_ext.conv_sqnorm(x, g, kernel_size=layer.kernel_size, stride=layer.stride,
                                                     padding=layer.padding, dilation=layer.dilation,
                                                     groups=layer.groups, bias=bias)
    if installed["opacus"]:
        from opacus.grad_sample import GradSampleModule
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleModuleFastGradientClipping as Ghost)

        sampler = GradSampleModule.GRAD_SAMPLERS[type(layer)]
        out["opacus"] = lambda: _sum_sq(sampler(layer, [x], g))
        if type(layer) in Ghost.NORM_SAMPLERS:
            norm_sampler = Ghost.NORM_SAMPLERS[type(layer)]
            out["opacus-ghost"] = lambda: sum(v.square() for v in norm_sampler(layer, [x], g).values())
    if installed["backpack"]:
        from backpack.extensions.firstorder.batch_l2_grad.convnd import (BatchL2Conv1d, BatchL2Conv2d,
                                                                          BatchL2Conv3d)
        from backpack.extensions.firstorder.batch_l2_grad.linear import BatchL2Linear

        ext = {nn.Linear: BatchL2Linear, nn.Conv1d: BatchL2Conv1d, nn.Conv2d: BatchL2Conv2d,
               nn.Conv3d: BatchL2Conv3d}[type(layer)]()
        with torch.no_grad():  # what BackPACK's forward hook stores
            layer.input0, layer.output = x, layer(x)

        def backpack_norms():
            total = ext.weight(None, layer, (None,), (g,), None)
            return total + ext.bias(None, layer, (None,), (g,), None) if bias else total

        out["backpack"] = backpack_norms
    out["func"] = _func_sqnorms(layer, x, g)

    if linear:
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        out["wgrad"] = lambda: (g2.t().mm(x2), g2.sum(0))
        out["fused"] = lambda: fisher_ext.linear_grad_sqnorm(x, g, bias=bias)
    else:
        w = layer.weight
        out["wgrad"] = lambda: torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]], layer.stride, layer.padding, layer.dilation, False, [0] * len(layer.stride),
            layer.groups, [False, True, bias])[1:]
        out["fused"] = lambda: fisher_ext.conv_grad_sqnorm(
            x, g, kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=bias)
    return out


def _func_sqnorms(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], torch.Tensor]:
    """torch.func's recipe: vmap(grad) of the layer's own functional call, per example."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def inner(p, xn, gn):
        return (functional_call(layer, p, (xn.unsqueeze(0),)) * gn.unsqueeze(0)).sum()

    per_example = vmap(grad(inner), in_dims=(None, 0, 0))
    return lambda: _sum_sq(per_example(params, x, g))


def oracle(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """float64 per-example gradients by torch.func, then their squared norms."""
    import copy

    return _func_sqnorms(copy.deepcopy(layer).double(), x.double(), g.double())()


def captured(layer_id: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A layer of the benchmark list (seeded), a batch of inputs and an output gradient: what a hook
    would capture (the list's batch override applies)."""
    make, shape, batch_override = LAYERS[layer_id]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(batch_override or batch, *shape)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    return layer, x, g


def measure(layer_id: str, batch: int, repeats: int, installed: dict) -> dict:
    layer, x, g = captured(layer_id, batch)
    batch = x.shape[0]
    want = oracle(layer, x, g)
    fns, errors = {}, {}
    table = methods(layer, x, g, installed)
    want_w, want_b = (t.detach() for t in table["wgrad"]())
    for name, fn in table.items():
        if name == "wgrad":
            fns[name] = fn
            continue
        try:
            got = fn()
            if name == "fused":
                weight, bias_grad, got = got
                if not (torch.allclose(weight, want_w, rtol=1e-4, atol=1e-5 * float(want_w.abs().max()))
                        and torch.allclose(bias_grad, want_b, rtol=1e-4, atol=1e-5 * float(want_b.abs().max()))):
                    errors[name] = "wrong: its weight gradient differs from ATen's"
                    continue
            got = got.double()
            err = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
        except Exception as e:  # a peer that cannot handle the layer
            errors[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        if err > 1e-3:
            errors[name] = f"wrong: relative error {err:.1e}"
            continue
        fns[name] = fn
    seconds = interleaved_medians(fns, repeats)
    peers = {k: v for k, v in seconds.items() if k in PEERS}
    best = min(peers, key=peers.get) if peers else None
    return {"layer": layer_id, "batch": batch, "seconds": seconds, "errors": errors, "best_peer": best,
            "ratio": seconds["ours"] / peers[best] if best else None,
            "ours_vs_wgrad": seconds["ours"] / seconds["wgrad"],
            "fused_vs_wgrad": seconds["fused"] / seconds["wgrad"] if "fused" in seconds else None,
            "fused_vs_peer_and_wgrad": seconds["fused"] / (peers[best] + seconds["wgrad"])
            if "fused" in seconds and best else None}


def write_report(rows: list[dict], meta: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "peers_cpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# Per-example norms against the installed peers (CPU)", "",
             f"{meta['date']}; {meta['cpu']}; torch {meta['torch']}; fisher_ext {meta['backend']}; "
             f"Opacus {meta['peers']['opacus'] or 'not installed'}, "
             f"BackPACK {meta['peers']['backpack'] or 'not installed'}; "
             f"float32; median of {meta['repeats']} interleaved rounds. Every method starts from the same captured "
             "input and output gradient. ratio: ours / the fastest correct peer (below 1: ours is faster); "
             "wgrad: the layer's own weight- and bias-gradient backward (ATen); fused: fisher_ext's weight and "
             "bias gradient with the norms in one op, as a ratio to wgrad and to the best peer's norms + wgrad.",
             ""]
    for threads in meta["threads"]:
        for batch in meta["batches"]:
            mine = [r for r in rows if r["threads"] == threads and r["batch_asked"] == batch]
            if not mine:
                continue
            lines += [f"## {threads} thread(s), batch {batch}", "",
                      "| layer | ours ms | " + " | ".join(f"{p} ms" for p in PEERS)
                      + " | wgrad ms | ratio | best peer |"
                      " ours / wgrad | fused ms | fused / wgrad | fused / (peer + wgrad) |",
                      "|---" * (len(PEERS) + 9) + "|"]
            for r in mine:
                s = r["seconds"]
                cells = [f"{s[p] * 1e3:.3f}" if p in s else r["errors"].get(p, "n/a") for p in PEERS]
                name = r["layer"] if r["batch"] == batch else f"{r['layer']} (B={r['batch']})"
                fused = (f"{s['fused'] * 1e3:.3f} | {r['fused_vs_wgrad']:.2f} | {r['fused_vs_peer_and_wgrad']:.2f}"
                         if "fused" in s else f"{r['errors'].get('fused', 'n/a')} | | ")
                lines.append(f"| {name} | {s['ours'] * 1e3:.3f} | " + " | ".join(cells) +
                             f" | {s['wgrad'] * 1e3:.3f} | **{r['ratio']:.2f}** | {r['best_peer']} | "
                             f"{r['ours_vs_wgrad']:.2f} | {fused} |")
            lines.append("")
    figure = plot(rows, meta, out_dir)
    if figure:
        lines += [f"![time per method and layer]({os.path.basename(figure)})", ""]
    with open(os.path.join(out_dir, "peers_cpu.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def plot(rows: list[dict], meta: dict, out_dir: str) -> str | None:
    """peers_cpu.png: time per method per layer (log scale), one panel per thread count at the
    middle batch size; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batch = meta["batches"][len(meta["batches"]) // 2]
    names = ["ours", "fused", "wgrad", *PEERS]
    fig, axes = plt.subplots(len(meta["threads"]), 1, figsize=(11, 3.6 * len(meta["threads"])), squeeze=False)
    for ax, threads in zip(axes[:, 0], meta["threads"]):
        mine = [r for r in rows if r["threads"] == threads and r["batch_asked"] == batch]
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            xs = [i + (k - len(names) / 2) * width for i, r in enumerate(mine) if name in r["seconds"]]
            ys = [r["seconds"][name] * 1e3 for r in mine if name in r["seconds"]]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(mine)), [r["layer"] for r in mine])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{threads} thread(s), batch {batch} (C7: its own batch); ours = norms, fused = weight "
                     "gradient + norms, wgrad = ATen's weight gradient", fontsize=9)
        ax.legend(ncol=len(names), fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "peers_cpu.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--render", metavar="JSON", help="re-render the report and figure of an earlier run's JSON")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        write_report(saved["rows"], saved["meta"], args.out)
        return
    installed = _versions()
    for name, v in installed.items():
        if v is None:
            print(f"{name}: not installed (bash bench/install_peers.sh); reported as such", file=sys.stderr)
    info = fisher_ext.build_info()
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.machine()}", "torch": torch.__version__,
            "backend": info["backends"]["CPU"]["conv_sqnorm"], "peers": installed, "threads": args.threads,
            "batches": args.batches, "repeats": args.repeats}
    rows = []
    cores = os.sched_getaffinity(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, {min(cores)} if threads == 1 else cores)
        for batch in args.batches:
            for layer_id in args.layers:
                if LAYERS[layer_id][2] and batch != args.batches[0]:
                    continue  # a layer with its own batch size is measured once per thread count
                row = measure(layer_id, batch, args.repeats, installed)
                row.update(threads=threads, batch_asked=batch)
                rows.append(row)
                print(f"{threads}t B={row['batch']} {layer_id}: ours/{row['best_peer']} = {row['ratio']:.2f} "
                      f"{row['errors'] or ''}", file=sys.stderr, flush=True)
    write_report(rows, meta, args.out)


if __name__ == "__main__":
    main()
