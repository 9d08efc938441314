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

With :meth:`FisherPenalty.backward_with_loss` the finite difference is fused with the training
loss: the shifted pass backpropagates ``loss + c L_s`` (``c = 2 alpha ||gbar|| / r``) in one
backward, so the step costs two forwards and two backwards instead of two and three. The price
is that the training gradient is taken at ``theta + r v`` instead of ``theta``: an added error
``g_train(theta + r v) - g_train(theta) = r H_train v + O(r^2)``, with ``r`` at its default
``~1e-3 ||theta|| / sqrt(P)`` far below any optimizer step.

The sampled-label backward that forms ``gbar`` also yields every example's squared gradient
norm through the monitor's hooks, so each step reports a Tr(F) estimate at no extra pass (the
norm kernels run right after it; ``report_trace=False`` skips them and hooks nothing).

Hygiene: the penalty's own forwards run BatchNorm on scratch copies of its running statistics
(the user's forward is the one that counts, and the real buffers are never touched in place),
the finite-difference pass replays the first pass's random state (same dropout masks) and runs
on shifted copies of the parameters (the model's own are never modified), and the model's
train/eval mode is left as it was.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from .likelihoods import Likelihood, get_likelihood
from .monitor import _Capture

METHODS = ("double_backward", "finite_difference")
MODES = ("batch", "trace", "input")
TARGETS = ("sampled", "true", "random")


@dataclass
class PenaltyResult:
    """One step of the penalty.

    Attributes:
        value: ``alpha * ||gbar||^2`` (the term added to the loss).
        gbar_sqnorm: ``||gbar||^2`` (NaN in mode 'trace', which does not form gbar).
        per_example: ``(B,)`` the ``||g_i||^2`` from the gbar backward, or None (``report_trace``
            off, or where the per-example rules do not apply, e.g. BatchNorm in train mode).
    """

    value: float
    gbar_sqnorm: float
    per_example: torch.Tensor | None = None

    @property
    def trace(self) -> float | None:
        """The batch's Tr(F) estimate ``(1/B) sum_i ||g_i||^2`` (None as ``per_example``)."""
        return float(self.per_example.mean()) if self.per_example is not None else None


class FisherPenalty:
    """The Fisher Penalty as a drop-in for an ordinary training loop, reusing its forward::

        penalty = fisher_ext.FisherPenalty(model, alpha=0.1)
        for x, y in loader:
            opt.zero_grad()
            with penalty.watch():
                logits = model(x)
            result = penalty.from_output(logits)   # adds 2 alpha H gbar into .grad
            F.cross_entropy(logits, y).backward()
            opt.step()

    or, with a forward of its own, ``penalty.backward(x)`` anywhere before ``opt.step()``; or the
    whole step's backward in one call (the cheapest form of each method)::

        loss, result = penalty.backward_with_loss(x, lambda logits: F.cross_entropy(logits, y))

    Args:
        model: the model; its parameters with ``requires_grad`` are penalized.
        alpha: the penalty weight (>= 0).
        likelihood: as in :func:`fisher_ext.fisher_trace`.
        method: 'double_backward' (exact) or 'finite_difference' (mode 'batch' only).
        mode: 'batch', the paper's ``alpha ||gbar||^2``; 'trace', ``alpha (1/B) sum_i ||g_i||^2``,
            the batch estimate of Tr(F) itself, differentiated exactly through the differentiable
            per-example-norm ops (layers with closed-form rules only; BatchNorm in eval mode); or
            'input' (the paper's GPx baseline), ``alpha (1/B) sum_i ||d l_i / d x_i||^2``, with
            :meth:`backward` only.
        target: the labels of ``l``: 'sampled' from the model (the Fisher Penalty), 'true' (the
            paper's GP baseline: pass the labels to each call), or 'random' (GPr: uniform
            random classes, categorical likelihood).
        every: apply on every k-th call of :meth:`backward` (the paper's cost-saving k=10). The
            gradient is *not* rescaled by k: on the steps it runs it is the penalty's gradient.
        radius: the finite-difference step r (default above); ignored by 'double_backward'.
        generator: random generator for the label sampling.
        report_trace: give each step's per-example ``||g_i||^2`` and Tr(F) estimate, from the
            gbar backward (no extra pass; the norm kernels run right after it, and the layer
            inputs and output gradients they need are released before the rest of the step).
            False leaves the model unhooked (mode 'trace' always computes them).
    """

    def __init__(self, model: nn.Module, alpha: float, *, likelihood: Union[str, Likelihood] = "categorical",
                 method: str = "double_backward", mode: str = "batch", target: str = "sampled", every: int = 1,
                 radius: float | None = None, generator: torch.Generator | None = None, report_trace: bool = True):
        if not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha: expected a number >= 0, got {alpha!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        if mode in ("trace", "input") and method != "double_backward":
            raise ValueError(f"method: mode={mode!r} is differentiated exactly; expected 'double_backward', got "
                             f"{method!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        if radius is not None and not radius > 0:
            raise ValueError(f"radius: expected > 0, got {radius!r}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: expected at least one trainable parameter (requires_grad=True), found none")
        self.model, self.alpha, self.method, self.every, self.radius = model, float(alpha), method, every, radius
        self.mode, self.target = mode, target
        self.likelihood = get_likelihood(likelihood)
        self.generator = generator
        self.report_trace = bool(report_trace)
        self._names = {id(p): k for k, p in model.named_parameters()}
        self._calls = 0
        self._watched: tuple | None = None  # (capture, random state, [inputs]) of the last watched forward
        self.last_result: PenaltyResult | None = None

    def backward(self, inputs: Union[torch.Tensor, tuple], labels: torch.Tensor | None = None) -> PenaltyResult | None:
        """Runs its own forward on ``inputs``, adds the penalty's gradient into the parameters'
        ``.grad`` and returns the step's :class:`PenaltyResult` (None on steps skipped by ``every``).

        ``labels`` fixes the labels (tests); by default they are sampled from the model.
        See :meth:`watch` / :meth:`from_output` to reuse the training forward instead.
        """
        if not self._due():
            return None
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if self.mode == "input":
            return self._input_penalty(args, labels)
        rng, capture = _rng_state(), self._new_capture()
        with torch.enable_grad(), _scratch_norm_stats(self.model), (
                capture if capture is not None else contextlib.nullcontext()):
            output = self._forward(args, capture)
            return self._apply(output, capture, args, rng, labels, retain_graph=False)

    def backward_with_loss(self, inputs: Union[torch.Tensor, tuple], loss: Callable[[torch.Tensor], torch.Tensor],
                           labels: torch.Tensor | None = None) -> tuple[torch.Tensor, PenaltyResult | None]:
        """The step's whole backward in one call: one forward on ``inputs``, then the gradient of
        ``loss(output)`` plus the penalty's, added into the parameters' ``.grad``.

        This forward is the training forward (BatchNorm updates its running statistics once, as in
        a plain step). 'double_backward' and the modes 'trace' and 'input' backpropagate
        ``loss + penalty`` in one backward (exact). 'finite_difference' fuses the training loss into
        the shifted pass (see the module docstring): two forwards and two backwards in all, with the
        training gradient taken at ``theta + r v``. On steps skipped by ``every`` it is a plain step.

        Returns:
            The training loss (detached) and the step's :class:`PenaltyResult` (None when skipped).
        """
        if not callable(loss):
            raise TypeError(f"loss: expected a callable taking the model's output and returning a scalar loss, "
                            f"got {type(loss).__name__}")
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if not self._due():  # a plain step
            with torch.enable_grad():
                train_loss = _scalar_loss(loss, self.model(*args))
                train_loss.backward()
            return train_loss.detach(), None
        if self.mode == "input":
            args = (args[0].detach().requires_grad_(),) + args[1:]
        rng = _rng_state()
        capture = self._new_capture() if self.mode != "input" else None
        with torch.enable_grad(), (capture if capture is not None else contextlib.nullcontext()):
            output = self._forward(args, capture)
            train_loss = _scalar_loss(loss, output)
            if self.mode == "input":
                value, result = self._input_value(args[0], output, labels)
            elif self.method == "double_backward":
                value, _, result = self._value(output, capture, labels, keep_graph=True)
            else:
                _, grads, result = self._value(output, capture, labels, keep_graph=False)
            if self.method == "finite_difference":
                total = self._finite_difference(args, grads, result.gbar_sqnorm, rng, self._labels, loss=loss)
            else:
                total = torch.autograd.grad(train_loss + value, self.params, allow_unused=True)
        self._add_to_grads(total)
        self.last_result = result
        return train_loss.detach(), result

    def watch(self) -> contextlib.AbstractContextManager:
        """Context manager around the training forward whose output :meth:`from_output` will use:
        it records the random state (the finite difference replays the forward's dropout masks)
        and the inputs, and hooks the layers for the free per-example norms."""
        return _Watch(self)

    def from_output(self, output: torch.Tensor, labels: torch.Tensor | None = None) -> PenaltyResult | None:
        """The penalty from the output of the last watched forward: no extra forward for
        'double_backward' and 'trace', one (at the shifted parameters) for 'finite_difference'.
        The graph is kept for the caller's own backward."""
        capture, rng, inputs = self._take_watched("from_output")
        if not self._due():
            if capture is not None:
                capture.clear()
            return None
        if not inputs and self.method == "finite_difference":
            raise RuntimeError("from_output: the watched forward did not call the model")
        args = inputs[0] if inputs else None
        try:
            with torch.enable_grad():
                return self._apply(output, capture, args, rng, labels, retain_graph=True)
        finally:
            if capture is not None:
                capture.clear()

    # ---- passes ---------------------------------------------------------------------------

    def _take_watched(self, caller: str) -> tuple:
        """The (capture, random state, [inputs]) of the last watched forward, used once."""
        if self.mode == "input":
            raise ValueError("mode: 'input' (GPx) differentiates w.r.t. the inputs; use backward(x, labels)")
        if self._watched is None:
            raise RuntimeError(f"{caller}: no watched forward; run the model inside `with penalty.watch():` first")
        watched, self._watched = self._watched, None
        return watched

    def _forward(self, args: tuple, capture: _Capture | None) -> torch.Tensor:
        """The model on ``args``, recorded by ``capture`` when there is one."""
        if capture is not None:
            capture.start()
        output = self.model(*args)
        if capture is not None:
            capture.stop()
        return output

    def _due(self) -> bool:
        self._calls += 1
        return (self._calls - 1) % self.every == 0

    def _new_capture(self) -> _Capture | None:
        if not self.report_trace and self.mode != "trace":
            return None
        try:
            return _Capture(self.model)  # hooks for the free per-example norms
        except ValueError:  # e.g. weight sharing: the batch penalty itself needs no per-example gradients
            if self.mode == "trace":
                raise
            return None

    def penalty_term(self, output: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """The penalty as a differentiable scalar to add to the loss, from the output of the last
        watched forward (one backward then serves both: the cheapest exact form)::

            with penalty.watch():
                logits = model(x)
            loss = F.cross_entropy(logits, y)
            term = penalty.penalty_term(logits)
            (loss + term if term is not None else loss).backward()

        Needs method='double_backward'. None on the steps skipped by ``every``; the step's
        :class:`PenaltyResult` is in ``penalty.last_result``.
        """
        if self.method != "double_backward":
            raise ValueError("method: penalty_term differentiates the penalty; expected 'double_backward', got "
                             f"{self.method!r} (use from_output for finite differences)")
        capture, _, _ = self._take_watched("penalty_term")
        try:
            if not self._due():
                return None
            with torch.enable_grad():
                value, _, self.last_result = self._value(output, capture, labels, keep_graph=True)
            return value
        finally:
            if capture is not None:
                capture.clear()

    def _labels_for(self, output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The step's labels: given, or drawn once per step for the target."""
        self.likelihood.check(output)
        if labels is not None:
            return labels
        if self.target == "true":
            raise ValueError("labels: target='true' (the GP baseline) needs the true labels, got None")
        if self.target == "random":
            if output.dim() < 2 or not hasattr(self.likelihood, "class_probabilities"):
                raise ValueError("target: 'random' draws uniform classes; it needs a categorical likelihood")
            return torch.randint(output.shape[-1], output.shape[:-1], generator=self.generator,
                                 device=output.device)
        return self.likelihood.sample(output, self.generator)

    def _value(self, output, capture, labels, keep_graph: bool):
        """The penalty value (a tensor with graph when differentiable), gbar's parts, and the result."""
        labels = self._labels_for(output, labels)
        self._labels = labels
        n = output.shape[0]
        if self.mode == "trace":
            per_example = self._differentiable_norms(output, capture, labels, n)
            value = self.alpha * per_example.mean()
            return value, None, PenaltyResult(float(value.detach()), float("nan"), per_example.detach())
        db = self.method == "double_backward"
        if capture is not None:
            capture.collecting = True  # the hooks catch dl/d(output) during the gbar backward
        try:
            raw = torch.autograd.grad(self.likelihood.nll(output, labels).mean(), self.params, create_graph=db,
                                      retain_graph=keep_graph or db, allow_unused=True)
        finally:
            if capture is not None:
                capture.collecting = False
        norms = self._free_norms(capture, raw, n) if capture is not None else None
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(raw, self.params)]
        gbar_sq = sum(g.square().sum() for g in grads)
        value = float(gbar_sq.detach())
        result = PenaltyResult(self.alpha * value, value, norms)
        return self.alpha * gbar_sq, grads, result

    def _apply(self, output, capture, args, rng, labels, retain_graph: bool) -> PenaltyResult:
        value, grads, result = self._value(output, capture, labels, keep_graph=retain_graph)
        if self.method == "double_backward":
            penalty_grads = torch.autograd.grad(value, self.params, retain_graph=retain_graph, allow_unused=True)
        else:
            penalty_grads = self._finite_difference(args, grads, result.gbar_sqnorm, rng, self._labels)
        self._add_to_grads(penalty_grads)
        self.last_result = result
        return result

    def _add_to_grads(self, grads) -> None:
        """Adds into ``.grad`` in the parameter's own layout (the gradient layout contract); a
        fresh gradient of that layout is taken over without a copy, as autograd's own does."""
        for p, g in zip(self.params, grads):
            if g is None:
                continue
            g = g.detach()
            if p.grad is not None:
                p.grad.add_(g)
            elif g.stride() == p.stride() and g.dtype == p.dtype:
                p.grad = g
            else:
                p.grad = torch.empty_like(p).copy_(g)

    def _input_penalty(self, args: tuple, labels: torch.Tensor | None) -> PenaltyResult:
        """GPx from a forward of its own (BatchNorm on scratch statistics)."""
        x = args[0].detach().requires_grad_()
        with torch.enable_grad(), _scratch_norm_stats(self.model):
            value, result = self._input_value(x, self.model(x, *args[1:]), labels)
            grads = torch.autograd.grad(value, self.params, allow_unused=True)
        self._add_to_grads(grads)
        self.last_result = result
        return result

    def _input_value(self, x: torch.Tensor, output: torch.Tensor, labels: torch.Tensor | None):
        """GPx: alpha (1/B) sum_i ||d l_i / d x_i||^2 (the first input, a leaf requiring grad), with
        its graph for an exact double backward. The per-example input gradients are one backward of
        sum_i l_i, as l_i depends on x_i alone (BatchNorm in train mode couples examples: use eval mode)."""
        labels = self._labels_for(output, labels)
        (gx,) = torch.autograd.grad(self.likelihood.nll(output, labels).sum(), x, create_graph=True)
        value = self.alpha * gx.reshape(gx.shape[0], -1).square().sum(1).mean()
        return value, PenaltyResult(float(value.detach()), float("nan"), None)

    def _unrecorded_used(self, capture: _Capture, raw: tuple) -> set[str]:
        """Parameters the loss depends on (a gradient in ``raw``) whose own module did not run."""
        used = {self._names[id(p)] for p, g in zip(self.params, raw) if g is not None}
        return {k for k in used if capture._module_of[k] not in capture.records}

    def _free_norms(self, capture: _Capture, raw: tuple, n: int) -> torch.Tensor | None:
        """The per-example squared norms from the gradients the hooks caught in the gbar backward
        (the mean loss gives them (1/B) dl_n/dy: scaled by B), or None where the per-example rules
        do not apply. Clears the capture: its inputs and gradients are not held past this call."""
        try:
            with torch.no_grad():
                norms = capture.norms_from_grads(n, self._unrecorded_used(capture, raw), scale=float(n))
        except ValueError:  # e.g. BatchNorm in train mode couples the examples
            return None
        finally:
            capture.clear()
        return torch.stack(list(norms.values())).sum(0) if norms else None

    def _differentiable_norms(self, output, capture: _Capture, labels, n: int) -> torch.Tensor:
        """(B,) per-example squared norms with their graph (mode 'trace')."""
        capture.collecting = True
        try:  # the per-example loss sum: the hooks catch dl_n/dy, with their graph
            raw = torch.autograd.grad(self.likelihood.nll(output, labels).sum(), self.params, create_graph=True,
                                      allow_unused=True)
        finally:
            capture.collecting = False
        unrecorded = self._unrecorded_used(capture, raw)
        return torch.stack(list(capture.norms_from_grads(n, unrecorded, differentiable=True).values())).sum(0)

    def _finite_difference(self, args: tuple, grads: list, gbar_sqnorm: float, rng, labels, loss=None) -> list:
        """``2 alpha H gbar`` from the gradient at ``theta + r v``; with ``loss``, plus the
        gradient of ``loss`` there, from the same backward (the fused form). The rounding of
        ``||gbar||`` cancels: it scales the shift and the difference inversely."""
        norm = math.sqrt(gbar_sqnorm)
        r = self.radius if self.radius is not None else self.default_radius()
        step = r / norm if norm > 0 else 0.0  # gbar = 0: no shift, and the penalty's gradient is 0
        grads = [g.detach() for g in grads]
        # The shifted parameters are new tensors passed by functional_call: the model's own are
        # never modified (the caller's graph may have saved them), so nothing needs restoring.
        shifted = torch._foreach_add([p.detach() for p in self.params], grads, alpha=step)
        after = _rng_state()
        _set_rng_state(rng)  # the same dropout masks as the first pass
        try:
            with _scratch_norm_stats(self.model):  # the caller's forward counted once; this one must not
                output = torch.func.functional_call(
                    self.model, {self._names[id(p)]: q.requires_grad_() for p, q in zip(self.params, shifted)}, args)
            scale = 2 * self.alpha * norm / r
            objective = scale * self.likelihood.nll(output, labels).mean()
            if loss is not None:
                objective = objective + _scalar_loss(loss, output)
            at_shift = torch.autograd.grad(objective, shifted, allow_unused=True)
        finally:
            _set_rng_state(after)  # the random stream goes on as after one pass
        at_shift = [gs if gs is not None else torch.zeros_like(g) for gs, g in zip(at_shift, grads)]
        return torch._foreach_add(at_shift, grads, alpha=-scale)

    def default_radius(self) -> float:
        """``1e-3 * (1 + ||theta||) / sqrt(P)`` for float32 parameters (1e-6 for float64)."""
        theta = float(torch.stack(torch._foreach_norm([p.detach() for p in self.params])).norm())
        count = sum(p.numel() for p in self.params)
        base = 1e-6 if self.params[0].dtype == torch.float64 else 1e-3
        return base * (1 + theta) / math.sqrt(count)


@contextlib.contextmanager
def _scratch_norm_stats(model: nn.Module):
    """Gives every BatchNorm scratch copies of its running statistics for the penalty's own
    forwards, so the real ones are neither updated a second time nor modified in place (the
    caller's graph may have saved them for its backward)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name)
                if buf is not None:
                    saved.append((m, name, buf))
                    setattr(m, name, buf.clone())
    try:
        yield
    finally:
        for m, name, buf in saved:
            setattr(m, name, buf)


def _scalar_loss(loss: Callable, output: torch.Tensor) -> torch.Tensor:
    value = loss(output)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
        got = f"a tensor of shape {tuple(value.shape)}, requires_grad={value.requires_grad}" \
            if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss: expected the callable to return a scalar tensor with a graph to the output, got {got}")
    return value.reshape(())


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class _Watch:
    """Records the watched forward: the capture's hooks (free norms), the random state, and the
    model's inputs (a pre-hook, kept even without a capture: the finite difference re-runs them)."""

    def __init__(self, penalty: FisherPenalty):
        self.penalty = penalty

    def __enter__(self):
        p = self.penalty
        capture = p._new_capture()
        if capture is not None:
            capture.__enter__()
            capture.start()
        inputs: list = []
        self._pre = p.model.register_forward_pre_hook(lambda m, args: inputs.append(args) if not inputs else None)
        p._watched = (capture, _rng_state(), inputs)
        return p

    def __exit__(self, *exc):
        self._pre.remove()
        capture = self.penalty._watched[0]
        if capture is not None:
            capture.unhook()  # the records stay for from_output() / penalty_term()
