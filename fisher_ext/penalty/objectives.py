"""What the penalty penalizes: one scalar of a batch, ``alpha`` times

- :class:`GradientNorm`: ``||gbar||^2``, ``gbar = grad_theta (1/B) sum_i l(x_i, y_i)``, with the
  labels drawn from the model (the Fisher Penalty), the true labels (GP) or uniform random
  classes (GPr);
- :class:`BatchTrace`: ``(1/B) sum_i ||g_i||^2``, the batch's Tr(F) estimate itself;
- :class:`InputGradientNorm`: ``(1/B) sum_i ||d l_i / d x_i||^2`` (GPx).

An objective forms its value from a :class:`Batch` (the watched forward's output, inputs,
labels and capture), optionally with the graph for a double backward; the differentiation
methods (:mod:`fisher_ext.penalty.methods`) take it from there.

Across the processes of torch.distributed (``Batch.shards``), the value is that of the global
batch, identical on every rank, and its graph gives this rank's share of its gradient
(:mod:`fisher_ext.distributed`): for ``||gbar||^2``, ``gbar`` is the global batch's mean gradient
and the share is ``2 k (n_r / N) H_r gbar``, the gradient of ``2 k (n_r / N) <gbar_r, stop_grad(gbar)>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch

from ..likelihoods import Likelihood
from ..capture import Capture
from ..distributed import Shards
from ..fused_backward import backward_with_norms

Tensor = torch.Tensor


@dataclass
class Batch:
    """One step's watched forward, as the objectives and methods see it."""

    params: Sequence[Tensor]
    output: Tensor
    inputs: tuple
    labels: Tensor
    capture: Capture | None
    shards: Shards | None = None  # this rank's part of a global batch (None: the batch is all there is)


@dataclass
class Value:
    """An objective's value on a batch (without alpha).

    Attributes:
        value: the scalar, with its graph to the parameters when asked for.
        gbar: the mean-loss gradient per parameter (None where it got none), for
            :class:`GradientNorm` only.
        per_example: ``(B,)`` the ``||g_i||^2`` (float32, float64 for float64), or None.
        fused: gbar's Linear/Conv weight gradients came from the fused ops (a finite difference
            against it must form the shifted gradient the same way, or their roundings differ).
        gbar_global: across processes, the global batch's gbar (``gbar`` is this rank's own).
    """

    value: Tensor
    gbar: list | None = None
    per_example: Tensor | None = None
    fused: bool = False
    gbar_global: list | None = None


def _shared(value_global: Tensor, surrogate: Tensor) -> Tensor:
    """A scalar equal to ``value_global`` whose gradient is ``surrogate``'s (this rank's share)."""
    return value_global.detach() + (surrogate - surrogate.detach())


def _global_mean_value(batch: Batch, local: Tensor) -> Tensor:
    """A mean over the examples, made the global batch's (the objectives 'trace', 'gpx')."""
    if batch.shards is None:
        return local
    (value,) = batch.shards.mean([local], [local])
    return _shared(value, batch.shards.share * local)


def _sqnorm(gbar: Sequence, like: Tensor) -> Tensor:
    value = sum(g.square().sum() for g in gbar if g is not None)
    return value if isinstance(value, Tensor) else like.new_zeros(())  # no parameter reaches the loss


