"""GPU benchmark of the per-example squared-norm ops against the installed peers, on the project's
benchmark layers (L1-L3, C1-C7 of bench/ops_cpu.py).

    bash bench/install_peers.sh   # Opacus, BackPACK (optional: a missing peer is reported as such)
    python bench/ops_gpu.py [--batches 128 256] [--dtypes float32 bfloat16] [--quick] [--out DIR]

Every method computes each example's squared gradient norm (weight and bias) from the same captured
layer input x and output gradient g (bench/peers_cpu.py builds them: ours, opacus, opacus-ghost,
backpack, func, and wgrad, the layer's own weight- and bias-gradient backward through cuDNN/cuBLAS,
and fused, our weight gradient and norms in one op). Side by side in one process, interleaved rounds,
each timed with CUDA events over a loop of calls, median of --repeats rounds. Each result is checked
against a float64 torch.func oracle on the same (x, g) (relative error at most 1e-3 in float32,
5e-2 in bfloat16; the fused op's weight gradient against wgrad's); a method that disagrees or fails
is reported, not timed.
  wgrad-fp32 float32 convolutions: wgrad with cuDNN's TF32 off (torch's default rounds to TF32)
  roofline   max(bytes / bandwidth, flops / peak) of our op, with the bandwidth (device copy) and the
             matrix peak (large GEMM in the dtype) measured in the same run
Ratios: to wgrad, and ours / the fastest correct peer. Writes ops_gpu.md and ops_gpu.json; prints the
table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_ext  # noqa: E402
from ops_cpu import LAYERS  # noqa: E402  (one layer list for every benchmark)
from peers_cpu import PEERS, _versions, interleaved_medians, methods, oracle  # noqa: E402

DEVICE = "cuda"
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def cuda_medians(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Seconds per call of each function, timed with CUDA events over a loop of calls lasting about
    half a millisecond or more (launch gaps of single short calls would dominate otherwise), the
    functions taking turns within each round; the median over rounds."""
    if DEVICE != "cuda":  # --smoke: the harness on the CPU
        return interleaved_medians(fns, repeats)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run(fn, loops: int) -> float:
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / loops

    loops = {}
    for name, fn in fns.items():
        run(fn, 3)  # warm-up: handles, autotuning, vmap tracing
        loops[name] = max(1, math.ceil(5e-4 / max(run(fn, 1), 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for k in range(repeats):
        for name in order[k % len(order):] + order[:k % len(order)]:
            times[name].append(run(fns[name], loops[name]))
    return {name: statistics.median(v) for name, v in times.items()}


def machine_ceilings(dtype: torch.dtype) -> tuple[float, float]:
    """(bytes/s counting read + write of a large device copy, flop/s of a large GEMM in dtype)."""
    n, m = (1 << 28, 8192) if DEVICE == "cuda" else (1 << 20, 256)
    src = torch.randn(n, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = cuda_medians({"copy": lambda: dst.copy_(src)}, 20)["copy"]
    bandwidth = 2 * src.numel() * 4 / seconds
    a = torch.randn(m, m, device=DEVICE, dtype=dtype)
    b = torch.randn(m, m, device=DEVICE, dtype=dtype)
    peak = 2 * m ** 3 / cuda_medians({"gemm": lambda: a @ b}, 10)["gemm"]
    return bandwidth, peak


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def layer_case(lid: str, batch: int, dtype: torch.dtype, repeats: int, ceilings, installed: dict) -> dict:
    make, shape, batch_override = LAYERS[lid]
    batch = batch_override or batch
    torch.manual_seed(0)
    layer = make().to(DEVICE, dtype)
    x = torch.randn(batch, *shape, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    want = oracle(layer, x, g)
    table = methods(layer, x, g, installed)
    want_w, want_b = (t.detach() for t in table["wgrad"]())
    tol = TOLERANCE[dtype]
    fns, errors, rel = {"wgrad": table.pop("wgrad")}, {}, {}
    if dtype == torch.float32 and not isinstance(layer, nn.Linear):  # cuDNN's default rounds to TF32
        def wgrad_fp32(wgrad=fns["wgrad"]):
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                return wgrad()
        fns["wgrad-fp32"] = wgrad_fp32
    for name, fn in table.items():
        try:
            got = fn()
            if name == "fused":
                weight, bias_grad, got = got
                werr = max(_rel(weight, want_w), _rel(bias_grad, want_b) if bias_grad is not None else 0.0)
                if not werr <= tol / 10:
                    errors[name] = f"wrong: its weight gradient differs from wgrad's by {werr:.1e}"
                    continue
            rel[name] = float(((got.double() - want).abs() / want.abs().clamp_min(1e-30)).max())
        except Exception as e:  # a peer that cannot handle the layer or the dtype
            errors[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        if not rel[name] <= tol:  # NaN fails too
            errors[name] = f"wrong: relative error {rel[name]:.1e}"
            continue
        fns[name] = fn
    seconds = cuda_medians(fns, repeats)
    T = math.prod(g.shape[1:-1]) if isinstance(layer, nn.Linear) else math.prod(g.shape[2:])
    groups = getattr(layer, "groups", 1)
    d_in = layer.weight[0].numel()
    d_out = layer.weight.shape[0] // groups
    flops = 2 * batch * groups * min(T * d_in * d_out, T * T * (d_in + d_out))
    nbytes = (x.numel() + g.numel()) * x.element_size()
    bandwidth, peak = ceilings
    seconds["roofline"] = max(nbytes / bandwidth, flops / peak)
    peers = {k: v for k, v in seconds.items() if k in PEERS}
    best = min(peers, key=peers.get) if peers else None
    return {"layer": lid, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "errors": errors, "rel_err": rel, "best_peer": best,
            "ratio": {k: v / seconds["wgrad"] for k, v in seconds.items()},
            "ours_vs_best_peer": seconds["ours"] / peers[best] if best and "ours" in seconds else None,
            "fused_vs_peer_and_wgrad": seconds["fused"] / (peers[best] + seconds["wgrad"])
            if best and "fused" in seconds else None}


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="check the harness on the CPU (tiny sizes, no GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run for bench/gpu_check.sh: batch 128, every layer and dtype, 7 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = [128], 7
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        args.batches, args.layers, args.repeats, args.dtypes = [4], ["L2", "C6"], 2, ["float32"]
    elif not torch.cuda.is_available():
        raise SystemExit("ops_gpu.py: no CUDA device is visible (torch.cuda.is_available() is False)")
    installed = _versions()
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ceilings = machine_ceilings(dtype)
        print(f"{dtype_name}: copy bandwidth {ceilings[0] / 1e12:.2f} TB/s, GEMM peak {ceilings[1] / 1e12:.0f} TFLOP/s",
              flush=True)
        for batch in args.batches:
            for lid in args.layers:
                row = layer_case(lid, batch, dtype, args.repeats, ceilings, installed)
                rows.append(row)
                r = row["ratio"]
                print(f"{lid} B={row['batch']} {dtype_name}: wgrad {row['seconds']['wgrad'] * 1e3:.3f} ms | "
                      + " ".join(f"{k} {_fmt(v)}x" for k, v in r.items() if k != "wgrad")
                      + f" | ours/best peer ({row['best_peer']}) {_fmt(row['ours_vs_best_peer'])}"
                      + "".join(f" | {k}: {v}" for k, v in row["errors"].items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (--smoke)", "torch": torch.__version__,
            "backend": fisher_ext.build_info()["backends"][DEVICE.upper()]["conv_sqnorm"],
            "peers": {k: v or "not installed" for k, v in installed.items()}, "repeats": args.repeats}
    with open(os.path.join(args.out, "ops_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = ["ours", "fused", *PEERS, "wgrad-fp32", "roofline"]
    lines = ["# Per-example squared-norm ops on the GPU, against the installed peers", "",
             f"{meta['date']}; {meta['device']}; torch {meta['torch']}; our CUDA ops served by {meta['backend']}; "
             f"peers: opacus {meta['peers']['opacus']}, backpack-for-pytorch {meta['peers']['backpack']}, torch.func. "
             f"Times over the layer's own weight gradient (wgrad: cuDNN/cuBLAS with torch's defaults, so float32 "
             "convolutions in TF32; wgrad-fp32: the same with TF32 off, the precision our float32 ops keep; "
             f"torch.func's float32 conv norms miss the 1e-3 check by TF32's rounding), medians of {args.repeats} "
             "interleaved rounds timed with CUDA events. `-`: not applicable, failed or wrong (listed below).", "",
             "| layer | batch | dtype | wgrad ms | " + " | ".join(cols) + " | best peer | ours / best peer "
             "| fused / (best peer + wgrad) | ours max rel err |",
             "|" + "---|" * (len(cols) + 8)]
    notes = []
    for row in rows:
        lines.append(f"| {row['layer']} | {row['batch']} | {row['dtype']} | {row['seconds']['wgrad'] * 1e3:.3f} | "
                     + " | ".join(_fmt(row["ratio"].get(c)) for c in cols)
                     + f" | {row['best_peer'] or '-'} | {_fmt(row['ours_vs_best_peer'])} | "
                     f"{_fmt(row['fused_vs_peer_and_wgrad'])} | {row['rel_err'].get('ours', float('nan')):.1e} |")
        notes += [f"- {row['layer']} B={row['batch']} {row['dtype']}, {k}: {v}" for k, v in row["errors"].items()]
    lines += ["", *notes] if notes else []
    with open(os.path.join(args.out, "ops_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
