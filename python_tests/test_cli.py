"""The ``fisher-ext`` command line, run as a user runs it (``python -m fisher_ext``), each
subcommand with --quick: files written, the report's numbers equal to the runs' own files, a
verdict per claim, finished runs skipped on a rerun, clear errors."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mnist1d", reason="the experiments' data set needs the mnist1d package (scripts/install.sh)")

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "fisher_ext", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"fisher-ext {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("reproduce")
    return cwd / "fisher-ext-results" / "reproduce-quick", cli("reproduce", "--quick", "--jobs", "2", cwd=cwd)


def _runs(out: Path) -> list[dict]:
    plan = json.loads((out / "config.json").read_text())["plan"]
    for entry in plan:
        folder = out / entry["folder"]
        entry["result"] = json.loads((folder / "result.json").read_text())
        entry["records"] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return plan


def test_reproduce_quick_writes_the_whole_results_folder(reproduced):
    out, done = reproduced
    for name in ("config.json", "summary.json", "report.md", "figures/trace.png", "figures/test_accuracy.png",
                 "figures/memorization.png", "figures/layers.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())
    assert meta["torch"] and meta["fisher_ext"] and "extension" in meta["build_info"]
    runs = _runs(out)
    assert len(runs) == 10 and {r["role"] for r in runs} == {"best", "small", "small+penalty", "noisy",
                                                             "noisy+penalty"}
    for r in runs:
        assert r["result"]["status"] == "finished" and r["result"]["epochs_done"] == 12
        traces = [t for t in r["records"] if t["kind"] == "trace"]
        assert traces[0]["step"] == 0 and len(traces) > 12  # dense in the first epoch, then every epoch
        assert abs(sum(traces[-1]["layers"].values()) - traces[-1]["trace"]) < 1e-3 * traces[-1]["trace"]
    assert "report:" in done.stdout


def test_the_reports_numbers_are_the_runs_numbers(reproduced):
    out, _ = reproduced
    summary = json.loads((out / "summary.json").read_text())
    runs = _runs(out)
    report = (out / "report.md").read_text()
    for r in runs:
        table = summary["experiments"][r["experiment"]][r["role"]]["metrics"]
        seeds = [x for x in runs if x["role"] == r["role"]]
        acc = [x["result"]["test_acc"] for x in seeds]
        assert table["test_acc"]["values"] == acc
        assert table["test_acc"]["mean"] == pytest.approx(statistics.fmean(acc))
        epochs = r["result"]["config"]["epochs"]
        early = [max(t["trace"] for t in x["records"]
                     if t["kind"] == "trace" and t["step"] > 0 and t["epoch"] <= epochs / 3 + 1e-9)
                 for x in seeds]
        assert table["early_peak_trace"]["values"] == pytest.approx(early)
        last = [t for t in r["records"] if t["kind"] == "epoch"][-1]
        assert r["result"]["test_acc"] == last["test_acc"]
        cell = f"{statistics.fmean(acc):.3f} ± {statistics.stdev(acc):.3f}"
        assert cell in report, cell
    noisy = [r for r in runs if r["role"] == "noisy"][0]
    fit = [e["noisy_fit"] for e in noisy["records"] if e["kind"] == "epoch"]
    assert summary["experiments"]["memorization"]["noisy"]["metrics"]["noisy_fit_area"]["values"][0] == \
        pytest.approx(statistics.fmean(fit))


def test_each_claim_gets_a_verdict_with_its_rule(reproduced):
    out, done = reproduced
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert sorted(verdicts) == ["1", "2", "3"]
    report = (out / "report.md").read_text()
    for claim, v in verdicts.items():
        assert v["verdict"] in ("REPRODUCED", "NOT REPRODUCED")
        assert f"| {claim} | **{v['verdict']}** |" in report
        assert f"Claim {claim}: reproduced when" in report
        assert f"claim {claim}: {v['verdict']}" in done.stdout


def test_a_rerun_skips_finished_runs_and_report_rerenders_identically(reproduced, tmp_path):
    out, _ = reproduced
    before = (out / "summary.json").read_text()
    again = cli("reproduce", "--quick", "--jobs", "2", cwd=out.parent.parent)
    assert "10 of 10 runs already finished" in again.stderr
    (out / "summary.json").unlink()
    (out / "report.md").unlink()
    cli("report", str(out), cwd=tmp_path)
    assert (out / "summary.json").read_text() == before
    assert (out / "report.md").is_file()


def test_ctrl_c_leaves_a_folder_that_resumes_to_the_uninterrupted_result(tmp_path):
    """Ctrl-C reaches the whole process group (the parent and its pool workers) mid-run."""
    import signal
    import time

    args = ["explosion", "--quick", "--seeds", "0", "--epochs", "25", "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell inherits it ignored, and so would the command under test.
    proc = subprocess.Popen([sys.executable, "-m", "fisher_ext", *args, "--out", "cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cut").glob("runs/*fp*/seed0/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = cli(*args, "--out", "cut", cwd=tmp_path)
    assert "already finished" in resumed.stderr or "runs" in resumed.stderr
    cli(*args, "--out", "whole", cwd=tmp_path)
    for folder in (tmp_path / "whole").glob("runs/*/seed0"):
        twin = tmp_path / "cut" / folder.relative_to(tmp_path / "whole")
        strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                              for line in path.read_text().splitlines()]
        assert strip(twin / "metrics.jsonl") == strip(folder / "metrics.jsonl"), folder.name


def test_diverged_runs_are_reported_as_diverged_and_leave_claims_unjudged(tmp_path):
    done = cli("explosion", "--quick", "--epochs", "2", "--seeds", "0", "--jobs", "1", "--lr", "1e6", "--small-lr",
               "1e5", "--out", "d", cwd=tmp_path)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert [v["verdict"] for v in summary["verdicts"]] == ["NOT JUDGED", "NOT JUDGED"]
    assert "no finished run for: best" in summary["verdicts"][0]["evidence"]
    report = (tmp_path / "d" / "report.md").read_text()
    assert "Runs that did not finish:** lr=1e+06 seed 0: diverged" in report
    assert "| lr=1e+06 | 0/1 | n/a |" in report
    assert "DIVERGED" in done.stderr


def test_train_on_cifar_pickles_from_data_dir(tmp_path):
    from test_experiments import _fake_cifar

    _fake_cifar(tmp_path / "data", "cifar10", per_file=8)
    done = cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "simplecnn", "--lr",
               "0.01", "--epochs", "2", "--probe", "16", "--batch", "16", "--penalty", "fp", "--every", "1",
               "--seeds", "0", cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "done: test acc" in done.stdout


def test_explosion_and_memorization_alone(tmp_path):
    cli("explosion", "--quick", "--epochs", "2", "--seeds", "0", "--jobs", "1", "--out", "e", cwd=tmp_path)
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert list(summary["experiments"]) == ["explosion"] and [v["claim"] for v in summary["verdicts"]] == ["1", "2"]
    cli("memorization", "--quick", "--epochs", "2", "--seeds", "0", "--jobs", "1", "--penalty", "gpr",
        "--noise", "0.3", "--out", "m", cwd=tmp_path)
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [v["claim"] for v in summary["verdicts"]] == ["3"]
    labels = [e["label"] for e in summary["experiments"]["memorization"].values()]
    assert labels == ["lr=0.01, 30% noisy labels", "lr=0.01 + gpr(a=1, k=10), 30% noisy labels"]


def test_train_prints_a_line_per_epoch_and_is_deterministic(tmp_path):
    args = ("train", "--quick", "--epochs", "2", "--lr", "0.05", "--penalty", "fp", "--every", "2", "--seeds", "0")
    a = cli(*args, "--out", "a", cwd=tmp_path)
    b = cli(*args, "--out", "b", cwd=tmp_path)
    lines = [line for line in a.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "Tr(F)" in lines[0] and "test loss" in lines[0]
    strip = lambda text: [line.rsplit("[", 1)[0] for line in text.splitlines()]  # noqa: E731  (wall times differ)
    assert strip(a.stdout.replace("a/runs", "x")) == strip(b.stdout.replace("b/runs", "x"))


def test_grid_picks_the_best_point(tmp_path):
    done = cli("grid", "--quick", "--epochs", "2", "--lr", "0.001", "0.1", "--seeds", "0", "--out", "g", cwd=tmp_path)
    grid = json.loads((tmp_path / "g" / "grid.json").read_text())
    accs = {row["lr"]: row["test_acc"][0] for row in grid["rows"]}
    assert grid["best"]["lr"] == max(accs, key=accs.get)
    assert "| 0.1 | 1/1 |" in (tmp_path / "g" / "grid.md").read_text() and "Best" in done.stdout
    cli("grid", "--quick", "--epochs", "1", "--lr", "0.05", "--penalty", "fp", "--alpha", "0.1", "1", "--every", "1",
        "--seeds", "0",
        "--out", "a", cwd=tmp_path)
    grid = json.loads((tmp_path / "a" / "grid.json").read_text())
    assert [(row["lr"], row["alpha"]) for row in grid["rows"]] == [(0.05, 0.1), (0.05, 1.0)]
    assert "| 0.05 | 1 | 1/1 |" in (tmp_path / "a" / "grid.md").read_text()


def test_check_runs_the_kernel_demo(tmp_path):
    done = cli("check", "--batch", "8", cwd=tmp_path)
    assert "torch.func" in done.stdout


@pytest.mark.parametrize("args, message", [
    (("train", "--noise", "1.5"), "expected a fraction in [0, 1)"),
    (("train", "--lr", "-1"), "argument --lr: expected a finite number > 0, got '-1'"),
    (("train", "--epochs", "abc"), "argument --epochs: expected an int >= 1, got 'abc'"),
    (("train", "--momentum", "-1"), "argument --momentum: expected a fraction in [0, 1)"),
    (("explosion", "--seeds", "0", "0"), "--seeds: expected distinct values"),
    (("train", "--alpha", "3"), "--alpha: given without a penalty"),
    (("explosion", "--noise", "0.3"), "explosion runs use the clean labels"),
    (("explosion", "--small-lr", "0.5"), "--small-lr: expected a learning rate below --lr 0.1"),
    (("train", "--device", "tpu"), "--device: expected cpu, cuda or cuda:N"),
    (("train", "--out", "config.json"), "--out: expected a folder"),
    (("reproduce", "--penalty", "none"), "invalid choice: 'none'"),
    (("train", "--dataset", "cifar10", "--lr", "0.1", "--epochs", "1"), "pass --data-dir"),
    (("explosion", "--dataset", "cifar10", "--model", "vgg11"), "no known best learning rate for vgg11"),
    (("train", "--model", "cnn1d", "--dataset", "cifar10", "--lr", "0.1", "--data-dir", "."), "is for mnist1d"),
    (("train", "--device", "cuda:7"), "torch sees no CUDA device"),
    (("report", "nowhere"), "not a results folder"),
])
def test_bad_arguments_get_clear_errors(tmp_path, monkeypatch, capsys, args, message):
    import torch

    from fisher_ext.cli import main

    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a file where a folder is expected
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # main runs single-threaded, then gives the caller's count back


def test_train_data_parallel_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m fisher_ext train`: one run on two processes (gloo), the
    global batch split between them, takes one process's steps (without a penalty, whose label
    draws are each process's own): the same losses and accuracies to float32 rounding; only
    process 0 reports; other commands are refused under torchrun."""
    args = ("train", "--quick", "--epochs", "1", "--seeds", "0")
    cli(*args, "--out", "one", cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fisher_ext",
                           *args, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data-parallel on 2 processes (gloo), global batch" in done.stdout
    assert done.stdout.count("done: test acc") == 1  # process 0 alone reports

    def last_epoch(folder: str) -> dict:
        (path,) = (tmp_path / folder).glob("runs/*/seed0/metrics.jsonl")
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "epoch"][-1]

    one, two = last_epoch("one"), last_epoch("two")
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fisher_ext",
                           "grid", "--quick", "--out", "grid"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0 and "under torchrun only `train` runs" in done.stderr