class GradientNorm:
    """``||gbar||^2``, the gradient of the mean loss ``L(theta) = (1/B) sum_i l(x_i, y_i)`` at labels
    per ``target``: 'sampled' (from the model: the Fisher Penalty), 'true' (GP), 'random' (GPr)."""

    methods = ("double_backward", "finite_difference")

    def __init__(self, likelihood: Likelihood, target: str = "sampled"):
        self.likelihood, self.target = likelihood, target

    @property
    def name(self) -> str:
        return {"sampled": "fisher", "true": "gp", "random": "gpr"}[self.target]

    def labels(self, output: Tensor, given: Tensor | None, generator: torch.Generator) -> Tensor:
        """The step's labels: ``given``, or drawn once for the target."""
        self.likelihood.check(output)
        if given is not None:
            return given
        if self.target == "true":
            raise ValueError("labels: the GP penalty (target 'true') needs the true labels, got None")
        if self.target == "random":
            if output.dim() < 2 or not hasattr(self.likelihood, "class_probabilities"):
                raise ValueError("target: 'random' (GPr) draws uniform classes; it needs a categorical likelihood")
            return torch.randint(output.shape[-1], output.shape[:-1], generator=generator, device=output.device)
        return self.likelihood.sample(output, generator)

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """``L``, whose gradient is ``gbar``."""
        return self.likelihood.nll(output, labels).mean()

    def value(self, batch: Batch, create_graph: bool) -> Value:
        capture = batch.capture
        losses = self.likelihood.nll(batch.output, batch.labels)
        if capture is not None and not create_graph:  # gbar and the free norms from one fused backward
            return self._fused_value(batch, losses)
        if capture is not None:
            capture.find_batch_dims(losses)
            capture.collecting = True  # the hooks catch dl/d(output) during this backward
        try:
            gbar = list(torch.autograd.grad(losses.mean(), batch.params, create_graph=create_graph,
                                            retain_graph=True, allow_unused=True))
        finally:
            if capture is not None:
                capture.collecting = False
        norms = free_norms(capture, batch, gbar) if capture is not None else None
        return self._value(batch, gbar, norms, fused=False)

    def _value(self, batch: Batch, gbar: list, norms: Tensor | None, fused: bool) -> Value:
        if batch.shards is None:
            return Value(_sqnorm(gbar, batch.output), gbar, norms, fused)
        shards = batch.shards
        gbar_global = shards.mean(gbar, batch.params)
        surrogate = 2 * shards.share * sum((g * c).sum() for g, c in zip(gbar, gbar_global) if g is not None)
        value = _sqnorm(gbar_global, batch.output)
        if isinstance(surrogate, Tensor) and surrogate.requires_grad:
            value = _shared(value, surrogate)
        return Value(value, gbar, norms, fused, gbar_global)

    def _fused_value(self, batch: Batch, losses: Tensor) -> Value:
        capture, n = batch.capture, batch.output.shape[0]
        capture.find_batch_dims(losses)
        try:
            gbar, norms = backward_with_norms(capture, losses.mean(), batch.params, n, scale=float(n),
                                              retain_graph=True, norms_required=False)
        finally:
            capture.clear()  # its inputs and gradients are not held past this call
        return self._value(batch, gbar, torch.stack(list(norms.values())).sum(0) if norms else None, fused=True)


class BatchTrace:
    """``(1/B) sum_i ||g_i||^2`` at labels sampled from the model, differentiated exactly through
    the differentiable per-example-norm ops (closed-form layer rules only)."""

    methods = ("double_backward",)
    name = "trace"

    def __init__(self, likelihood: Likelihood):
        self.likelihood = likelihood
        self.labels = GradientNorm(likelihood).labels

    def value(self, batch: Batch, create_graph: bool) -> Value:
        capture, n = batch.capture, batch.output.shape[0]
        losses = self.likelihood.nll(batch.output, batch.labels)
        capture.find_batch_dims(losses)
        capture.collecting = True
        try:  # the per-example loss sum: the hooks catch dl_n/dy, with their graph
            raw = torch.autograd.grad(losses.sum(), batch.params, create_graph=True, allow_unused=True)
        finally:
            capture.collecting = False
        norms = capture.norms_from_grads(n, capture.used_unrecorded(batch.params, raw), differentiable=True)
        per_example = torch.stack(list(norms.values())).sum(0)
        return Value(_global_mean_value(batch, per_example.mean()), None, per_example.detach())


class InputGradientNorm:
    """GPx: ``(1/B) sum_i ||d l_i / d x_i||^2`` over the first input (a leaf that requires grad).
    One backward of ``sum_i l_i`` gives every example's input gradient, as ``l_i`` depends on ``x_i``
    alone (BatchNorm in train mode couples examples: use eval mode)."""

    methods = ("double_backward",)
    name = "gpx"

    def __init__(self, likelihood: Likelihood, target: str = "true"):
        self.likelihood = likelihood
        self.labels = GradientNorm(likelihood, target).labels

    def value(self, batch: Batch, create_graph: bool) -> Value:
        x = batch.inputs[0]
        (gx,) = torch.autograd.grad(self.likelihood.nll(batch.output, batch.labels).sum(), x,
                                    create_graph=create_graph, retain_graph=True)
        return Value(_global_mean_value(batch, gx.reshape(gx.shape[0], -1).square().sum(1).mean()))


def free_norms(capture: Capture, batch: Batch, gbar: Sequence) -> Tensor | None:
    """The per-example squared norms from the gradients the hooks caught in the gbar backward
    (the mean loss gives them ``(1/B) dl_n/dy``: scaled by B), or None where the per-example rules
    do not apply. Clears the capture: its inputs and gradients are not held past this call."""
    n = batch.output.shape[0]
    try:
        with torch.no_grad():
            norms = capture.norms_from_grads(n, capture.used_unrecorded(batch.params, gbar), scale=float(n))
    except ValueError:  # e.g. BatchNorm in train mode couples the examples
        return None
    finally:
        capture.clear()
    return torch.stack(list(norms.values())).sum(0) if norms else None
