"""precision='bf16' against the default, per layer and on a whole model: time and error.

    python bench/precision_cpu.py [--batch 64] [--threads 1] [--repeats 9] [--out bench/results]

Per layer of the benchmark list (bench/ops_cpu.py), on one captured float32 (x, g):

  full        fisher_ext.linear_sqnorm / conv_sqnorm on the float32 tensors (the default)
  bf16        the same with precision='bf16' (what fisher_trace(..., precision='bf16') runs)
  bf16-inputs precision='bf16' on x and g already in bfloat16 (a model trained in bfloat16)

Each result is compared with a float64 torch.func oracle of the float32 tensors: the largest and
the median relative error over the examples. Times are medians of interleaved rounds
(peers_cpu.interleaved_medians). Then, on a ResNet-18 (GroupNorm) at the same batch,
fisher_trace with each precision (the same sampled labels), against the float64 model's Tr(F).
Writes precision_cpu.md and .json to --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_ext  # noqa: E402
from fisher_ext.experiments.models import ResNet18  # noqa: E402
from ops_cpu import LAYERS, _cpu_name  # noqa: E402
from peers_cpu import captured, interleaved_medians, oracle  # noqa: E402


def _op(layer: nn.Module):
    """(x, g, precision) -> the layer's per-example squared norms through the package's op."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return lambda x, g, precision: fisher_ext.linear_sqnorm(x, g, bias=bias, precision=precision)
    return lambda x, g, precision: fisher_ext.conv_sqnorm(x, g, kernel_size=layer.kernel_size, stride=layer.stride,
                                                          padding=layer.padding, dilation=layer.dilation,
                                                          groups=layer.groups, bias=bias, precision=precision)


def _errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    rel = (got.double() - want).abs() / want.abs().clamp_min(1e-30)
    return {"max": rel.max().item(), "median": rel.median().item()}


def measure_layer(layer_id: str, batch: int, repeats: int) -> dict:
    layer, x, g = captured(layer_id, batch)
    batch = x.shape[0]
    want = oracle(layer, x, g)
    op = _op(layer)
    xb, gb = x.bfloat16(), g.bfloat16()
    fns = {"full": lambda: op(x, g, "full"), "bf16": lambda: op(x, g, "bf16"),
           "bf16-inputs": lambda: op(xb, gb, "bf16")}
    errors = {name: _errors(fns[name](), want) for name in ("full", "bf16")}
    seconds = interleaved_medians(fns, repeats)
    return {"layer": layer_id, "batch": batch, "seconds": seconds, "errors": errors,
            "speedup": seconds["full"] / seconds["bf16"],
            "speedup_bf16_inputs": seconds["full"] / seconds["bf16-inputs"]}


def measure_model(batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = ResNet18(norm=lambda c: nn.GroupNorm(32, c))
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        labels = torch.distributions.Categorical(logits=model(x)).sample()
    exact = fisher_ext.fisher_trace(copy.deepcopy(model).double(), x.double(), labels=labels)
    out = {"trace_float64": exact.trace}
    for precision in ("full", "bf16"):
        times, result = [], None
        for _ in range(repeats + 1):
            start = time.perf_counter()
            result = fisher_ext.fisher_trace(model, x, labels=labels, precision=precision)
            times.append(time.perf_counter() - start)
        out[precision] = {"seconds": statistics.median(times[1:]), "trace": result.trace,
                          "trace_error": abs(result.trace - exact.trace) / exact.trace,
                          "per_example": _errors(result.per_example, exact.per_example)}
    return out


def write_report(layers: list[dict], model: dict, meta: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "precision_cpu.json"), "w") as f:
        json.dump({"meta": meta, "layers": layers, "model": model}, f, indent=1)
    lines = ["# precision='bf16' against the default (CPU)", "",
             f"{meta['date']}; {meta['cpu']} ({meta['machine']}); torch {meta['torch']}; {meta['threads']} "
             f"thread(s); batch {meta['batch']}; native bf16 GEMMs: {meta['bf16_gemm']}; median of "
             f"{meta['repeats']} interleaved rounds.", "",
             "`full`: the op on the float32 tensors; `bf16`: the same with `precision='bf16'` (what "
             "`fisher_trace(..., precision='bf16')` runs); `bf16-inputs`: `precision='bf16'` on tensors already in "
             "bfloat16. Errors: relative to a float64 torch.func oracle of the float32 tensors, over the "
             "examples.", "",
             "| layer | full ms | bf16 ms | bf16-inputs ms | speedup | speedup, bf16 inputs | full max err | "
             "bf16 max err | bf16 median err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        s, e = r["seconds"], r["errors"]
        lines.append(f"| {r['layer']} | {s['full'] * 1e3:.2f} | {s['bf16'] * 1e3:.2f} | {s['bf16-inputs'] * 1e3:.2f} | "
                     f"{r['speedup']:.2f} | {r['speedup_bf16_inputs']:.2f} | {e['full']['max']:.1e} | "
                     f"{e['bf16']['max']:.1e} | {e['bf16']['median']:.1e} |")
    lines += ["", f"ResNet-18 (GroupNorm), batch {meta['batch']}, `fisher_trace` (forward, backward and norms), "
              f"float64 model's Tr(F) = {model['trace_float64']:.6g}:", "",
              "| precision | s | Tr(F) | Tr(F) rel. error | per-example max err | per-example median err |",
              "|---|---|---|---|---|---|"]
    for precision in ("full", "bf16"):
        m = model[precision]
        lines.append(f"| {precision} | {m['seconds']:.2f} | {m['trace']:.6g} | {m['trace_error']:.1e} | "
                     f"{m['per_example']['max']:.1e} | {m['per_example']['median']:.1e} |")
    with open(os.path.join(out_dir, "precision_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = fisher_ext.build_info()
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": _cpu_name(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
            "bf16_gemm": bool(info["compiled"] and info["compiled"].get("cpu_bf16_gemm"))}
    layers = []
    for layer_id in args.layers:
        layers.append(measure_layer(layer_id, args.batch, args.repeats))
        r = layers[-1]
        print(f"{layer_id}: speedup {r['speedup']:.2f} (bf16 inputs {r['speedup_bf16_inputs']:.2f}), "
              f"bf16 max err {r['errors']['bf16']['max']:.1e}", flush=True)
    write_report(layers, measure_model(args.batch, max(1, args.repeats // 3)), meta, args.out)


if __name__ == "__main__":
    main()
