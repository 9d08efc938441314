"""Runs many training runs in parallel processes (each single-threaded) with a progress line.

Finished runs are skipped, interrupted ones resume from their checkpoint; Ctrl-C stops the
workers and leaves the folder resumable.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers
import queue
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import runner
from .runner import RunConfig


@dataclass
class Task:
    config: RunConfig
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.config.label()} seed {self.config.seed}"

    @property
    def cost(self) -> float:
        """Relative cost per epoch: a penalized step costs about 2.5 plain ones (measured on the
        default model), a plain step in between."""
        return 1.0 if self.config.penalty == "none" else 1.0 + 1.5 / self.config.every


def _ignore_sigint() -> None:
    """Workers and the event queue's server leave Ctrl-C to the parent, which stops them: a worker
    interrupted inside a queue operation could leave its lock held and hang the shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _work(index: int, task: Task, events) -> tuple[int, dict | None, str | None]:
    torch.set_num_threads(1)
    try:
        def progress(epoch: int, line: dict) -> None:
            events.put(("epoch", index, epoch, None))
        events.put(("start", index, _epochs_done(task), None))
        return index, runner.run(task.config, task.folder, progress), None
    except KeyboardInterrupt:
        return index, None, "interrupted"
    except Exception:
        return index, None, traceback.format_exc()


def _epochs_done(task: Task) -> int:
    """Epochs a resumed run already has (from its checkpoint's metrics)."""
    path = task.folder / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"kind": "epoch"' in line for line in path.read_text().splitlines())


