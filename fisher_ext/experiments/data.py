"""Data sets of the experiments: MNIST-1D generated locally (the default) and CIFAR-10/100 read
from the standard python-pickle batches in a local folder. Nothing is downloaded."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_save

DATASETS = ("mnist1d", "cifar10", "cifar100")

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
# Per-channel statistics of the CIFAR training images, for input normalization.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """Training and test tensors, already on the device and normalized."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.x.to(device), self.y.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.classes)


def cache_dir() -> Path:
    """Where generated data sets are kept: ``$FISHER_EXT_CACHE``, else ``$XDG_CACHE_HOME/fisher_ext``,
    else ``~/.cache/fisher_ext``."""
    if os.environ.get("FISHER_EXT_CACHE"):
        return Path(os.environ["FISHER_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fisher_ext"


def load(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """The data set ``name`` ('mnist1d' | 'cifar10' | 'cifar100') on the CPU."""
    if name == "mnist1d":
        return mnist1d()
    if name in CIFAR_LAYOUT:
        return cifar(name, data_dir)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


def mnist1d() -> Dataset:
    """MNIST-1D (Greydanus, 2020) with its standard arguments: 4000 training and 1000 test
    sequences of length 40, 10 classes, generated from the package's templates on first use
    (a few seconds) and cached."""
    path = cache_dir() / "mnist1d.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
    else:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as e:
            raise ImportError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d "
                              "(it generates the data locally; nothing is downloaded)") from e
        data = make_dataset(get_dataset_args())  # never get_dataset(): that one downloads
        saved = {k: torch.from_numpy(np.asarray(data[k])) for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(saved, path)
    as_x = lambda a: a.float().unsqueeze(1)  # noqa: E731  (N, 1, 40): one input channel
    return Dataset("mnist1d", as_x(saved["x"]), saved["y"].long(), as_x(saved["x_test"]), saved["y_test"].long(), 10)


def cifar(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the python-pickle batches of the official archive, unpacked
    under ``data_dir``; normalized per channel."""
    folder, train_files, test_file, label_key, classes = CIFAR_LAYOUT[name]
    expected = "\n".join(f"    {data_dir or '<data-dir>'}/{folder}/{f}" for f in train_files + [test_file])
    if data_dir is None:
        raise FileNotFoundError(f"dataset {name!r}: pass --data-dir, a folder holding the unpacked python version of "
                                f"the data set (nothing is downloaded); expected files:\n{expected}")
    root = Path(data_dir) / folder
    missing = [f for f in train_files + [test_file] if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: {len(missing)} file(s) missing under {root} "
                                f"({', '.join(missing)}); expected the unpacked python version:\n{expected}")

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            with open(root / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255)
        mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        return (x - mean) / std, torch.from_numpy(np.concatenate(ys))

    x, y = read(train_files)
    x_test, y_test = read([test_file])
    return Dataset(name, x, y, x_test, y_test, classes)


def noisy_labels(y: torch.Tensor, fraction: float, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` with a ``fraction`` of the labels (chosen at random, seeded) replaced by a different
    class drawn uniformly; returns the new labels and the mask of the replaced ones."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noise: expected a fraction in [0, 1], got {fraction!r}")
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    noisy = torch.rand(len(y), generator=g) < fraction
    out = y.clone()
    out[noisy] = (y[noisy] + torch.randint(1, classes, (int(noisy.sum()),), generator=g)) % classes
    return out, noisy
