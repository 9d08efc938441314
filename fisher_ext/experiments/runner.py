"""One training run: SGD on a data set, optionally with a Fisher Penalty (or a gradient-penalty
baseline), Tr(F) probed on a fixed subset of training examples, metrics per epoch.

Deterministic per seed on the CPU (one thread): a rerun reproduces every metric but the wall
times. A run checkpoints after every epoch; started again on the same folder it resumes from the
checkpoint and ends exactly where an uninterrupted run ends. Files are written atomically.

Data-parallel (torch.distributed initialized, e.g. by ``torchrun``): every process draws the same
global batches and trains on its part of each, the model wrapped in DistributedDataParallel and
the penalty and monitor on the global batch (with the same labels, the steps of one process, to
float rounding; the labels the penalty and the monitor sample are each process's own draws, so a
run on k processes is another sample of the same run); process 0 writes the files. A last batch
smaller than the number of processes is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fisher_ext

from . import data as datasets
from . import models
from .files import atomic_save, atomic_write_json, atomic_write_text

PENALTIES = ("none", "fp", "gp", "gpr", "gpx")
METHODS = ("auto", "finite_difference", "double_backward")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (``device`` and ``data_dir`` say where, not what)."""

    lr: float
    seed: int = 0
    epochs: int = 40
    dataset: str = "mnist1d"
    model: str = "cnn1d"
    batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    penalty: str = "none"
    alpha: float = 0.0
    every: int = 1
    method: str = "auto"
    noise: float = 0.0
    probe: int = 512
    dense_epochs: int = 2
    dense_every: int = 4
    device: str = "cpu"
    data_dir: Optional[str] = None

    def __post_init__(self):
        checks = [("lr", self.lr > 0 and math.isfinite(self.lr), "a finite number > 0"),
                  ("epochs", self.epochs >= 1, "an int >= 1"), ("batch", self.batch >= 1, "an int >= 1"),
                  ("momentum", 0 <= self.momentum < 1, "a number in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
                  ("penalty", self.penalty in PENALTIES, f"one of {PENALTIES}"),
                  ("alpha", self.alpha >= 0 and math.isfinite(self.alpha), "a finite number >= 0"),
                  ("every", self.every >= 1, "an int >= 1"), ("method", self.method in METHODS, f"one of {METHODS}"),
                  ("noise", 0 <= self.noise < 1, "a fraction in [0, 1)"), ("probe", self.probe >= 1, "an int >= 1"),
                  ("dense_every", self.dense_every >= 1, "an int >= 1")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.dataset not in datasets.DATASETS:
            raise ValueError(f"dataset: expected one of {datasets.DATASETS}, got {self.dataset!r}")
        models.check(self.model, self.dataset)
        if self.penalty == "gpx" and self.method == "finite_difference":
            raise ValueError("method: the 'gpx' penalty is differentiated exactly only; expected 'auto' or "
                             "'double_backward', got 'finite_difference'")

    @property
    def resolved_method(self) -> str | None:
        """The penalty's method: 'auto' is the finite difference (right, with its replay, and
        faster than double backward on this project's benchmarks), exact for 'gpx'."""
        if self.penalty == "none":
            return None
        if self.method != "auto":
            return self.method
        return "double_backward" if self.penalty == "gpx" else "finite_difference"

    def identity(self) -> dict:
        """The fields that decide the run's numbers."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "data_dir")}

    def label(self) -> str:
        """A short readable name, e.g. 'lr=0.01 + fp(a=0.1)'."""
        text = f"lr={self.lr:g}"
        if self.penalty != "none":
            method = {"auto": "", "finite_difference": ", fd", "double_backward": ", exact"}[self.method]
            text += f" + {self.penalty}(a={self.alpha:g}{f', k={self.every}' if self.every > 1 else ''}{method})"
        return text + (f", {self.noise:.0%} noisy labels" if self.noise else "")

    def slug(self) -> str:
        """A folder name for the configuration (all seeds)."""
        text = f"{self.dataset}-{self.model}-lr{self.lr:g}"
        if self.penalty != "none":
            text += f"-{self.penalty}{self.alpha:g}" + (f"-k{self.every}" if self.every > 1 else "")
            text += {"auto": "", "finite_difference": "-fd", "double_backward": "-exact"}[self.method]
        return text + (f"-noise{self.noise:g}" if self.noise else "")


class Diverged(Exception):
    pass


def run(config: RunConfig, folder: Path, progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``config`` in ``folder`` (created; resumed from its checkpoint if there is one) and
    return the run's result (also written to ``folder/result.json``). ``progress(epoch, line)``
    is called after every epoch."""
    folder = Path(folder)
    if _rank() > 0:  # process 0 prepares the folder; the others read it
        dist.barrier()
        return _Trainer(config, folder, None).train() if not (folder / "result.json").exists() \
            else json.loads((folder / "result.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "result.json"
    config_file = folder / "config.json"
    for stale in folder.glob(".*.tmp"):  # a write cut short by a killed process
        stale.unlink()
    started = done.exists() or (folder / "checkpoint.pt").exists()
    if started and config_file.exists():
        saved = json.loads(config_file.read_text())
        if saved != config.identity():
            raise ValueError(f"{folder} holds a run with another configuration ({_diff(saved, config.identity())}); "
                             "use another --out folder, or delete that one")
    elif not started:  # nothing trained here yet (or a start that failed): this configuration's folder now
        atomic_write_json(config_file, config.identity())
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if done.exists():
        return json.loads(done.read_text())
    return _Trainer(config, folder, progress).train()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


class _Trainer:
    def __init__(self, config: RunConfig, folder: Path, progress):
        self.config, self.folder, self.progress = config, folder, progress
        c = config
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() \
            and dist.is_initialized() else (0, 1)
        self.device = torch.device(c.device)
        if self.world > 1 and self.device.type == "cuda":  # one GPU per process, as torchrun numbers them
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        data = datasets.load(c.dataset, c.data_dir)
        self.classes = data.classes
        y_train, self.noisy = datasets.noisy_labels(data.y, c.noise, data.classes, c.seed)
        data = dataclasses.replace(data, y=y_train).to(self.device)
        self.noisy = self.noisy.to(self.device)
        self.data = data
        n = data.x.shape[0]
        picked = torch.randperm(n, generator=torch.Generator().manual_seed(7919 * c.seed + 3))[:min(c.probe, n)]
        self.probe_x = data.x[picked.to(self.device)]
        self.steps_per_epoch = math.ceil(n / c.batch)

        torch.manual_seed(c.seed)
        self.model = models.build(c.model, c.dataset, data.classes).to(self.device)
        self.layer_names = {k: f"{k} ({type(m).__name__})" for k, m in self.model.named_modules()}
        self.opt = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        self.trained = self.model  # what the training steps call: under data parallelism the DDP wrapper
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.trained = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        self.order = torch.Generator().manual_seed(c.seed)
        self.monitor = fisher_ext.FisherTraceMonitor(
            self.trained, generator=torch.Generator(self.device).manual_seed(104_729 * c.seed + 1 + 7_919 * self.rank))
        self.penalty = None
        if c.penalty != "none":
            build = {"fp": fisher_ext.FisherPenalty, "gp": fisher_ext.FisherPenalty.gp,
                     "gpr": fisher_ext.FisherPenalty.gpr, "gpx": fisher_ext.FisherPenalty.gpx}[c.penalty]
            self.penalty = build(self.trained, c.alpha, method=c.resolved_method, every=c.every, report_trace=False,
                                 generator=torch.Generator(self.device).manual_seed(104_729 * c.seed + 2
                                                                                    + 7_919 * self.rank))
        self.epoch, self.step = 0, 0
        self.records: list[dict] = []
        self.times = {"steps": 0.0, "probe": 0.0, "eval": 0.0}
        self.checks: list[float] = []
        self.fallbacks = 0
        self.status = "running"
        self._load()

    # ---- checkpoint -------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "order": self.order.get_state(),
                "monitor": self.monitor.state_dict(),
                "penalty": self.penalty.state_dict() if self.penalty is not None else None,
                "records": self.records, "times": self.times, "checks": self.checks, "fallbacks": self.fallbacks}

    def _load(self) -> None:
        path = self.folder / "checkpoint.pt"
        if not path.exists():
            return
        s = torch.load(path, map_location=self.device, weights_only=False)
        self.epoch, self.step = s["epoch"], s["step"]
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.order.set_state(s["order"])
        self.monitor.load_state_dict(s["monitor"])
        if self.penalty is not None:
            self.penalty.load_state_dict(s["penalty"])
        self.records, self.times, self.checks, self.fallbacks = s["records"], s["times"], s["checks"], s["fallbacks"]

    def _save(self) -> None:
        if self.rank > 0:
            return
        atomic_save(self._state(), self.folder / "checkpoint.pt")
        atomic_write_text(self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))

    # ---- training ---------------------------------------------------------------------------------

    def train(self) -> dict:
        c = self.config
        if self.epoch == 0 and not self.records:
            self._probe()
        try:
            while self.epoch < c.epochs:
                self._train_epoch()
                self.epoch += 1
                self._probe()
                line = self._evaluate()
                self._save()
                if self.progress is not None:
                    self.progress(self.epoch, line)
            self.status = "finished"
        except Diverged as e:
            self.status = "diverged"
            self.records.append({"kind": "diverged", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                                 "reason": str(e)})
            if self.rank == 0:
                atomic_write_text(self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        result = self._result()
        if self.rank == 0:
            atomic_write_json(self.folder / "result.json", result)
            (self.folder / "checkpoint.pt").unlink(missing_ok=True)
        return result

    def _train_epoch(self) -> None:
        c, d = self.config, self.data
        order = torch.randperm(d.x.shape[0], generator=self.order).to(self.device)
        dense_until = c.dense_epochs * self.steps_per_epoch
        for i in range(0, len(order), c.batch):
            probed = self.records and self.records[-1].get("step") == self.step  # at an epoch's end
            if 0 < self.step < dense_until and self.step % c.dense_every == 0 and not probed:
                self._probe()
            idx = order[i:i + c.batch]
            if len(idx) < self.world:  # every process needs an example
                continue
            if self.world > 1:  # this process's part; its loss is its share of the global batch's mean
                size = len(idx)
                idx = idx.tensor_split(self.world)[self.rank]
                x, y = d.x[idx], d.y[idx]
                loss_fn = lambda out: F.cross_entropy(out, y, reduction="sum") * (self.world / size)  # noqa: E731
            else:
                x, y = d.x[idx], d.y[idx]
                loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
            start = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if self.penalty is None:
                        loss = loss_fn(self.trained(x))
                        if self._any(not bool(torch.isfinite(loss))):
                            raise FloatingPointError(f"step {self.step + 1}: the training loss is {float(loss)}")
                        loss.backward()
                    else:
                        labels = y if c.penalty in ("gp", "gpx") else None
                        loss, result = self.penalty.backward(x, loss_fn, labels)
                        if result is not None and result.check is not None:
                            self.checks.append(result.check.relative_error)
                self.fallbacks += sum("finite-difference" in str(w.message) for w in caught)
                for w in caught:
                    if "finite-difference" not in str(w.message):
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            except FloatingPointError as e:
                raise Diverged(str(e)) from e
            self.opt.step()
            self.step += 1
            self.times["steps"] += time.perf_counter() - start

    def _any(self, flag: bool) -> bool:
        """``flag`` on any process (all of them stop together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def _probe(self) -> None:
        """Tr(F) on the probe set (the model's own sampled labels), with its per-layer split."""
        start = time.perf_counter()
        chunk = len(self.probe_x) if self.config.dataset == "mnist1d" else 128  # image models: bounded memory
        r = self.monitor.probe(self.probe_x, chunk_size=chunk, progress=False)
        self.times["probe"] += time.perf_counter() - start
        if not math.isfinite(r.trace):
            raise Diverged(f"step {self.step}: Tr(F) is {r.trace}")
        layers: dict[str, float] = {}
        for name, value in r.per_parameter.items():
            layer = self.layer_names[name.rsplit(".", 1)[0]]
            layers[layer] = layers.get(layer, 0.0) + value
        self.records.append({"kind": "trace", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                             "trace": r.trace, "se": r.standard_error, "layers": layers})

    def _evaluate(self) -> dict:
        start = time.perf_counter()
        d = self.data
        train = _scores(self.model, d.x, d.y)
        test = _scores(self.model, d.x_test, d.y_test)
        line = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "train_loss": train["loss"].mean().item(),
                "train_acc": train["correct"].mean().item(), "test_loss": test["loss"].mean().item(),
                "test_acc": test["correct"].mean().item(), "trace": self.records[-1]["trace"],
                "seconds": dict(self.times)}
        if self.config.noise:
            line["noisy_fit"] = train["correct"][self.noisy].mean().item()
            line["clean_fit"] = train["correct"][~self.noisy].mean().item()
        if not math.isfinite(line["train_loss"]):
            raise Diverged(f"epoch {self.epoch}: the training loss is {line['train_loss']}")
        self.times["eval"] += time.perf_counter() - start
        self.records.append(line)
        return line

    def _result(self) -> dict:
        traces = [r for r in self.records if r["kind"] == "trace"]
        epochs = [r for r in self.records if r["kind"] == "epoch"]
        last = epochs[-1] if epochs else {}
        out = {"config": self.config.identity(), "label": self.config.label(), "status": self.status,
               "epochs_done": self.epoch, "steps": self.step, "seconds": dict(self.times),
               "seconds_per_step": self.times["steps"] / max(self.step, 1),
               "fd_checks": self.checks, "fd_fallbacks": self.fallbacks}
        if self.status == "finished":
            out.update({k: last[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "noisy_fit",
                                                "clean_fit") if k in last})
            peak = max(traces, key=lambda r: r["trace"])
            out.update({"peak_trace": peak["trace"], "peak_epoch": peak["epoch"], "final_trace": traces[-1]["trace"],
                        "best_test_acc": max(e["test_acc"] for e in epochs)})
        else:
            out["diverged_at"] = self.records[-1]
        return out


def _scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> dict[str, torch.Tensor]:
    """Per-example loss and correctness, in eval mode without gradients."""
    was = model.training
    model.eval()
    losses, correct = [], []
    with torch.no_grad():
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            out = model(xs)
            losses.append(F.cross_entropy(out, ys, reduction="none"))
            correct.append((out.argmax(1) == ys).float())
    model.train(was)
    return {"loss": torch.cat(losses), "correct": torch.cat(correct)}
