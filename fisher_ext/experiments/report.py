"""The results folder's summary (summary.json), figures (figures/*.png) and report.md, computed
from the runs' own files, so ``fisher-ext report`` re-renders any folder."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import claims
from .claims import Stat
from .files import atomic_write_json, atomic_write_text, read_jsonl

ROLE_NAMES = {**claims.EXPLOSION, **claims.MEMORIZATION}


def load_runs(out: Path) -> tuple[dict, list[dict]]:
    """The folder's config.json and, per planned run, its result and metrics (None where unfinished)."""
    meta = json.loads((out / "config.json").read_text())
    runs = []
    for entry in meta["plan"]:
        folder = out / entry["folder"]
        done = folder / "result.json"
        run = {**entry, "status": "unfinished", "result": None, "records": []}
        if done.exists():
            run["result"] = json.loads(done.read_text())
            run["records"] = read_jsonl(folder / "metrics.jsonl")
            run["status"] = run["result"]["status"]
            if run["status"] == "finished":
                run["metrics"] = claims.run_metrics(run["result"], run["records"])
        runs.append(run)
    return meta, runs


def summarize(out: Path) -> dict:
    """summary.json's content: per experiment and role, each metric's mean, std and per-seed
    values, and the verdicts."""
    meta, runs = load_runs(out)
    summary: dict = {"experiments": {}, "verdicts": []}
    for experiment, roles, judge in (("explosion", claims.EXPLOSION, claims.judge_explosion),
                                     ("memorization", claims.MEMORIZATION, claims.judge_memorization)):
        mine = [r for r in runs if r["experiment"] == experiment]
        if not mine:
            continue
        stats = {role: claims.aggregate([r for r in mine if r["role"] == role]) for role in roles}
        summary["experiments"][experiment] = {
            role: {"label": next((r["label"] for r in mine if r["role"] == role), role),
                   "seeds": [r["seed"] for r in mine if r["role"] == role],
                   "status": [r["status"] for r in mine if r["role"] == role],
                   "metrics": {k: {"mean": s.mean, "std": s.std, "values": s.values} for k, s in stats[role].items()}}
            for role in roles}
        summary["verdicts"] += [v.as_dict() for v in judge(stats)]
    return summary


def render(out: Path) -> dict:
    """Write summary.json, the figures and report.md into ``out``; returns the summary."""
    out = Path(out)
    meta, runs = load_runs(out)
    summary = summarize(out)
    atomic_write_json(out / "summary.json", summary)
    figures = _figures(out, runs)
    atomic_write_text(out / "report.md", _markdown(meta, runs, summary, figures))
    return summary


# ---- figures --------------------------------------------------------------------------------------


