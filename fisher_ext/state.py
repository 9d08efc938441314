"""The state a forward consumes or updates besides its inputs and parameters, saved so that a
second run of the same forward (the penalty's shifted pass, a rule's re-run of one module) sees
what the first one saw and leaves the state as the first one left it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class RandomState:
    """The CPU (and, once initialized, CUDA) random state at construction."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Runs the block from this state, then puts the stream back where it was."""
        after = RandomState()
        self.restore()
        try:
            yield
        finally:
            after.restore()


class BufferState:
    """The model's buffers as they were at construction (before the watched forward): BatchNorm's
    running statistics, spectral norm's power-iteration vectors, anything a forward updates."""

    def __init__(self, model: nn.Module):
        self.saved = [(m, name, b.clone()) for m in model.modules()
                      for name, b in m.named_buffers(recurse=False) if b is not None]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Runs the block on copies of the saved buffers, then puts the model's own back (neither
        updated a second time nor modified in place: a caller's graph may hold them)."""
        current = [(m, name, getattr(m, name)) for m, name, _ in self.saved]
        for m, name, b in self.saved:
            setattr(m, name, b.clone())
        try:
            yield
        finally:
            for m, name, b in current:
                setattr(m, name, b)