class Progress:
    """One status line: runs done, the running ones' epochs, elapsed time and an ETA weighted by
    each run's expected cost. On a terminal it redraws in place; otherwise it prints a line per
    finished run and at most one status line every 20 seconds."""

    def __init__(self, tasks: list[Task], stream=sys.stderr):
        self.tasks, self.stream = tasks, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.epochs = {i: 0 for i in range(len(tasks))}
        self.first = {i: 0 for i in range(len(tasks))}
        self.running: set[int] = set()
        self.done = 0
        self.start = time.monotonic()
        self.last_print = 0.0

    def _work(self, i: int, epochs: int) -> float:
        return epochs * self.tasks[i].cost

    def fraction(self) -> float:
        """The share of all the work (epochs weighted by cost) that is done."""
        total = sum(self._work(i, t.config.epochs) for i, t in enumerate(self.tasks))
        return sum(self._work(i, e) for i, e in self.epochs.items()) / total if total else 1.0

    def eta(self) -> float | None:
        done = sum(self._work(i, self.epochs[i] - self.first[i]) for i in self.epochs)
        left = sum(self._work(i, t.config.epochs - self.epochs[i]) for i, t in enumerate(self.tasks))
        elapsed = time.monotonic() - self.start
        return left * elapsed / done if done > 0 else None

    def line(self) -> str:
        filled = int(20 * self.fraction())
        running = ", ".join(f"{self.tasks[i].name} epoch {self.epochs[i]}/{self.tasks[i].config.epochs}"
                            for i in sorted(self.running))
        eta = self.eta()
        return (f"[{'#' * filled}{'.' * (20 - filled)}] runs {self.done}/{len(self.tasks)} done"
                + (f" | {running}" if running else "") + f" | {_clock(time.monotonic() - self.start)} elapsed"
                + (f", ETA {_clock(eta)}" if eta is not None else ""))

    def event(self, kind: str, i: int, epoch: int | None = None, text: str | None = None) -> None:
        if kind == "start":
            self.running.add(i)
            self.epochs[i] = self.first[i] = epoch or 0
        elif kind == "epoch":
            self.epochs[i] = epoch
        elif kind == "done":
            self.running.discard(i)
            self.done += 1
            self.epochs[i] = self.tasks[i].config.epochs
            self._print(f"{self.tasks[i].name}: {text}")
        self.redraw()

    def redraw(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line()[:shutil.get_terminal_size().columns - 1])
            self.stream.flush()
        elif time.monotonic() - self.last_print >= 20:
            self._print(self.line())

    def _print(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self.last_print = time.monotonic()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _summary(result: dict) -> str:
    if result["status"] != "finished":
        return f"DIVERGED ({result['diverged_at'].get('reason', '')})"
    text = f"test acc {result['test_acc']:.3f}, peak Tr(F) {result['peak_trace']:.1f}"
    if "noisy_fit" in result:
        text += f", noisy labels fitted {result['noisy_fit']:.2f}"
    return text + f" ({sum(result['seconds'].values()):.0f} s)"


class RunFailed(RuntimeError):
    pass


def execute(tasks: list[Task], jobs: int, stream=sys.stderr) -> list[dict]:
    """Run every task (``jobs`` processes; 1 runs them in this process) and return their
    results in order. Raises :class:`RunFailed` naming the runs that failed with an error (a
    diverged run is a result, not a failure)."""
    results: list[dict | None] = [None] * len(tasks)
    errors: dict[int, str] = {}
    pending = []
    progress = Progress(tasks, stream)
    for i, t in enumerate(tasks):
        if (t.folder / "result.json").exists():
            results[i] = runner.run(t.config, t.folder)  # checks the saved configuration
            progress.done += 1
            progress.epochs[i] = progress.first[i] = t.config.epochs
        else:
            pending.append(i)
    if len(pending) < len(tasks):
        done = len(tasks) - len(pending)
        stream.write(f"{done} of {len(tasks)} runs already finished in this folder; skipping them\n")
    resumed = [i for i in pending if (tasks[i].folder / "checkpoint.pt").exists()]
    if resumed:
        stream.write(f"resuming {len(resumed)} interrupted run(s) from their last finished epoch: "
                     + "; ".join(f"{tasks[i].name} from epoch {_epochs_done(tasks[i])}" for i in resumed) + "\n")
    if not pending:
        return results
    try:
        if jobs <= 1 or len(pending) == 1:
            _serial(tasks, pending, progress, results, errors)
        else:
            _parallel(tasks, pending, min(jobs, len(pending)), progress, results, errors)
    except KeyboardInterrupt:
        progress.close()
        stream.write("\ninterrupted: finished epochs are checkpointed; rerun the same command to resume\n")
        raise
    progress.close()
    if errors:
        raise RunFailed("\n".join(f"run {tasks[i].name} ({tasks[i].folder}) failed:\n{e}" for i, e in errors.items()))
    return results


class _Direct:
    def __init__(self, progress: Progress):
        self.progress = progress

    def put(self, event) -> None:
        self.progress.event(*event)


def _serial(tasks, pending, progress, results, errors) -> None:
    events = _Direct(progress)
    for i in pending:
        _, result, error = _work(i, tasks[i], events)
        if error == "interrupted":
            raise KeyboardInterrupt
        _finish(i, result, error, progress, results, errors)


def _parallel(tasks, pending, jobs, progress, results, errors) -> None:
    ctx = multiprocessing.get_context("spawn")
    manager = multiprocessing.managers.SyncManager(ctx=ctx)
    manager.start(_ignore_sigint)
    try:
        events = manager.Queue()
        pool = ctx.Pool(jobs, initializer=_ignore_sigint)
        try:
            # the costliest first, so the last runs to finish are short ones (less idle time at the end)
            order = sorted(pending, key=lambda i: -tasks[i].cost * (tasks[i].config.epochs - progress.epochs[i]))
            futures = [pool.apply_async(_work, (i, tasks[i], events)) for i in order]
            waiting = set(range(len(futures)))
            while waiting:
                try:  # wait for an event, then take the ones queued behind it, then look at the runs
                    progress.event(*events.get(timeout=0.5))
                    while True:
                        progress.event(*events.get_nowait())
                except queue.Empty:
                    pass
                for k in list(waiting):
                    if futures[k].ready():
                        waiting.discard(k)
                        i, result, error = futures[k].get()
                        while not events.empty():
                            progress.event(*events.get())
                        _finish(i, result, error, progress, results, errors)
                progress.redraw()
            pool.close()
            pool.join()
        except BaseException:
            pool.terminate()  # no join: the workers are killed, their last checkpoints are complete files
            raise
    finally:
        manager.shutdown()


def _finish(i, result, error, progress, results, errors) -> None:
    if error is not None:
        errors[i] = error
        progress.event("done", i, text="FAILED")
    else:
        results[i] = result
        progress.event("done", i, text=_summary(result))