def _figures(out: Path, runs: list[dict]) -> dict[str, str]:
    """{figure: relative path}; none when matplotlib is missing (the report says so)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    made = {}
    done = [r for r in runs if r["status"] == "finished"]
    roles = [role for role in ROLE_NAMES if any(r["role"] == role for r in done)]
    colors = dict(zip(ROLE_NAMES, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")))

    def save(fig, name: str) -> None:
        path = folder / f"{name}.png"
        tmp = folder / f".{name}.tmp.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        made[name] = f"figures/{name}.png"

    if roles:  # Tr(F) over training: the seeds' median, and a band from their lowest to highest
        experiments = [e for e in ("explosion", "memorization") if any(r["experiment"] == e for r in done)]
        fig, axes = plt.subplots(1, len(experiments), figsize=(6.2 * len(experiments), 4.2), squeeze=False)
        for ax, experiment in zip(axes[0], experiments):
            epochs = next(r for r in done if r["experiment"] == experiment)["result"]["config"]["epochs"]
            for role in roles:
                mine = [r for r in done if r["experiment"] == experiment and r["role"] == role]
                if not mine:
                    continue
                curves = [[(t["epoch"], t["trace"]) for t in r["records"] if t["kind"] == "trace"] for r in mine]
                x = [e for e, _ in curves[0]]
                ys = list(zip(*[[v for _, v in c] for c in curves]))
                lo, mid, hi = ([min(v) for v in ys], [statistics.median(v) for v in ys], [max(v) for v in ys])
                ax.plot(x, mid, color=colors[role], label=f"{mine[0]['label']} ({len(mine)} seeds)")
                ax.fill_between(x, lo, hi, color=colors[role], alpha=0.2, linewidth=0)
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-2))  # a fitted model's Tr(F) falls toward 0
            ax.set_xscale("symlog", linthresh=1.0)  # the first epochs, where the explosion happens, get room
            ax.set_xlim(0, epochs)
            ax.set_xlabel("epoch (linear up to 1, then log)")
            ax.set_ylabel("Tr(F) on the probe set")
            ax.set_title({"explosion": "Tr(F) over training", "memorization": "Tr(F) with noisy labels"}[experiment])
            ax.axvline(claims.EARLY_FRACTION * epochs, color="gray", lw=0.8, ls=":")
            ax.legend(fontsize=8)
        fig.text(0.01, 0.01, "line: median over seeds; band: lowest to highest seed; dotted: end of the early phase; "
                 "values below 0.01 are off the axis",
                 fontsize=7, color="gray")
        save(fig, "trace")

        fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(roles), 4))
        stats = [Stat([r["metrics"]["test_acc"] for r in done if r["role"] == role]) for role in roles]
        ax.bar(range(len(roles)), [s.mean for s in stats], yerr=[s.std for s in stats], capsize=5,
               color=[colors[r] for r in roles])
        for i, role in enumerate(roles):
            values = [r["metrics"]["test_acc"] for r in done if r["role"] == role]
            ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(roles)))
        ax.set_xticklabels([_wrap(next(r["label"] for r in done if r["role"] == role)) for role in roles], fontsize=7)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("final test accuracy")
        ax.set_title("Test accuracy (bar: mean, whisker: std, dots: seeds)", fontsize=9)
        save(fig, "test_accuracy")

    noisy = [r for r in done if r["experiment"] == "memorization"]
    if noisy:
        fig, ax = plt.subplots(figsize=(6.2, 4.2))
        for role in claims.MEMORIZATION:
            mine = [r for r in noisy if r["role"] == role]
            if not mine:
                continue
            for key, style in (("noisy_fit", "--"), ("clean_fit", "-")):
                curves = [[(e["epoch"], e[key]) for e in r["records"] if e["kind"] == "epoch"] for r in mine]
                x = [e for e, _ in curves[0]]
                mean = [sum(v) / len(v) for v in zip(*[[y for _, y in c] for c in curves])]
                ax.plot(x, mean, style, color=colors[role],
                        label=f"{mine[0]['label']}: {'noisy' if key == 'noisy_fit' else 'clean'} examples")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training accuracy on the training labels")
        ax.set_ylim(0, 1)
        ax.set_title("Fitting the clean (solid) and the noisy (dashed) examples; mean over seeds", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "memorization")

    layered = [role for role in ROLE_NAMES if any(r["role"] == role for r in done)]
    if layered:
        fig, axes = plt.subplots(1, len(layered), figsize=(3.6 * len(layered), 3.8), squeeze=False, sharey=True)
        for ax, role in zip(axes[0], layered):
            run = next(r for r in done if r["role"] == role)
            traces = [t for t in run["records"] if t["kind"] == "trace" and t["trace"] > 0]
            groups = _layer_groups(list(traces[0]["layers"]))
            names = list(dict.fromkeys(groups.values()))
            x = [t["epoch"] for t in traces]
            shares = [[sum(v for k, v in t["layers"].items() if groups.get(k) == n) / t["trace"] for t in traces]
                      for n in names]
            ax.stackplot(x, shares, labels=names)
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(0, x[-1])
            ax.set_ylim(0, 1)
            ax.set_xlabel("epoch")
            ax.set_title(f"{run['label']}, seed {run['seed']}", fontsize=8)
        axes[0][0].set_ylabel("share of Tr(F) per layer")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        save(fig, "layers")
    return made


def _layer_groups(layers: list[str], most: int = 10) -> dict[str, str]:
    """Layer -> legend entry: each layer, or for deep models its block (the module path's first
    two parts), so the legend stays readable."""
    if len(layers) <= most:
        return {k: k for k in layers}
    return {k: ".".join(k.split(" ")[0].split(".")[:2]) for k in layers}


def _plural(n: int, word: str) -> str:
    return f"{word}" if n == 1 else f"{n} {word}s"


def _wrap(text: str) -> str:
    return text.replace(" + ", "\n+ ").replace(", ", ",\n")


# ---- markdown -------------------------------------------------------------------------------------


def _markdown(meta: dict, runs: list[dict], summary: dict, figures: dict[str, str]) -> str:
    setup = meta["setup"]
    lines = ["# Catastrophic Fisher explosion: reproduction report", "",
             f"Written by `fisher-ext {meta['command']}` on {meta['date']}; {meta['machine']}; torch {meta['torch']}; "
             f"fisher_ext {meta['fisher_ext']} ({meta['backend']}).", "",
             "## Setup", "",
             f"- Data: {setup['dataset']}"
             + (" (MNIST-1D, 4000 training and 1000 test sequences of length 40, generated locally by the mnist1d "
                "package)" if setup["dataset"] == "mnist1d" else "") + f"; model: {setup['model']}.",
             f"- SGD with momentum {setup['momentum']}, batch {setup['batch']}, constant learning rate, "
             f"{setup['epochs']} epochs; seeds {setup['seeds']} (seed: initialization, data order, label noise, "
             "probe set, label draws).",
             f"- Penalty: `{setup['penalty']}` (alpha {setup['alpha']}, "
             f"{'on every step' if setup['every'] == 1 else 'every ' + str(setup['every']) + 'th step'}, method "
             f"{meta.get('method', setup['method'])}), fisher_ext's own `FisherPenalty`.",
             f"- Tr(F): `FisherTraceMonitor.probe` on {setup['probe']} fixed training examples with labels sampled "
             f"from the model (the Fisher, not the empirical Fisher), every {meta['dense_every']} steps in the first "
             f"{_plural(setup['dense_epochs'], 'epoch')}, then after every epoch; each probe's standard error over "
             "the probe examples is in metrics.jsonl (`se`).",
             "- Each cell: mean ± standard deviation over the seeds that finished; every run's numbers are in "
             "`runs/*/seed*/result.json` and `metrics.jsonl`.", ""]
    status = [r for r in runs if r["status"] != "finished"]
    if status:
        lines += ["**Runs that did not finish:** " + "; ".join(f"{r['label']} seed {r['seed']}: {r['status']}"
                                                                + (f" ({r['result']['diverged_at'].get('reason', '')})"
                                                                   if r["status"] == "diverged" else "")
                                                                for r in status), ""]
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    if verdicts:
        lines += ["## Verdicts", "", "| claim | verdict | evidence |", "|---|---|---|"]
        lines += [f"| {c} | **{v['verdict']}** | {v['evidence']} |" for c, v in sorted(verdicts.items())]
        lines += ["", "Rules (computed from the numbers below):", ""]
        lines += [f"- Claim {c}: reproduced when {v['rule']}." for c, v in sorted(verdicts.items())]
        lines += [""]
    cols = [("test_acc", "final test acc", ".3f"), ("train_acc", "final train acc", ".3f"),
            ("early_peak_trace", "early peak Tr(F)", ".1f"), ("peak_trace", "peak Tr(F)", ".1f"),
            ("final_trace", "final Tr(F)", ".1f")]
    for experiment, title, extra in (
            ("explosion", "Claims 1 and 2: the small learning rate, with and without the penalty", []),
            ("memorization", f"Claim 3: {setup['noise']:.0%} noisy labels", [
                ("noisy_fit", "noisy labels fitted (final)", ".3f"), ("clean_fit", "clean fitted (final)", ".3f"),
                ("noisy_fit_area", "noisy fit, mean over epochs", ".3f"),
                ("clean_fit_area", "clean fit, mean over epochs", ".3f")])):
        roles = summary["experiments"].get(experiment)
        if not roles:
            continue
        table = cols + extra
        lines += [f"## {title}", "", "| configuration | runs | " + " | ".join(c[1] for c in table) + " |",
                  "|---" * (len(table) + 2) + "|"]
        for entry in roles.values():
            finished = sum(s == "finished" for s in entry["status"])
            cells = [_cell(entry["metrics"].get(k), fmt) for k, _, fmt in table]
            lines.append(f"| {entry['label']} | {finished}/{len(entry['status'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _layer_table(runs)
    lines += _cost_table(summary)
    for name, caption in (("trace", "Tr(F) on the probe set over training (log scale)."),
                          ("test_accuracy", "Final test accuracy per configuration."),
                          ("memorization", "Noisy vs clean examples fitted over training."),
                          ("layers", "Each layer's share of Tr(F) over training (one seed).")):
        if name in figures:
            lines += [f"![{caption}]({figures[name]})", "", f"*{caption}*", ""]
    if not figures:
        lines += ["(No figures: matplotlib is not installed; `pip install matplotlib`, then `fisher-ext report`.)", ""]
    return "\n".join(lines)


def _cell(metric: dict | None, fmt: str) -> str:
    if metric is None or not metric["values"]:
        return "n/a"
    return Stat(metric["values"]).text(fmt)


def _layer_table(runs: list[dict]) -> list[str]:
    """Which layer holds Tr(F) at each configuration's early peak (mean share over seeds)."""
    done = [r for r in runs if r["status"] == "finished"]
    if not done:
        return []
    shares: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in done:
        peak = claims.early_peak(r["records"], r["result"]["config"]["epochs"])
        for layer, value in peak["layers"].items():
            shares.setdefault(r["label"], {}).setdefault(layer, []).append((value, value / peak["trace"]))
    layers = list(dict.fromkeys(k for per in shares.values() for k in per))
    if len(layers) > 12:
        return []
    lines = ["## Where Tr(F) sits at the early peak", "",
             "Each layer's part of Tr(F) at the early peak: its value (its share), mean over seeds. A layer "
             "whose value grows most between configurations is the one that explodes.", "",
             "| configuration | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for label, per in shares.items():
        cells = [f"{statistics.fmean(v for v, _ in per[k]):.1f} ({statistics.fmean(f for _, f in per[k]):.0%})"
                 if k in per else "" for k in layers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cost_table(summary: dict) -> list[str]:
    """Wall time per run and the penalty's share of it, from the step times of the same setup."""
    rows = []
    for roles in summary["experiments"].values():
        plain = next((e for r, e in roles.items() if "penalty" not in r), None)
        for role, entry in roles.items():
            m = entry["metrics"]
            if "seconds" not in m:
                continue
            share = ""
            if "penalty" in role and plain is not None and "seconds_per_step" in plain["metrics"]:
                extra = m["seconds_per_step"]["mean"] - plain["metrics"]["seconds_per_step"]["mean"]
                steps_share = extra * m["steps"]["mean"] / m["seconds"]["mean"] if m["seconds"]["mean"] else math.nan
                share = f"{max(steps_share, 0):.0%}"
            per_step = m["seconds_per_step"]["mean"] * 1e3
            rows.append(f"| {entry['label']} | {m['seconds']['mean']:.1f} | {per_step:.2f} | {share} |")
    if not rows:
        return []
    return ["## Cost", "", "Wall time per run (training, Tr(F) probes and evaluation), the training step's time, and "
            "the penalty's share of the run's time: the extra step time over the plain step of the same setup, times "
            "the steps, divided by the run's time.", "",
            "| configuration | s/run | ms/step | penalty's share |", "|---|---|---|---|"] + rows + [""]

