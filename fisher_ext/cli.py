"""``fisher-ext``: reproduce "Catastrophic Fisher Explosion" (Jastrzebski et al., ICML 2021) with
fisher_ext's own Fisher Penalty and Tr(F) monitor.

    fisher-ext reproduce            # the paper's three claims, one report (a few minutes on 2 cores)
    fisher-ext reproduce --quick    # the same pipeline in under a minute (too short to judge the claims)
    fisher-ext explosion            # claims 1-2: small learning rate, Tr(F) explosion, the penalty's cure
    fisher-ext memorization         # claim 3: noisy labels, with and without the penalty
    fisher-ext train --lr 0.01 --penalty fp                 # one run, a line per epoch
    fisher-ext grid --lr 0.01 0.03 0.1 0.3                  # which learning rate is best
    fisher-ext report RESULTS       # re-render a results folder's report and figures
    fisher-ext check                # Tr(F) of a small CNN from the kernels, checked against torch.func

Rerunning a command on the same --out folder skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
from pathlib import Path

import torch

from .experiments import claims, models, report
from .experiments.data import DATASETS
from .experiments.files import atomic_write_json, atomic_write_text
from .experiments.runner import METHODS, PENALTIES, RunConfig, run
from .experiments.schedule import RunFailed, Task, execute

# Best learning rate per (dataset, model), from `fisher-ext grid` (docs/results has the grid).
BEST_LR = {("mnist1d", "cnn1d"): 0.1}
QUICK = {"epochs": 12, "seeds": [0, 1], "probe": 256, "dense_epochs": 1}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _number(text: str, kind: type, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an int >= 1")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _common(p: argparse.ArgumentParser, *, lr_help: str, many_lr: bool = False, allow_none: bool = False) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default="mnist1d",
                   help="mnist1d (default; generated locally and cached) or cifar10/cifar100 from --data-dir")
    g.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the python version)")
    g.add_argument("--model", choices=sorted(models.MODELS),
                   help="default: cnn1d for mnist1d, resnet18 (GroupNorm) for CIFAR")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=_positive_float, nargs="+" if many_lr else None, help=lr_help)
    g.add_argument("--epochs", type=_positive_int, help="epochs per run (default: 150; --quick: 12)")
    g.add_argument("--seeds", type=int, nargs="+", help="seeds, one run each per configuration (default: 0 1 2)")
    g.add_argument("--batch", type=_positive_int, default=128, help="batch size (default: 128)")
    g.add_argument("--momentum", type=_fraction, default=0.9, help="SGD momentum, in [0, 1) (default: 0.9)")
    g = p.add_argument_group("penalty")
    g.add_argument("--penalty", choices=PENALTIES if allow_none else PENALTIES[1:],
                   default="none" if allow_none else "fp",
                   help="fp: the Fisher Penalty" + (", none: no penalty (default)" if allow_none else " (default)") +
                        "; gp / gpr / gpx: the paper's gradient-penalty baselines (true labels / random labels / "
                        "input gradient)")
    g.add_argument("--alpha", type=_nonnegative_float, nargs="+" if many_lr else None,
                   help="penalty weight" + (" or weights (a grid over both)" if many_lr else "") + " (default: 1, "
                        "with --every 10; alpha 0.1 every step trains to the same accuracy at 2.7x the cost)")
    g.add_argument("--every", type=_positive_int, default=10,
                   help="apply the penalty every k-th step, the paper's cost saving (default: 10)")
    g.add_argument("--method", choices=METHODS, default="auto",
                   help="how the penalty's gradient is formed: auto (finite difference; exact for gpx), "
                        "finite_difference or double_backward (exact)")
    g = p.add_argument_group("measurement and execution")
    g.add_argument("--noise", type=_fraction, help="fraction of training labels replaced by another class "
                                                   "(memorization: default 0.2; train/grid: default 0)")
    g.add_argument("--probe", type=_positive_int, help="training examples in the fixed Tr(F) probe set (default: 512)")
    g.add_argument("--device", default=None, help="cpu (default) or cuda")
    g.add_argument("--jobs", type=_positive_int, help="parallel processes, each single-threaded "
                                                      "(default: all cores on CPU, 1 on CUDA)")
    g.add_argument("--out", type=Path, help="results folder (default: fisher-ext-results/<command>[-quick])")
    g.add_argument("--quick", action="store_true", help="a short version (12 epochs, 2 seeds, 256 probe examples): "
                                                        "checks the pipeline in under a minute, too short to judge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisher-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("reproduce", "all three claims, one report (the main job)"),
                       ("explosion", "claims 1-2: Tr(F) explosion at a small learning rate, and the penalty"),
                       ("memorization", "claim 3: noisy labels, with and without the penalty")):
        p = sub.add_parser(name, help=text, description=text)
        _common(p, lr_help="the best learning rate (default: the grid's best for the model, 0.1 for cnn1d); "
                           "the small one is 10x smaller")
        p.add_argument("--small-lr", type=_positive_float, help="the small learning rate (default: --lr / 10)")
        p.add_argument("--noise-lr", type=_positive_float,
                       help="the noisy-label runs' learning rate (default: the small one)")
    p = sub.add_parser("train", help="one run per seed (one after another), a line per epoch",
                       description="one run per seed (one after another), a line per epoch")
    _common(p, lr_help="learning rate (default: the best one for the model)", allow_none=True)
    p = sub.add_parser("grid", help="a learning-rate grid: which is best", description="a learning-rate grid")
    _common(p, lr_help="learning rates (default: 0.003 0.01 0.03 0.1 0.3)", many_lr=True, allow_none=True)
    p = sub.add_parser("report", help="re-render a results folder's report.md, summary and figures",
                       description="re-render the report.md, summary.json and figures of a folder written by "
                                   "reproduce, explosion or memorization, from its runs' files")
    p.add_argument("folder", type=Path, help="the results folder (the one holding config.json)")
    p = sub.add_parser("check", help="Tr(F) of a small CNN from the kernels, checked against torch.func",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:  # the demo keeps its own options
        from . import demo
        demo.main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()  # restored on return: main may be called in-process
    try:
        if args.command == "report":
            return _report(args.folder)
        _defaults(args)
        torch.set_num_threads(1)  # each run single-threaded, here too: the same numbers at any --jobs
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one run, data-parallel
            return _train_data_parallel(args)
        if args.command == "train":
            return _train(args)
        if args.command == "grid":
            return _grid(args)
        return _claims(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fisher-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"fisher-ext {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        torch.set_num_threads(threads)


def _defaults(args: argparse.Namespace) -> None:
    if args.alpha is not None and args.penalty == "none":
        raise ValueError("--alpha: given without a penalty; add --penalty fp (or gp, gpr, gpx)")
    if args.alpha is None:
        args.alpha = [1.0] if args.command == "grid" else 1.0
    for name in ("seeds", "lr", "alpha"):
        values = getattr(args, name)
        if isinstance(values, list) and len(set(values)) < len(values):
            raise ValueError(f"--{name}: expected distinct values, got {values} "
                             "(a repeated one would be counted twice)")
    if args.command == "explosion" and (args.noise is not None or args.noise_lr is not None):
        raise ValueError("--noise/--noise-lr: explosion runs use the clean labels; use `memorization` or `reproduce` "
                         "for noisy labels")
    if args.model is None:
        args.model = "cnn1d" if args.dataset == "mnist1d" else "resnet18"
    if args.device is None:
        args.device = "cpu"
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {args.device!r} requested, but torch sees no CUDA device")
    quick = args.quick
    args.epochs = args.epochs or (QUICK["epochs"] if quick else 150)
    args.seeds = args.seeds or (QUICK["seeds"] if quick else [0, 1, 2])
    args.probe = args.probe or (QUICK["probe"] if quick else 512)
    args.dense_epochs = QUICK["dense_epochs"] if quick else 2
    args.jobs = args.jobs or (1 if args.device.startswith("cuda") else _cores())
    if args.out is None:
        args.out = Path("fisher-ext-results") / (args.command + ("-quick" if quick else ""))
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out: expected a folder (new or a results folder), got {str(args.out)!r}")
    best = BEST_LR.get((args.dataset, args.model))
    if args.lr is None:
        if args.command == "grid":
            args.lr = [0.003, 0.01, 0.03, 0.1, 0.3]
        elif best is None:
            raise ValueError(f"lr: no known best learning rate for {args.model} on {args.dataset}; find one with "
                             f"`fisher-ext grid --dataset {args.dataset} --model {args.model}` and pass --lr")
        else:
            args.lr = best
    if args.noise is None:
        args.noise = 0.2 if args.command in ("reproduce", "memorization") else 0.0
    if getattr(args, "small_lr", None) is not None and args.small_lr >= args.lr:
        raise ValueError(f"--small-lr: expected a learning rate below --lr {args.lr:g}, got {args.small_lr:g}")


def _config(args: argparse.Namespace, lr: float, seed: int) -> RunConfig:
    penalized = args.penalty != "none"
    return RunConfig(lr=lr, seed=seed, epochs=args.epochs, dataset=args.dataset, model=args.model, batch=args.batch,
                     momentum=args.momentum, penalty=args.penalty, alpha=args.alpha if penalized else 0.0,
                     every=args.every if penalized else 1, method=args.method if penalized else "auto",
                     noise=args.noise, probe=args.probe, dense_epochs=args.dense_epochs, device=args.device,
                     data_dir=args.data_dir)


def _meta(args: argparse.Namespace, argv_command: str) -> dict:
    import fisher_ext

    info = fisher_ext.build_info()
    return {"command": argv_command, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {_cores()} cores" + (
                f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""),
            "python": platform.python_version(), "torch": torch.__version__, "fisher_ext": fisher_ext.__version__,
            "backend": "compiled extension" if info["extension"] else f"pure PyTorch ({info['fallback_reason']})",
            "build_info": info, "jobs": args.jobs}


def _claims(args: argparse.Namespace) -> int:
    experiments = {"reproduce": ("explosion", "memorization")}.get(args.command, (args.command,))
    setup = claims.Setup(dataset=args.dataset, model=args.model, epochs=args.epochs, seeds=args.seeds,
                         best_lr=args.lr, small_lr=args.small_lr, penalty=args.penalty, alpha=args.alpha,
                         every=args.every, method=args.method, noise=args.noise, noise_lr=args.noise_lr,
                         batch=args.batch, momentum=args.momentum, probe=args.probe, dense_epochs=args.dense_epochs,
                         device=args.device, data_dir=args.data_dir)
    runs = claims.plan(setup, experiments)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tasks, entries = [], []
    for experiment, role, cfg in runs:
        folder = Path("runs") / cfg.slug() / f"seed{cfg.seed}"
        tasks.append(Task(cfg, out / folder))
        entries.append({"experiment": experiment, "role": role, "label": cfg.label(), "seed": cfg.seed,
                        "folder": str(folder)})
    meta = {**_meta(args, " ".join([args.command] + (["--quick"] if args.quick else []))),
            "setup": {k: v for k, v in dataclasses.asdict(setup).items() if k != "data_dir"},
            "method": runs[-1][2].resolved_method if setup.penalty != "none" else None,
            "dense_every": RunConfig.dense_every, "plan": entries}
    atomic_write_json(out / "config.json", meta)
    labels = "; ".join(dict.fromkeys(e["label"] for e in entries))
    print(f"fisher-ext {args.command}: {len(tasks)} runs [{labels}] x seeds {args.seeds}, {args.epochs} epochs, "
          f"on {min(args.jobs, len(tasks))} process(es) -> {out}", file=sys.stderr)
    execute(tasks, args.jobs)
    summary = report.render(out)
    for v in summary["verdicts"]:
        print(f"claim {v['claim']}: {v['verdict']} -- {v['evidence']}")
    print(f"report: {out / 'report.md'}")
    return 0


def _report(folder: Path) -> int:
    if not (folder / "config.json").exists():
        print(f"fisher-ext report: error: {folder} is not a results folder (no config.json)", file=sys.stderr)
        return 2
    summary = report.render(folder)
    for v in summary["verdicts"]:
        print(f"claim {v['claim']}: {v['verdict']} -- {v['evidence']}")
    print(f"report: {folder / 'report.md'}")
    return 0


def _train_data_parallel(args: argparse.Namespace) -> int:
    """``torchrun --nproc_per_node N -m fisher_ext train ...``: each run on N processes (gloo on the
    CPU, NCCL on GPUs), the global batch --batch split between them; process 0 reports."""
    import torch.distributed as dist

    if args.command != "train":
        raise ValueError(f"{args.command}: under torchrun only `train` runs (one run, data-parallel); the other "
                         "commands spread their runs over --jobs processes themselves")
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # process 0 reports
        print(f"data-parallel on {dist.get_world_size()} processes ({dist.get_backend()}), global batch {args.batch}")
        return _train(args)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    for seed in args.seeds:
        cfg = _config(args, args.lr, seed)
        folder = args.out / "runs" / cfg.slug() / f"seed{seed}"
        print(f"{cfg.label()} seed {seed} -> {folder}")

        def line(epoch: int, m: dict) -> None:
            text = (f"epoch {epoch:4d}/{cfg.epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.3f}  "
                    f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.3f}  Tr(F) {m['trace']:.2f}")
            if "noisy_fit" in m:
                text += f"  fitted: noisy {m['noisy_fit']:.3f} clean {m['clean_fit']:.3f}"
            print(text + f"  [{sum(m['seconds'].values()):.1f} s]", flush=True)

        result = run(cfg, folder, line)
        if result["status"] == "diverged":
            print(f"DIVERGED: {result['diverged_at'].get('reason', '')}")
        else:
            print(f"done: test acc {result['test_acc']:.3f}, peak Tr(F) {result['peak_trace']:.2f} "
                  f"at epoch {result['peak_epoch']:.2f}, final Tr(F) {result['final_trace']:.2f}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    alphas = args.alpha if args.penalty != "none" else [0.0]
    points = [(lr, alpha) for lr in args.lr for alpha in alphas]
    tasks = []
    for lr, alpha in points:
        for seed in args.seeds:
            cfg = _config(argparse.Namespace(**{**vars(args), "alpha": alpha}), lr, seed)
            tasks.append(Task(cfg, args.out / "runs" / cfg.slug() / f"seed{seed}"))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"fisher-ext grid: learning rates {args.lr}" + (f", alphas {alphas}" if args.penalty != "none" else "") +
          f", seeds {args.seeds}, {args.epochs} epochs -> {args.out}", file=sys.stderr)
    results = execute(tasks, args.jobs)
    rows, best = [], None
    for lr, alpha in points:
        mine = [r for t, r in zip(tasks, results) if (t.config.lr, t.config.alpha) == (lr, alpha)]
        done = [r for r in mine if r["status"] == "finished"]
        acc = claims.Stat([r["test_acc"] for r in done])
        rows.append({"lr": lr, "alpha": alpha, "finished": len(done), "runs": len(mine), "test_acc": acc.values,
                     "peak_trace": [r["peak_trace"] for r in done]})
        if done and len(done) == len(mine) and (best is None or acc.mean > best[2]):
            best = (lr, alpha, acc.mean)
    penalized = args.penalty != "none"
    lines = [f"# Grid: {args.dataset}, {args.model}", "",
             f"{args.epochs} epochs, batch {args.batch}, SGD momentum {args.momentum}, seeds {args.seeds}"
             + (f", penalty {args.penalty} {'on every step' if args.every == 1 else f'every {args.every}th step'}, "
                f"method {args.method}" if penalized else "") + (f", {args.noise:.0%} noisy labels" if args.noise
                                                                     else "") + ".", "",
             "| lr |" + (" alpha |" if penalized else "") + " finished | final test acc | peak Tr(F) |",
             "|---|" + ("---|" if penalized else "") + "---|---|---|"]
    for row in rows:
        lines.append(f"| {row['lr']:g} |" + (f" {row['alpha']:g} |" if penalized else "") +
                     f" {row['finished']}/{row['runs']} | {claims.Stat(row['test_acc']).text()} | "
                     f"{claims.Stat(row['peak_trace']).text('.1f')} |")
    lines += ["", (f"Best (highest mean final test accuracy, every seed finished): lr {best[0]:g}"
                   + (f", alpha {best[1]:g}" if penalized else "")) if best else
              "No point of the grid finished on every seed."]
    atomic_write_json(args.out / "grid.json", {**_meta(args, "grid"), "rows": rows,
                                               "best": {"lr": best[0], "alpha": best[1]} if best else None})
    atomic_write_text(args.out / "grid.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
