"""The experiments' parts: data (offline MNIST-1D, CIFAR pickles), models (a training step with the
monitor and the penalty, Tr(F) against a per-example loop), and the run itself (determinism,
resume after an interruption, divergence, clear errors)."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fisher_ext
from fisher_ext.experiments import data as datasets
from fisher_ext.experiments import models
from fisher_ext.experiments.runner import RunConfig, run

pytest.importorskip("mnist1d", reason="the experiments' data set needs the mnist1d package (scripts/install.sh)")


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---- data -----------------------------------------------------------------------------------------


def test_mnist1d_is_generated_locally_cached_and_then_read_offline(tmp_path, monkeypatch):
    import mnist1d.data

    monkeypatch.setenv("FISHER_EXT_CACHE", str(tmp_path))
    monkeypatch.setattr(mnist1d.data, "get_dataset", lambda *a, **k: pytest.fail("get_dataset downloads"))
    first = datasets.load("mnist1d")
    assert (tmp_path / "mnist1d.pt").is_file()
    assert first.x.shape == (4000, 1, 40) and first.x_test.shape == (1000, 1, 40) and first.classes == 10
    assert set(first.y.unique().tolist()) == set(range(10))
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # the cache alone serves it now
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    second = datasets.load("mnist1d")
    assert torch.equal(first.x, second.x) and torch.equal(first.y_test, second.y_test)


def test_mnist1d_without_the_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHER_EXT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        datasets.load("mnist1d")


def _fake_cifar(root, name: str, per_file: int) -> None:
    folder, train, test, key, classes = datasets.CIFAR_LAYOUT[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in train + [test]:
        batch = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, per_file).tolist()}
        with open(root / folder / f, "wb") as fh:
            pickle.dump(batch, fh)


@pytest.mark.parametrize("name, train_files", [("cifar10", 5), ("cifar100", 1)])
def test_cifar_reads_the_python_pickle_batches(tmp_path, name, train_files):
    _fake_cifar(tmp_path, name, per_file=6)
    d = datasets.load(name, tmp_path)
    assert d.x.shape == (6 * train_files, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    assert d.classes == (10 if name == "cifar10" else 100)
    folder = tmp_path / datasets.CIFAR_LAYOUT[name][0]
    with open(folder / datasets.CIFAR_LAYOUT[name][2], "rb") as fh:
        raw = pickle.load(fh)
    first = torch.tensor(raw[b"data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    mean, std = torch.tensor(datasets.CIFAR_MEAN).view(3, 1, 1), torch.tensor(datasets.CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(d.x_test[0], (first - mean) / std)
    assert d.y_test.tolist() == list(raw[datasets.CIFAR_LAYOUT[name][3]])


def test_cifar_missing_data_says_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir.*cifar-10-batches-py/data_batch_1"):
        datasets.load("cifar10", None)
    with pytest.raises(FileNotFoundError, match=r"6 file\(s\) missing.*test_batch"):
        datasets.load("cifar10", tmp_path)
    with pytest.raises(ValueError, match="dataset: expected one of"):
        datasets.load("imagenet")


def test_noisy_labels_replace_the_fraction_by_another_class():
    y = torch.arange(10).repeat(500)
    noisy_y, mask = datasets.noisy_labels(y, 0.2, 10, seed=3)
    assert 0.18 < mask.float().mean() < 0.22
    assert (noisy_y[mask] != y[mask]).all() and torch.equal(noisy_y[~mask], y[~mask])
    assert torch.equal(datasets.noisy_labels(y, 0.2, 10, seed=3)[0], noisy_y)
    with pytest.raises(ValueError, match="noise"):
        datasets.noisy_labels(y, 1.5, 10, 0)


# ---- models ---------------------------------------------------------------------------------------


def _loop_trace(model, x, y) -> torch.Tensor:
    """Oracle: each example's squared gradient norm from its own backward, in float64."""
    m = __import__("copy").deepcopy(model).double()
    out = []
    for i in range(len(x)):
        m.zero_grad()
        F.cross_entropy(m(x[i:i + 1].double()), y[i:i + 1], reduction="sum").backward()
        out.append(sum(p.grad.square().sum() for p in m.parameters()))
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_each_model_trains_a_step_with_the_monitor_and_the_penalty(name):
    torch.manual_seed(0)
    one_d = name == "cnn1d"
    model = models.build(name, "mnist1d" if one_d else "cifar10", 10)
    x = torch.randn(3, *((1, 40) if one_d else (3, 32, 32)))
    y = torch.tensor([1, 4, 7])
    result = fisher_ext.fisher_trace(model, x, labels=y, estimator="empirical")
    assert set(result.coverage.values()) <= {"conv", "linear", "group_norm"}, result.coverage
    torch.testing.assert_close(result.per_example.double(), _loop_trace(model, x, y), rtol=2e-4, atol=1e-6)
    penalty = fisher_ext.FisherPenalty(model, 0.1, method="finite_difference")
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, step = penalty.backward(x, lambda out: F.cross_entropy(out, y))
    opt.step()
    assert torch.isfinite(loss) and step.value > 0 and step.trace > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_models_refuse_the_wrong_inputs():
    with pytest.raises(ValueError, match="model: 'cnn1d' is for mnist1d"):
        models.build("cnn1d", "cifar10", 10)
    with pytest.raises(ValueError, match="model: expected one of"):
        models.build("resnet50", "cifar10", 10)


