"""Which CUDA program serves each benchmark layer best: the norm op with method 'ghost',
'materialize' and 'auto' (the cost model's pick), timed side by side against the layer's own weight
gradient, so that a wrong pick of the cost model and the program to tune next are visible; and the
fused op's program (weight and bias gradient with the norms, method 'materialize'), whose cost over
the materialize column is what forming the batch gradient adds.

    python bench/programs_gpu.py [--batch 128] [--dtypes float32 bfloat16] [--out DIR] [--profile LAYER] [--smoke]

Prints a table (times over wgrad) and writes programs_gpu.md. --profile LAYER runs that layer's
norm op once per method after a warm-up and nothing else, for a profiler (ncu) to attach to.
--smoke runs the harness on the CPU (two layers, batch 4: bench/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops_gpu  # noqa: E402
from ops_cpu import LAYERS  # noqa: E402
from ops_gpu import cuda_medians  # noqa: E402
from peers_cpu import methods  # noqa: E402

PROGRAMS = ("auto", "ghost", "materialize")


def norm_op(layer, x, g, method):
    import fisher_ext

    bias = layer.bias is not None
    if isinstance(layer, torch.nn.Linear):
        return lambda: fisher_ext.linear_sqnorm(x, g, bias=bias, method=method)
    return lambda: fisher_ext.conv_sqnorm(x, g, kernel_size=layer.kernel_size, stride=layer.stride,
                                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                                          bias=bias, method=method)


def fused_op(layer, x, g):
    """The fused op on its own program: the weight and bias gradient with the norms."""
    import fisher_ext

    bias = layer.bias is not None
    if isinstance(layer, torch.nn.Linear):
        return lambda: fisher_ext.linear_grad_sqnorm(x, g, bias=bias, method="materialize")
    return lambda: fisher_ext.conv_grad_sqnorm(x, g, kernel_size=layer.kernel_size, stride=layer.stride,
                                               padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                                               bias=bias, method="materialize")


def case(lid: str, batch: int, dtype: torch.dtype):
    make, shape, batch_override = LAYERS[lid]
    torch.manual_seed(0)
    layer = make().to(ops_gpu.DEVICE, dtype)
    x = torch.randn(batch if ops_gpu.DEVICE == "cpu" else (batch_override or batch), *shape, device=ops_gpu.DEVICE,
                    dtype=dtype)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    return layer, x, g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--profile", choices=list(LAYERS))
    parser.add_argument("--smoke", action="store_true", help="the harness on the CPU: layers L2 and C6, batch 4")
    args = parser.parse_args()
    layers = list(LAYERS)
    if args.smoke:
        ops_gpu.DEVICE = "cpu"
        args.batch, args.dtypes, args.repeats, layers = 4, ["float32"], 2, ["L2", "C6"]
    elif not torch.cuda.is_available():
        raise SystemExit("programs_gpu.py: no CUDA device is visible")
    if args.profile:
        for dtype_name in args.dtypes:
            layer, x, g = case(args.profile, args.batch, getattr(torch, dtype_name))
            for method in PROGRAMS:
                norm_op(layer, x, g, method)()
            fused_op(layer, x, g)()
        if not args.smoke:
            torch.cuda.synchronize()
        return
    device = "CPU (--smoke)" if args.smoke else torch.cuda.get_device_name()
    lines = [f"# CUDA programs per layer ({device}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)", "",
             f"Batch {args.batch}; times over the layer's own weight gradient (wgrad), medians of {args.repeats} "
             "interleaved rounds timed with CUDA events.", "",
             "| layer | dtype | wgrad ms | " + " | ".join(PROGRAMS) + " | best | fused |",
             "|---|---|---|---|---|---|---|---|"]
    for dtype_name in args.dtypes:
        for lid in layers:
            layer, x, g = case(lid, args.batch, getattr(torch, dtype_name))
            fns = {"wgrad": methods(layer, x, g, {"opacus": None, "backpack": None})["wgrad"]}
            fns.update({m: norm_op(layer, x, g, m) for m in PROGRAMS})
            fns["fused"] = fused_op(layer, x, g)
            t = cuda_medians(fns, args.repeats)
            best = min(PROGRAMS[1:], key=t.get)
            lines.append(f"| {lid} | {dtype_name} | {t['wgrad'] * 1e3:.3f} | "
                         + " | ".join(f"{t[m] / t['wgrad']:.2f}" for m in PROGRAMS)
                         + f" | {best} | {t['fused'] / t['wgrad']:.2f} |")
            print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "programs_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
