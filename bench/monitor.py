"""End-to-end Tr(F) benchmark: our monitor against BackPACK and torch.func on whole models.

    python bench/monitor.py [--batch 64] [--repeats 3] [--out bench/results]

Models: a CIFAR-sized ResNet-18 with GroupNorm, the same with BatchNorm in eval mode, and a
small Transformer (Embedding, nn.MultiheadAttention, LayerNorm). Columns, each measured in
its own subprocess (so that its peak memory is its own), median of --repeats:
  step        one training step: forward + backward + SGD update
  backward    the backward of that step alone (the unit of the bar)
  ours        FisherTraceMonitor.estimate on a watched training forward: the extra cost per
              monitored step (one extra backward, no extra forward)
  ours-ref    the same with FISHER_EXT_DISABLE_EXT=1 (pure-PyTorch kernels)
  trace       fisher_trace from scratch (forward + norms), for the peers' comparison
  backpack    BackPACK BatchL2Grad: forward + backward with the extension (if installed:
              pip install backpack-for-pytorch; it rejects layers it does not support; its
              hooks cannot follow in-place ReLUs, so those are made out-of-place for it)
  opacus      Opacus GradSampleModule: forward + backward forming every parameter's per-example
              gradients (p.grad_sample), then their norms (bash bench/install_peers.sh)
  opacus-ghost  Opacus GradSampleModuleFastGradientClipping (ghost clipping): forward + the
              backward that forms its per-example norms (get_norm_sample)
  func        torch.func vmap(grad) per-example gradients of all parameters, then their norms
All methods use the same sampled labels; their Tr(F) values must agree.
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

import torch
import torch.nn.functional as F
from torch import nn

from fisher_ext.experiments.models import ResNet18

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["step", "backward", "ours", "ours-ref", "trace", "opacus", "opacus-ghost", "backpack", "func"]


# ---- models ------------------------------------------------------------------------------


class SmallTransformer(nn.Module):
    """Two pre-norm Transformer blocks over T tokens, classifying each sequence."""

    def __init__(self, vocab=1000, dim=128, heads=4, layers=2, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim), "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "norm2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)}))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            x = b["norm1"](h)
            h = h + b["attn"](x, x, x, need_weights=False)[0]
            h = h + b["fc2"](F.gelu(b["fc1"](b["norm2"](h))))
        return self.head(self.norm(h).mean(1))


def make(model_name: str, batch: int):
    torch.manual_seed(0)
    if model_name == "resnet18-groupnorm":
        model, x = ResNet18(norm=lambda c: nn.GroupNorm(32, c)), torch.randn(batch, 3, 32, 32)
    elif model_name == "resnet18-batchnorm-eval":
        model, x = ResNet18(norm=nn.BatchNorm2d), torch.randn(batch, 3, 32, 32)
        model.eval()
    else:
        model, x = SmallTransformer(), torch.randint(0, 1000, (batch, 32))
    with torch.no_grad():
        labels = torch.distributions.Categorical(logits=model(x)).sample()
    return model, x, labels


MODELS = ["resnet18-groupnorm", "resnet18-batchnorm-eval", "transformer"]


# ---- one measurement (runs in a subprocess) -------------------------------------------------


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def measure(model_name: str, method: str, batch: int, repeats: int) -> dict:
    import fisher_ext

    model, x, y = make(model_name, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: repeated steps see the same model

    def loss_sum(out):
        return F.cross_entropy(out, y, reduction="sum")

    if method == "step":
        def fn():
            opt.zero_grad()
            loss_sum(model(x)).backward()
            opt.step()
    elif method == "backward":
        def fn():
            opt.zero_grad()
            loss = loss_sum(model(x))
            start = time.perf_counter()
            loss.backward()
            return time.perf_counter() - start
        times = [fn() for _ in range(repeats + 1)][1:]
        return {"seconds": statistics.median(times)}
    elif method in ("ours", "ours-ref"):
        monitor = fisher_ext.FisherTraceMonitor(model)

        def fn():
            with monitor.watch():
                out = model(x)
            start = time.perf_counter()
            result = monitor.estimate(out, labels=y)
            return time.perf_counter() - start, result.trace
        runs = [fn() for _ in range(repeats + 1)][1:]
        return {"seconds": statistics.median(r[0] for r in runs), "trace": runs[-1][1],
                "backend": fisher_ext.build_info()["backends"]["CPU"]["conv_sqnorm"]}
    elif method == "trace":
        def fn():
            return fisher_ext.fisher_trace(model, x, labels=y).trace
    elif method == "backpack":
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad
        except ImportError:
            return {"skipped": "BackPACK is not installed (pip install backpack-for-pytorch)"}
        for m in model.modules():  # BackPACK's module hooks cannot follow in-place ReLUs; same math
            if isinstance(m, nn.ReLU):
                m.inplace = False
        try:
            model = extend(model)
            lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))

            def fn():
                opt.zero_grad()
                with backpack(BatchL2Grad()):
                    lossfunc(model(x), y).backward()
                return float(sum(p.batch_l2.sum() for p in params)) / batch
            fn()
        except Exception as err:  # BackPACK rejects modules it has no extension for
            return {"skipped": f"BackPACK failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    elif method in ("opacus", "opacus-ghost"):
        try:
            from opacus import GradSampleModule
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
        except ImportError:
            return {"skipped": "Opacus is not installed (bash bench/install_peers.sh)"}
        try:
            # nn.MultiheadAttention fails in Opacus; its own replacement (ModuleValidator.fix ->
            # DPMultiheadAttention, same weights) computes another function here (outputs 0.1 apart),
            # so there is no Opacus run of the same model to time
            if method == "opacus":
                wrapped = GradSampleModule(model, loss_reduction="sum")

                def fn():
                    opt.zero_grad()
                    loss_sum(wrapped(x)).backward()
                    total = sum(p.grad_sample.flatten(1).square().sum(1) for p in params)
                    for p in params:
                        p.grad_sample = None
                    return float(total.mean())
            else:  # ghost clipping's first backward forms the per-example norms
                wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", use_ghost_clipping=True)

                def fn():
                    opt.zero_grad()
                    loss_sum(wrapped(x)).backward()
                    return float(wrapped.get_norm_sample().square().mean())
            fn()
        except Exception as err:  # Opacus rejects modules it has no sampler for, and eval-mode models
            return {"skipped": f"Opacus failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    elif method == "func":
        from torch.func import functional_call, grad, vmap
        named = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def per_example_loss(p, xn, yn):
            return F.cross_entropy(functional_call(model, (p, buffers), (xn.unsqueeze(0),)), yn.unsqueeze(0))

        def fn():
            grads = vmap(grad(per_example_loss), in_dims=(None, 0, 0))(named, x, y)
            return float(sum(g.flatten(1).square().sum(1) for g in grads.values()).mean())
    else:
        raise ValueError(method)
    seconds, value = median_time(fn, repeats)
    out = {"seconds": seconds}
    if isinstance(value, float):
        out["trace"] = value
    return out


# ---- driver -------------------------------------------------------------------------------


def run_one(model_name, method, args) -> dict:
    env = dict(os.environ)
    if method == "ours-ref":
        env["FISHER_EXT_DISABLE_EXT"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--one", model_name, method, "--batch", str(args.batch),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else proc.returncode
        return {"skipped": f"failed: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        result = measure(args.one[0], args.one[1], args.batch, args.repeats)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    rows = {}
    for model_name in args.models:
        rows[model_name] = {}
        for method in args.methods:
            r = run_one(model_name, method, args)
            rows[model_name][method] = r
            shown = f"{r['seconds'] * 1e3:9.1f} ms" if "seconds" in r else r.get("skipped", "")
            trace = f" Tr(F) {r['trace']:.6g}" if "trace" in r else ""
            print(f"{model_name:24s} {method:9s} {shown}{trace}  peak {r.get('peak_mb', 0):.0f} MB", flush=True)
    write_report(rows, args)


def write_report(rows: dict, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "batch": args.batch, "repeats": args.repeats}
    with open(os.path.join(args.out, "monitor.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# Tr(F) on whole models (CPU)", "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; batch "
             f"{meta['batch']}; median of {meta['repeats']} runs, each method in its own process (peak RSS is "
             "that process's, model and data included).", "",
             "`ours`: the extra cost of `FisherTraceMonitor.estimate` on a watched training forward; `ours-ref`: "
             "the same on the pure-PyTorch kernels; `trace`: `fisher_trace` from scratch (forward + norms); "
             "`opacus`: Opacus GradSampleModule forward + backward + norms of `grad_sample`; `opacus-ghost`: "
             "Opacus ghost clipping's forward + norm-forming backward; "
             "`backpack`: BackPACK BatchL2Grad forward + backward (in-place ReLUs made out-of-place for it); `func`: "
             "torch.func vmap(grad). Bar: `ours` / "
             "`backward` under 1.5, and `trace` faster than every peer.", "",
             "| model | method | ms | / backward | Tr(F) | peak MB |", "|---|---|---|---|---|---|"]
    for model_name, methods in rows.items():
        unit = methods.get("backward", {}).get("seconds")
        for method, r in methods.items():
            if "seconds" not in r:
                lines.append(f"| {model_name} | {method} | {r.get('skipped', '')} | | | |")
                continue
            ratio = f"{r['seconds'] / unit:.2f}" if unit else ""
            trace = f"{r['trace']:.6g}" if "trace" in r else ""
            lines.append(f"| {model_name} | {method} | {r['seconds'] * 1e3:.1f} | {ratio} | {trace} | "
                         f"{r.get('peak_mb', 0):.0f} |")
    with open(os.path.join(args.out, "monitor.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
