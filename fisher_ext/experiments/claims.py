"""The paper's three claims as sets of runs, and the rules that judge them from the numbers.

1. A learning rate 10x smaller than the best one ends with worse test accuracy, and its Tr(F)
   rises much higher early in training.
2. The Fisher Penalty at the small learning rate keeps Tr(F) near the large learning rate's level
   and recovers much of the lost test accuracy.
3. With noisy labels the Fisher Penalty slows the fitting of the noisy examples far more than
   that of the clean ones (less memorization, better test accuracy).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from .runner import RunConfig

# Roles of the runs, per experiment.
EXPLOSION = {"best": "best learning rate", "small": "10x smaller learning rate",
             "small+penalty": "10x smaller learning rate + penalty"}
MEMORIZATION = {"noisy": "noisy labels", "noisy+penalty": "noisy labels + penalty"}

# The verdict rules' thresholds (stated in the report with the numbers).
EARLY_FRACTION = 1 / 3      # "early in training": the first third of the epochs
TRACE_RATIO = 2.0           # "much higher" / "lowers": at least 2x
ACC_POINTS = 0.01           # "worse test accuracy": at least 1 point, and beyond 2 standard errors
RECOVERED = 0.5             # "recovers much of the lost accuracy": at least half of the gap
NEAR = 2.0                  # "near the large learning rate's level": within 2x of its early peak
SLOWED = 2.0                # "far more": the noisy examples' fit reduced at least 2x as much as the clean ones'


@dataclass
class Setup:
    """The shared settings of an experiment (what the command line chooses)."""

    dataset: str = "mnist1d"
    model: str = "cnn1d"
    epochs: int = 150
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    best_lr: float = 0.1
    small_lr: float | None = None  # default: best_lr / 10
    penalty: str = "fp"
    alpha: float = 1.0
    every: int = 10
    method: str = "auto"
    noise: float = 0.2
    noise_lr: float | None = None  # the noisy-label runs' learning rate; default: the small one
    batch: int = 128
    momentum: float = 0.9
    probe: int = 512
    dense_epochs: int = 2
    device: str = "cpu"
    data_dir: str | None = None

    @property
    def small(self) -> float:
        return self.small_lr if self.small_lr is not None else self.best_lr / 10

    def base(self, lr: float, seed: int, **changes) -> RunConfig:
        return RunConfig(lr=lr, seed=seed, epochs=self.epochs, dataset=self.dataset, model=self.model,
                         batch=self.batch, momentum=self.momentum, method=self.method, every=self.every,
                         probe=self.probe, dense_epochs=self.dense_epochs, device=self.device,
                         data_dir=self.data_dir, **changes)


def plan(setup: Setup, experiments: tuple[str, ...]) -> list[tuple[str, str, RunConfig]]:
    """(experiment, role, config) for every run of the chosen experiments, seeds innermost."""
    runs = []
    penalized = {"penalty": setup.penalty, "alpha": setup.alpha}
    if "explosion" in experiments:
        for role, lr, extra in (("best", setup.best_lr, {}), ("small", setup.small, {}),
                                ("small+penalty", setup.small, penalized)):
            runs += [("explosion", role, setup.base(lr, s, **extra)) for s in setup.seeds]
    if "memorization" in experiments:
        lr = setup.noise_lr if setup.noise_lr is not None else setup.small
        for role, extra in (("noisy", {}), ("noisy+penalty", penalized)):
            runs += [("memorization", role, setup.base(lr, s, noise=setup.noise, **extra)) for s in setup.seeds]
    return runs


# ---- aggregation ----------------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean and standard deviation over the finished seeds of one configuration."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n else math.nan

    def text(self, fmt: str = ".3f") -> str:
        if not self.values:
            return "n/a"
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}" if self.n > 1 else f"{self.mean:{fmt}}"


def early_peak(records: list[dict], epochs: int) -> dict:
    """The probe record with the highest Tr(F) in the first ``EARLY_FRACTION`` of the epochs, the
    initialization (step 0) left out: the claim is about how far training raises it."""
    cut = EARLY_FRACTION * epochs
    early = [r for r in records if r["kind"] == "trace" and 0 < r["step"] and r["epoch"] <= cut + 1e-9]
    return max(early, key=lambda r: r["trace"])


def fit_area(records: list[dict], key: str) -> float:
    """A fit curve's mean over the epochs (its area): lower means fitted later, or less."""
    values = [r[key] for r in records if r["kind"] == "epoch"]
    return statistics.fmean(values)


def run_metrics(result: dict, records: list[dict]) -> dict:
    """The numbers one finished run contributes to the tables."""
    epochs = result["config"]["epochs"]
    out = {"test_acc": result["test_acc"], "train_acc": result["train_acc"], "peak_trace": result["peak_trace"],
           "early_peak_trace": early_peak(records, epochs)["trace"], "final_trace": result["final_trace"],
           "seconds": sum(result["seconds"].values()), "seconds_per_step": result["seconds_per_step"],
           "steps": result["steps"]}
    if "noisy_fit" in result:
        out.update({"noisy_fit": result["noisy_fit"], "clean_fit": result["clean_fit"],
                    "noisy_fit_area": fit_area(records, "noisy_fit"), "clean_fit_area": fit_area(records, "clean_fit")})
    return out


