"""The Fisher Penalty of "Catastrophic Fisher Explosion" (Jastrzebski et al., ICML 2021).

``penalty = alpha * ||gbar||^2`` with ``gbar = (1/B) sum_i grad l(x_i, yhat_i)``, the labels
``yhat_i`` sampled from the model's predictive distribution once per step and held fixed
(DESIGN.md §2). Its gradient is ``2 alpha H gbar``, with H the Hessian of the sampled-label
loss:

- ``method='double_backward'``: exact, by differentiating ``||gbar||^2`` (``create_graph``);
- ``method='finite_difference'``: ``H gbar ~= ||gbar|| (grad L(theta + r v) - grad L(theta)) / r``
  with ``v = gbar / ||gbar||``: one extra forward and backward, no second-order graph. The
  error of this one-sided difference is ``O(r ||gbar||)`` times the third derivative along
  ``v``; the default ``r = 1e-3 * (1 + ||theta||) / sqrt(P)`` (float32) keeps it near the
  float32 rounding of the two gradients' difference.

The sampled-label backward that forms ``gbar`` also yields every example's squared gradient
norm through the monitor's hooks, so each step reports a Tr(F) estimate at no extra pass.

Hygiene: the penalty's passes do not update BatchNorm running statistics (they are restored;
the user's own forward is the one that counts), the finite-difference pass replays the first
pass's random state (same dropout masks) and restores the parameters bit for bit, and the
model's train/eval mode is left as it was.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from .likelihoods import Likelihood, get_likelihood
from .monitor import _Capture

METHODS = ("double_backward", "finite_difference")


@dataclass
class PenaltyResult:
    """One step of the penalty.

    Attributes:
        value: ``alpha * ||gbar||^2`` (the term added to the loss).
        gbar_sqnorm: ``||gbar||^2``.
        trace: the batch's Tr(F) estimate ``(1/B) sum_i ||g_i||^2`` from the same backward
            (None where the per-example rules do not apply, e.g. BatchNorm in train mode).
        per_example: ``(B,)`` the ``||g_i||^2`` (or None, as ``trace``).
    """

    value: float
    gbar_sqnorm: float
    trace: float | None
    per_example: torch.Tensor | None


class FisherPenalty:
    """The Fisher Penalty as a drop-in for an ordinary training loop::

        penalty = fisher_ext.FisherPenalty(model, alpha=0.1)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            result = penalty.backward(x)       # adds 2 alpha H gbar into .grad
            opt.step()

    Args:
        model: the model; its parameters with ``requires_grad`` are penalized.
        alpha: the penalty weight (>= 0).
        likelihood: as in :func:`fisher_ext.fisher_trace`.
        method: 'double_backward' (exact) or 'finite_difference'.
        every: apply on every k-th call of :meth:`backward` (the paper's cost-saving k=10). The
            gradient is *not* rescaled by k: on the steps it runs it is the penalty's gradient.
        radius: the finite-difference step r (default above); ignored by 'double_backward'.
        generator: random generator for the label sampling.
    """

    def __init__(self, model: nn.Module, alpha: float, *, likelihood: Union[str, Likelihood] = "categorical",
                 method: str = "double_backward", every: int = 1, radius: float | None = None,
                 generator: torch.Generator | None = None):
        if not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha: expected a number >= 0, got {alpha!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        if radius is not None and not radius > 0:
            raise ValueError(f"radius: expected > 0, got {radius!r}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: expected at least one trainable parameter (requires_grad=True), found none")
        self.model, self.alpha, self.method, self.every, self.radius = model, float(alpha), method, every, radius
        self.likelihood = get_likelihood(likelihood)
        self.generator = generator
        self._names = {id(p): k for k, p in model.named_parameters()}
        self._calls = 0

    def backward(self, inputs: Union[torch.Tensor, tuple], labels: torch.Tensor | None = None) -> PenaltyResult | None:
        """Adds the penalty's gradient into the parameters' ``.grad`` and returns the step's
        :class:`PenaltyResult` (None on the steps skipped by ``every``).

        ``labels`` fixes the labels (tests); by default they are sampled from the model.
        """
        self._calls += 1
        if (self._calls - 1) % self.every:
            return None
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        buffers = _norm_buffers(self.model)
        rng = _rng_state(args)
        try:
            with torch.enable_grad():
                grads, gbar_sq, result = self._first_pass(args, labels)
                if self.method == "double_backward":
                    penalty_grads = torch.autograd.grad(self.alpha * gbar_sq, self.params, allow_unused=True)
                else:
                    after = _rng_state(args)
                    penalty_grads = self._finite_difference(args, grads, rng)
                    _set_rng_state(after)  # the random stream goes on as after one pass
        finally:
            _restore_buffers(buffers)
        for p, g in zip(self.params, penalty_grads):
            if g is None:
                continue
            p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g.detach())
        return result

    # ---- passes ---------------------------------------------------------------------------

    def _first_pass(self, args: tuple, labels: torch.Tensor | None):
        try:
            capture = _Capture(self.model)  # hooks for the free per-example norms
        except ValueError:  # e.g. weight sharing: the penalty itself needs no per-example gradients
            capture = None
        with capture if capture is not None else contextlib.nullcontext():
            if capture is not None:
                capture.start()
            output = self.model(*args)
            if capture is not None:
                capture.stop()
                capture.collecting = True  # the hooks catch dl/d(output) during the gbar backward
            self.likelihood.check(output)
            if labels is None:
                labels = self.likelihood.sample(output, self.generator)
            self._labels = labels
            loss = self.likelihood.nll(output, labels).mean()
            try:
                raw = torch.autograd.grad(loss, self.params, create_graph=self.method == "double_backward",
                                          allow_unused=True)
            finally:
                if capture is not None:
                    capture.collecting = False
            per_example = self._free_norms(capture, raw, output.shape[0]) if capture is not None else None
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(raw, self.params)]
        gbar_sq = sum(g.square().sum() for g in grads)
        value = float(gbar_sq.detach())
        result = PenaltyResult(self.alpha * value, value,
                               float(per_example.mean()) if per_example is not None else None, per_example)
        return grads, gbar_sq, result

    def _free_norms(self, capture: _Capture, raw: tuple, n: int) -> torch.Tensor | None:
        """Per-example squared norms from the gradients the hooks caught (the mean loss gives
        them (1/B) dl_n/dy: scaled by B), or None where the per-example rules do not apply."""
        used = {self._names[id(p)] for p, g in zip(self.params, raw) if g is not None}
        unrecorded = {k for k in used if capture._module_of[k] not in capture.records}
        try:
            norms = capture.norms_from_grads(n, unrecorded, scale=float(n))
        except ValueError:  # e.g. BatchNorm in train mode couples the examples
            return None
        return torch.stack(list(norms.values())).sum(0).detach() if norms else None

    def _finite_difference(self, args: tuple, grads: list, rng) -> list:
        norm = math.sqrt(sum(float(g.detach().double().square().sum()) for g in grads))
        if norm == 0.0:
            return [torch.zeros_like(p) for p in self.params]
        r = self.radius if self.radius is not None else self.default_radius()
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, g in zip(self.params, grads):
                    p.add_(g.detach(), alpha=r / norm)
            _set_rng_state(rng)  # the same dropout masks as the first pass
            output = self.model(*args)
            loss = self.likelihood.nll(output, self._labels).mean()
            shifted = torch.autograd.grad(loss, self.params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)  # bit for bit
        scale = 2 * self.alpha * norm / r
        return [(gs - g.detach()) * scale if gs is not None else torch.zeros_like(g)
                for gs, g in zip(shifted, grads)]

    def default_radius(self) -> float:
        """``1e-3 * (1 + ||theta||) / sqrt(P)`` for float32 parameters (1e-6 for float64)."""
        theta = math.sqrt(sum(float(p.detach().double().square().sum()) for p in self.params))
        count = sum(p.numel() for p in self.params)
        base = 1e-6 if self.params[0].dtype == torch.float64 else 1e-3
        return base * (1 + theta) / math.sqrt(count)


def _norm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the BatchNorm running statistics, to undo the penalty passes' updates."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    out.append((b, b.detach().clone()))
    return out


def _restore_buffers(saved) -> None:
    with torch.no_grad():
        for buf, copy in saved:
            buf.copy_(copy)


def _rng_state(args: tuple):
    devices = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda:
        torch.cuda.set_rng_state(s, d)
