"""GPU benchmark of the per-example squared-norm ops on the project's benchmark layers (L1-L3, C1-C7, below).

    python bench/ops_gpu.py [--batches 128 256] [--dtypes float32 bfloat16] [--out DIR]

Side by side in one process, timed with CUDA events (median of --repeats after warm-up):
  wgrad        the layer's own weight gradient (cuDNN / cuBLAS backward-weight): the floor
  ours         fisher_ext ops, method auto, from the captured input and output gradient
  torch-best   the faster of the plain-PyTorch ghost and materialize (fisher_ext.reference)
  unfold       unfold + einsum materialization (what Opacus does) = reference 'materialize'
  func         torch.func vmap(grad) per-example weight gradients, then their norms
  roofline     max(bytes / bandwidth, flops / peak) of our op, with the bandwidth (device copy)
               and the matrix peak (large GEMM in the dtype) measured in the same run
Ratios are to wgrad. Writes ops_gpu.md and ops_gpu.json; prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_ext  # noqa: E402
from fisher_ext import reference  # noqa: E402
from fisher_ext.ops import _conv_padding  # noqa: E402
from ops_cpu import LAYERS  # noqa: E402  (one layer list for every benchmark)


DEVICE = "cuda"


def cuda_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    if DEVICE != "cuda":  # --smoke: the harness on the CPU, timed by the host clock
        import time
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def machine_ceilings(dtype: torch.dtype) -> tuple[float, float]:
    """(bytes/s counting read + write of a large device copy, flop/s of a large GEMM in dtype)."""
    n, m = (1 << 28, 8192) if DEVICE == "cuda" else (1 << 20, 256)
    src = torch.randn(n, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), 20)
    bandwidth = 2 * src.numel() * 4 / seconds
    a = torch.randn(m, m, device=DEVICE, dtype=dtype)
    b = torch.randn(m, m, device=DEVICE, dtype=dtype)
    peak = 2 * m ** 3 / cuda_time(lambda: a @ b, 10)
    return bandwidth, peak


def layer_case(lid: str, batch: int, dtype: torch.dtype, repeats: int, ceilings) -> dict:
    make, shape, _ = LAYERS[lid]
    torch.manual_seed(0)
    layer = make().to(DEVICE, dtype)
    x = torch.randn(batch, *shape, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        gy = torch.randn_like(layer(x))
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        ours = lambda: fisher_ext.linear_sqnorm(x, gy, bias=bias)  # noqa: E731
        plain = lambda m: reference.linear_sqnorm(x, gy, bias, m)  # noqa: E731
        T, d_in, d_out = math.prod(shape[:-1]), shape[-1], gy.shape[-1]
    else:
        kw = dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                  dilation=layer.dilation, groups=layer.groups)
        lead, _ = _conv_padding(layer.padding, x.shape[2:], layer.kernel_size, layer.stride, layer.dilation)
        ours = lambda: fisher_ext.conv_sqnorm(x, gy, bias=bias, **kw)  # noqa: E731
        plain = lambda m: reference.conv_sqnorm(x, gy, layer.kernel_size, layer.stride, lead,  # noqa: E731
                                                layer.dilation, layer.groups, bias, m)
        T = math.prod(gy.shape[2:])
        d_in, d_out = layer.in_channels // layer.groups * math.prod(layer.kernel_size), layer.out_channels

    def wgrad():
        return torch.autograd.grad(layer(x), layer.weight, gy)

    params = {k: v.detach() for k, v in layer.named_parameters()}

    def func():
        def inner(p, xn, gn):
            return (functional_call(layer, p, (xn.unsqueeze(0),)) * gn.unsqueeze(0)).sum()
        grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, gy)
        return sum(g.float().flatten(1).square().sum(1) for g in grads.values())

    want = func()
    got = ours()
    rel = float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())
    times = {"wgrad": cuda_time(wgrad, repeats), "ours": cuda_time(ours, repeats)}
    for name, fn in [("torch-ghost", lambda: plain("ghost")), ("unfold", lambda: plain("materialize")),
                     ("func", func)]:
        try:
            times[name] = cuda_time(fn, repeats)
        except torch.OutOfMemoryError:
            times[name] = float("nan")
            torch.cuda.empty_cache()
    times["torch-best"] = min(times["torch-ghost"], times["unfold"])
    groups = getattr(layer, "groups", 1)
    flops = 2 * batch * groups * min(T * d_in * d_out, T * T * (d_in + d_out))
    nbytes = (x.numel() + gy.numel()) * x.element_size()
    bandwidth, peak = ceilings
    times["roofline"] = max(nbytes / bandwidth, flops / peak)
    return {"layer": lid, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "seconds": times,
            "ratio": {k: v / times["wgrad"] for k, v in times.items()}, "max_rel_err_vs_func": rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="check the harness on the CPU (tiny sizes, no GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run for bench/gpu_check.sh: batch 128, every layer and dtype, 5 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = [128], 5
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        args.batches, args.layers, args.repeats = [4], ["L2", "C6"], 2
    elif not torch.cuda.is_available():
        raise SystemExit("ops_gpu.py: no CUDA device is visible (torch.cuda.is_available() is False)")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ceilings = machine_ceilings(dtype)
        print(f"{dtype_name}: copy bandwidth {ceilings[0] / 1e12:.2f} TB/s, GEMM peak {ceilings[1] / 1e12:.0f} TFLOP/s",
              flush=True)
        for batch in args.batches:
            for lid in args.layers:
                row = layer_case(lid, batch, dtype, args.repeats, ceilings)
                rows.append(row)
                r = row["ratio"]
                print(f"{lid} B={batch} {dtype_name}: wgrad {row['seconds']['wgrad'] * 1e3:.3f} ms | "
                      f"ours {r['ours']:.2f}x "
                      f"torch-best {r['torch-best']:.2f}x unfold {r['unfold']:.2f}x func {r['func']:.2f}x roofline "
                      f"{r['roofline']:.2f}x | err {row['max_rel_err_vs_func']:.1e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (--smoke)", "torch": torch.__version__,
            "backend": fisher_ext.build_info()["backends"][DEVICE.upper()]["conv_sqnorm"]}
    with open(os.path.join(args.out, "ops_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = ["ours", "torch-best", "unfold", "func", "roofline"]
    lines = ["# Per-example squared-norm ops on the GPU", "",
             f"{meta['date']}; {meta['device']}; torch {meta['torch']}; CUDA ops served by {meta['backend']}. "
             "Times over the layer's own weight gradient (wgrad), median of CUDA-event timings.", "",
             "| layer | batch | dtype | wgrad ms | " + " | ".join(cols) + " | max rel err |",
             "|" + "---|" * (len(cols) + 5)]
    for row in rows:
        lines.append(f"| {row['layer']} | {row['batch']} | {row['dtype']} | {row['seconds']['wgrad'] * 1e3:.3f} | "
                     + " | ".join(f"{row['ratio'][c]:.2f}" for c in cols) + f" | {row['max_rel_err_vs_func']:.1e} |")
    with open(os.path.join(args.out, "ops_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