def aggregate(runs: list[dict]) -> dict[str, Stat]:
    """{metric: Stat} over the finished runs of one role."""
    finished = [r["metrics"] for r in runs if r["status"] == "finished"]
    keys = finished[0].keys() if finished else ()
    return {k: Stat([m[k] for m in finished]) for k in keys}


def _below(a: Stat, b: Stat, points: float) -> bool:
    """a's mean below b's by at least ``points`` and by more than two standard errors of the difference."""
    gap = b.mean - a.mean
    return gap >= points and gap > 2 * math.sqrt(a.sem ** 2 + b.sem ** 2)


@dataclass
class Verdict:
    claim: str
    holds: bool | None  # None: cannot be judged (runs missing or diverged)
    rule: str
    evidence: str

    @property
    def word(self) -> str:
        return {True: "REPRODUCED", False: "NOT REPRODUCED", None: "NOT JUDGED"}[self.holds]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": self.word}


def _missing(stats: dict[str, dict[str, Stat]], roles) -> str | None:
    absent = [r for r in roles if not stats.get(r) or stats[r]["test_acc"].n == 0]
    return f"no finished run for: {', '.join(absent)}" if absent else None


def judge_explosion(stats: dict[str, dict[str, Stat]]) -> list[Verdict]:
    best, small, pen = (stats.get(k, {}) for k in ("best", "small", "small+penalty"))
    rule1 = (f"the small learning rate's mean final test accuracy is at least {ACC_POINTS * 100:.0f} point below the "
             f"best one's, by more than 2 standard errors, and its mean early peak Tr(F) (the highest after "
             f"initialization in the first {EARLY_FRACTION:.0%} of the epochs) is at least {TRACE_RATIO:g}x the best "
             "one's")
    rule2 = (f"the penalty lowers the small learning rate's mean early peak Tr(F) at least {TRACE_RATIO:g}x, to within "
             f"{NEAR:g}x of the best learning rate's, and recovers at least {RECOVERED:.0%} of the test-accuracy gap")
    out = []
    missing = _missing(stats, ("best", "small"))
    if missing:
        out.append(Verdict("1", None, rule1, missing))
    else:
        ratio = small["early_peak_trace"].mean / best["early_peak_trace"].mean
        gap = best["test_acc"].mean - small["test_acc"].mean
        holds = _below(small["test_acc"], best["test_acc"], ACC_POINTS) and ratio >= TRACE_RATIO
        out.append(Verdict("1", holds, rule1, f"test accuracy {small['test_acc'].text()} vs {best['test_acc'].text()} "
                           f"(gap {gap * 100:.1f} points); early peak Tr(F) {small['early_peak_trace'].text('.1f')} vs "
                           f"{best['early_peak_trace'].text('.1f')} ({ratio:.2f}x)"))
    missing = _missing(stats, ("best", "small", "small+penalty"))
    if missing:
        out.append(Verdict("2", None, rule2, missing))
    else:
        lowered = small["early_peak_trace"].mean / pen["early_peak_trace"].mean
        near = pen["early_peak_trace"].mean / best["early_peak_trace"].mean
        gap = best["test_acc"].mean - small["test_acc"].mean
        recovered = (pen["test_acc"].mean - small["test_acc"].mean) / gap if gap > 0 else math.nan
        holds = lowered >= TRACE_RATIO and near <= NEAR and recovered >= RECOVERED
        out.append(Verdict("2", bool(holds), rule2,
                           f"early peak Tr(F) {small['early_peak_trace'].text('.1f')} without the penalty, "
                           f"{pen['early_peak_trace'].text('.1f')} with it ({lowered:.2f}x lower; "
                           f"{near:.2f}x the best learning rate's); test accuracy {pen['test_acc'].text()} with it, "
                           f"{recovered:.0%} of the gap recovered" if gap > 0 else
                           "the small learning rate lost no test accuracy, so there is no gap to recover"))
    return out


def _change(drop: float) -> str:
    return f"{abs(drop):.0%} {'lower' if drop >= 0 else 'higher'}"


def judge_memorization(stats: dict[str, dict[str, Stat]]) -> list[Verdict]:
    plain, pen = stats.get("noisy", {}), stats.get("noisy+penalty", {})
    rule = (f"with the penalty, the noisy examples' fit (training accuracy on their wrong labels, averaged over the "
            f"epochs) drops by a fraction at least {SLOWED:g}x that of the clean examples' fit, and the mean final "
            f"test accuracy is higher by more than 2 standard errors")
    missing = _missing(stats, ("noisy", "noisy+penalty"))
    if missing:
        return [Verdict("3", None, rule, missing)]
    drop = {k: 1 - pen[f"{k}_fit_area"].mean / plain[f"{k}_fit_area"].mean for k in ("noisy", "clean")}
    slowed = drop["noisy"] >= SLOWED * max(drop["clean"], 0.0) and drop["noisy"] > 0
    better = _below(plain["test_acc"], pen["test_acc"], 0.0)
    return [Verdict("3", bool(slowed and better), rule,
                    f"noisy examples' fit {plain['noisy_fit_area'].text()} -> {pen['noisy_fit_area'].text()} "
                    f"({_change(drop['noisy'])}), clean examples' {plain['clean_fit_area'].text()} -> "
                    f"{pen['clean_fit_area'].text()} ({_change(drop['clean'])}); final noisy labels fitted "
                    f"{plain['noisy_fit'].text()} -> {pen['noisy_fit'].text()}; test accuracy "
                    f"{plain['test_acc'].text()} -> {pen['test_acc'].text()}")]
