"""A small real training problem for the tests that follow a method over a whole run: a
1-D signal classification task in the spirit of MNIST-1D (10 template signals, randomly
shifted, scaled and noised; generated here, nothing downloaded) and a strided Conv1d ReLU
network with max-pooling, the piecewise-linear kind of model that breaks naive finite
differences in float32."""

from __future__ import annotations

import torch
from torch import nn


def signals(n: int, seed: int, length: int = 40, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, length)`` float32 signals and their ``(n,)`` labels."""
    g = torch.Generator().manual_seed(1234)  # the templates are the task: the same for every seed
    t = torch.linspace(0, 1, length)
    freq, phase = torch.rand(classes, 3, generator=g) * 6 + 1, torch.rand(classes, 3, generator=g) * 6.28
    templates = (torch.sin(freq[:, :, None] * 6.28 * t + phase[:, :, None])).sum(1) / 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    shift = torch.randint(-6, 7, (n,), generator=g)
    scale = 1 + 0.3 * torch.randn(n, 1, generator=g)
    x = torch.stack([templates[c].roll(int(s)) for c, s in zip(y, shift)]) * scale
    x = x + 0.4 * torch.randn(n, length, generator=g)
    return x.unsqueeze(1), y


def relu_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 16, 5, stride=2, padding=2), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.MaxPool1d(2),
                         nn.Flatten(), nn.Linear(16 * 5, 10))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (size,), generator=g)
        yield x[idx], y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