# ---- runs -----------------------------------------------------------------------------------------

SHORT = dict(epochs=3, probe=64, dense_epochs=1, dense_every=8)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_rerun_reproduces_every_metric(tmp_path):
    cfg = RunConfig(lr=0.05, penalty="fp", alpha=0.1, noise=0.2, **SHORT)
    a, b = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert a["status"] == "finished"
    assert _without_seconds(_records(tmp_path / "a")) == _without_seconds(_records(tmp_path / "b"))
    assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}
    assert 0 <= a["noisy_fit"] <= 1 and a["fd_checks"]  # the finite difference compared itself at steps 1, 2, 4..


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("penalty, every", [("none", 1), ("fp", 3), ("gp", 1)])
def test_an_interrupted_run_resumes_to_the_same_end(tmp_path, penalty, every):
    cfg = RunConfig(lr=0.05, penalty=penalty, alpha=0.0 if penalty == "none" else 0.1, every=every, **SHORT)
    whole = run(cfg, tmp_path / "whole")

    def stop_after_epoch_2(epoch, line):
        if epoch == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(cfg, tmp_path / "cut", stop_after_epoch_2)
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "result.json").exists()
    seen = []
    resumed = run(cfg, tmp_path / "cut", lambda epoch, line: seen.append(epoch))
    assert seen == [3]  # only the epoch left
    assert _without_seconds(_records(tmp_path / "cut")) == _without_seconds(_records(tmp_path / "whole"))
    assert resumed["fd_checks"] == whole["fd_checks"] and resumed["test_acc"] == whole["test_acc"]
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    assert run(cfg, tmp_path / "cut") == resumed  # finished: read back, not rerun


def test_a_diverged_run_is_reported_as_diverged(tmp_path):
    result = run(RunConfig(lr=1e6, **SHORT), tmp_path)
    assert result["status"] == "diverged"
    assert "test_acc" not in result and "peak_trace" not in result
    assert "not finite" in result["diverged_at"]["reason"] or "nan" in result["diverged_at"]["reason"].lower() \
        or "inf" in result["diverged_at"]["reason"].lower()


def test_a_folder_with_another_configuration_is_refused(tmp_path):
    run(RunConfig(lr=0.05, **SHORT), tmp_path)
    with pytest.raises(ValueError, match="another configuration.*lr: 0.05 there, 0.1 here"):
        run(RunConfig(lr=0.1, **SHORT), tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("lr", -1.0, "lr: expected a finite number > 0"), ("penalty", "l2", "penalty: expected one of"),
    ("noise", 1.0, r"noise: expected a fraction in \[0, 1\)"), ("epochs", 0, "epochs: expected an int >= 1"),
    ("method", "adjoint", "method: expected one of")])
def test_bad_run_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"lr": 0.1, field: value})
    with pytest.raises(ValueError, match="gpx.*exactly"):
        RunConfig(lr=0.1, penalty="gpx", method="finite_difference")


def test_penalty_state_dict_continues_the_label_draws_and_the_schedule():
    torch.manual_seed(0)
    model = models.cnn1d()
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    a = fisher_ext.FisherPenalty(model, 0.1, every=2, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        a.backward(x, loss)
    b = fisher_ext.FisherPenalty(model, 0.1, every=2, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(a.state_dict())
    ra, rb = a.backward(x, loss)[1], b.backward(x, loss)[1]
    assert ra is None and rb is None  # step 4: skipped by both
    ra, rb = a.backward(x, loss)[1], b.backward(x, loss)[1]
    assert torch.equal(ra.labels, rb.labels)
    own = fisher_ext.FisherPenalty(model, 0.1)
    own.backward(x, loss)
    fresh = fisher_ext.FisherPenalty(model, 0.1)
    fresh.load_state_dict(own.state_dict())
    assert torch.equal(own.backward(x, loss)[1].labels, fresh.backward(x, loss)[1].labels)


def test_progress_line_counts_runs_and_epochs_and_weights_the_eta(tmp_path):
    import io

    from fisher_ext.experiments.schedule import Progress, Task

    tasks = [Task(RunConfig(lr=0.1, epochs=10), tmp_path / "a"),
             Task(RunConfig(lr=0.1, epochs=10, penalty="fp", alpha=1.0, every=1), tmp_path / "b")]
    stream = io.StringIO()
    progress = Progress(tasks, stream)
    progress.event("start", 0, 0)
    progress.event("start", 1, 0)
    assert progress.eta() is None and progress.fraction() == 0
    progress.event("epoch", 0, 5)
    assert progress.fraction() == pytest.approx(5 / 35)  # the penalized run weighs 2.5 plain ones
    progress.start -= 10  # 10 s for 5 plain epochs: 30 more weighted epochs take 60 s
    assert progress.eta() == pytest.approx(60, rel=0.01)
    line = progress.line()
    assert line.startswith("[##....") and "runs 0/2 done" in line and "lr=0.1 seed 0 epoch 5/10" in line
    progress.event("done", 0, text="test acc 0.9")
    assert "lr=0.1 seed 0: test acc 0.9\n" in stream.getvalue() and progress.done == 1
