"""How the penalty's gradient ``alpha * grad_theta objective`` is formed.

- :class:`DoubleBackward`: exact; the objective keeps its graph (``create_graph``) and one backward
  of ``loss + alpha * objective`` gives the step's whole gradient.
- :class:`FiniteDifference` (gradient-norm objectives): ``grad ||gbar||^2 = 2 H gbar``, and
  ``H gbar ~= ||gbar|| (grad L(theta + r v) - grad L(theta)) / r`` with ``v = gbar / ||gbar||``: one
  more forward and backward, no second-order graph. The shifted pass replays the watched pass's
  random state and its discrete decisions (:class:`~fisher_ext.penalty.replay.FrozenDecisions`),
  so the difference stays on one smooth piece of a ReLU / max-pool network and converges to the
  Hessian autograd differentiates. The training loss joins the shifted pass's backward, so a step
  costs two forwards and two backwards; its gradient is then taken at ``theta + r v``.

Error of the finite difference: truncation ``O(r)`` times the third derivative along ``v``, plus
float32 rounding of the two gradients' difference ``O(eps ||g|| / r)``; the fused training
gradient adds ``r H_train v``. The default radius balances the first two (docs/design.md gives
the measurement). A periodic comparison with the exact method checks the estimate at run time.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..capture import select_logits
from ..distributed import FAILED
from ..fused_backward import backward_with_norms
from .objectives import Batch, GradientNorm, Value
from ..state import BufferState, RandomState
from .replay import DecisionMismatch, FrozenDecisions

Tensor = torch.Tensor
Grads = list  # one gradient (or None: the parameter got none) per parameter


@dataclass
class Rerun:
    """What a method needs to run the model again as the watched forward ran."""

    model: nn.Module
    names: Sequence[str]  # of Batch.params, as functional_call takes them
    rng: RandomState  # before the watched forward
    buffers: BufferState | None  # before the watched forward
    decisions: FrozenDecisions | None
    loss_fn: Callable[[Tensor], Tensor] | None  # the training loss, fused into the shifted pass
    input_versions: tuple = ()  # of the input tensors before the watched forward
    logits: Callable | None = None  # where the likelihood's parameters are in the model's output

    def inputs_changed(self, inputs: tuple) -> bool:
        return tuple(a._version for a in inputs if isinstance(a, Tensor)) != self.input_versions


@dataclass
class Check:
    """The finite difference compared with the exact gradient on one step.

    Attributes:
        relative_error: ``||fd - exact|| / ||exact||`` of the penalty's gradient.
        cosine: between the two.
        training_shift: ``||g_train(theta + r v) - g_train(theta)|| / ||exact step gradient||``, the
            error of taking the training gradient in the shifted pass (``~ r H_train v``).
    """

    relative_error: float
    cosine: float
    training_shift: float

    def passed(self, tolerance: float) -> bool:
        return self.relative_error <= tolerance and self.training_shift <= tolerance


@dataclass
class Outcome:
    """A method's result for one step."""

    grads: Grads  # the step's whole gradient, one per parameter
    value: Value
    method: str  # the method that formed ``grads`` (the exact one where the estimate fell back)
    check: Check | None = None


def _flat(grads: Grads, params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]).double()


def _add(a: Tensor | None, b: Tensor | None, scale: float = 1.0) -> Tensor | None:
    if b is None:
        return a
    return b * scale if a is None else a.add(b, alpha=scale)


class DoubleBackward:
    """Exact, by differentiating the objective's own graph."""

    name = "double_backward"

    def gradients(self, objective, batch: Batch, train_loss: Tensor, alpha: float, rerun: Rerun,
                  check: bool) -> Outcome:
        v = objective.value(batch, create_graph=True)
        with explain_missing_double_backward():
            total = torch.autograd.grad(train_loss + alpha * v.value, batch.params, allow_unused=True)
        return Outcome(list(total), v, self.name)


@contextlib.contextmanager
def explain_missing_double_backward():
    """torch's error for an op without a double backward, with what to do about it."""
    try:
        yield
    except RuntimeError as e:
        if "derivative for" not in str(e) or "not implemented" not in str(e):
            raise
        raise RuntimeError(
            f"method='double_backward' differentiates the gradient, and torch has no double backward for an op of "
            f"this model ({e}); use method='finite_difference' (no second-order graph), or, for attention, the math "
            "kernel (with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH): ...), for RNNs on "
            "the GPU, torch's own kernels instead of cuDNN's (with torch.backends.cudnn.flags(enabled=False): ...)"
        ) from e


class FiniteDifference:
    """``2 alpha H gbar`` from the gradient at ``theta + r v`` with the watched pass's decisions.

    Args:
        radius: ``r``; default ``base * (1 + ||theta||) / sqrt(P)``, base 1e-3 (float32 and lower)
            or 1e-6 (float64).
        tolerance: the largest relative error a check accepts.
    """

    name = "finite_difference"

    def __init__(self, radius: float | None = None, tolerance: float = 0.05):
        self.radius, self.tolerance = radius, tolerance

    def default_radius(self, params: Sequence[Tensor]) -> float:
        theta = float(torch.stack(torch._foreach_norm([p.detach() for p in params])).double().norm())
        count = sum(p.numel() for p in params)
        base = 1e-6 if params[0].dtype == torch.float64 else 1e-3
        return base * (1 + theta) / math.sqrt(count)

    def gradients(self, objective, batch: Batch, train_loss: Tensor, alpha: float, rerun: Rerun,
                  check: bool) -> Outcome:
        """The step's gradient. With ``check``, also the exact one, compared in the outcome's
        :class:`Check`; a failed check gives the exact gradient. A shifted pass that does not
        replay the watched pass's decisions falls back to the exact gradient with a warning."""
        if not isinstance(objective, GradientNorm):
            raise TypeError(f"finite_difference differentiates ||gbar||^2; got objective {objective.name!r}")
        v = exact = None
        if check:  # the exact parts of this step, for the comparison
            try:
                v = objective.value(batch, create_graph=True)
                exact = (list(torch.autograd.grad(train_loss, batch.params, retain_graph=True, allow_unused=True)),
                         list(torch.autograd.grad(alpha * v.value, batch.params, retain_graph=True,
                                                  allow_unused=True)))
            except RuntimeError as e:  # an op without a double backward: the estimate stands unchecked
                warn(f"the exact gradient to check the finite difference against cannot be formed ({e}); the "
                     "check is skipped")
        if v is None:
            v = objective.value(batch, create_graph=False)
        gbar = [g.detach() if g is not None else None for g in v.gbar]
        mismatch = None
        try:
            penalty, train = self._shifted(objective, batch, gbar, float(v.value.detach()), alpha, rerun,
                                           separate=check, fused=v.fused, direction=v.gbar_global)
        except DecisionMismatch as e:
            mismatch = e
        except Exception:  # across processes the others learn it here, rather than waiting for this rank
            if batch.shards is not None:
                batch.shards.worst(FAILED)
            raise
        if batch.shards is not None:  # one verdict for every rank
            worst = batch.shards.worst(1 if mismatch is not None else 0)
            if worst == FAILED:
                raise RuntimeError("the finite difference's shifted pass failed on another process (its own error "
                                   "says why); nothing was written into .grad")
            if worst and mismatch is None:
                mismatch = DecisionMismatch("another rank's shifted pass did not replay its watched pass's decisions")
        if mismatch is not None:  # every rank takes the exact gradient together
            warn(f"{mismatch}; this step's gradient is the exact one (double backward)")
            return Outcome(self._exact(objective, batch, train_loss, alpha), v, DoubleBackward.name)
        if exact is None:
            return Outcome(penalty, v, self.name)
        report = self._compare(batch.params, penalty, train, exact, batch.shards)
        if not report.passed(self.tolerance):
            return Outcome([_add(t, p) for t, p in zip(*exact)], v, DoubleBackward.name, report)
        return Outcome([_add(p, t) for p, t in zip(penalty, train)], v, self.name, report)

    def _shifted(self, objective: GradientNorm, batch: Batch, gbar: Grads, gbar_sqnorm: float, alpha: float,
                 rerun: Rerun, separate: bool, fused: bool = False,
                 direction: Grads | None = None) -> tuple[Grads, Grads]:
        """The gradient of ``loss + c L`` at ``theta + r v`` (the decisions and random state of the
        watched pass), less ``c gbar``, with ``c = 2 alpha ||gbar|| / r``: the step's gradient. With
        ``separate``, as (penalty part, training part) from two backwards of the shifted pass;
        else (all of it, Nones) from one. The rounding of ``||gbar||`` cancels: it scales the shift
        and the difference inversely. ``fused``: gbar's layer gradients came from the fused ops, so
        the shifted pass takes them from the same ops (through the capture): two gradients formed
        with different summation orders would leave their rounding difference, divided by r.
        Across processes, the shift follows the global batch's gbar (``direction``, of norm
        ``sqrt(gbar_sqnorm)``) on every rank alike, and each rank's difference is scaled by its share."""
        direction = gbar if direction is None else direction
        norm = math.sqrt(gbar_sqnorm)
        r = self.radius if self.radius is not None else self.default_radius(batch.params)
        step = r / norm if norm > 0 else 0.0  # gbar = 0: no shift, and the penalty's gradient is 0
        # New tensors passed by functional_call: the model's own parameters are never modified (the
        # caller's graph may have saved them), so nothing needs restoring.
        shifted = [(p.detach() + step * d if d is not None else p.detach()).requires_grad_()
                   for p, d in zip(batch.params, direction)]
        if rerun.inputs_changed(batch.inputs):
            raise DecisionMismatch("the watched forward modified its inputs in place, so they cannot be fed again")
        decisions = rerun.decisions.replay()
        capture = batch.capture if fused and not separate else None
        with rerun.rng.replayed(), rerun.buffers.replayed():
            with decisions.watching(rerun.model):
                if capture is not None:
                    capture.start()
                try:
                    output = torch.func.functional_call(rerun.model, dict(zip(rerun.names, shifted)), batch.inputs)
                finally:
                    if capture is not None:
                        capture.stop()
            train_loss = rerun.loss_fn(output)  # its own random draws as in the watched pass
            output = select_logits(rerun.logits, output)
        if not decisions.finished():
            raise DecisionMismatch("the replayed forward made fewer decisions than the recorded one")
        scale = 2 * alpha * norm / r * (batch.shards.share if batch.shards is not None else 1.0)
        penalty_loss = scale * objective.loss(output, batch.labels)
        # The loss may also read the model's own parameters outside the forward (weight decay in
        # the loss): those uses reach the parameters themselves, not the shifted tensors.
        direct = list(batch.params)
        n = len(shifted)
        if separate:
            penalty = torch.autograd.grad(penalty_loss, shifted, retain_graph=True, allow_unused=True)
            got = torch.autograd.grad(train_loss, shifted + direct, allow_unused=True)
            train = [_add(a, b) for a, b in zip(got[:n], got[n:])]
        else:
            if capture is not None:
                try:
                    capture.find_batch_dims(objective.likelihood.nll(output, batch.labels))
                    got, _ = backward_with_norms(capture, penalty_loss + train_loss, shifted + direct,
                                                 batch.output.shape[0], 1.0, retain_graph=False,
                                                 names=list(rerun.names) + [None] * n, norms=False)
                finally:
                    capture.clear()
            else:
                got = torch.autograd.grad(penalty_loss + train_loss, shifted + direct, allow_unused=True)
            penalty = [_add(a, b) for a, b in zip(got[:n], got[n:])]
            train = [None] * n
        return [_add(a, g, -scale) for a, g in zip(penalty, gbar)], train

    def _compare(self, params: Sequence[Tensor], penalty: Grads, train: Grads, exact: tuple[Grads, Grads],
                 shards=None) -> Check:
        exact_train, exact_penalty = _flat(exact[0], params), _flat(exact[1], params)
        fd, train_fd = _flat(penalty, params), _flat(train, params)
        if shards is not None:  # the ranks' shares add up to the global gradients: one verdict for all
            exact_train, exact_penalty, fd, train_fd = shards.sum([exact_train, exact_penalty, fd, train_fd])
        norm = float(exact_penalty.norm())
        step = float((exact_train + exact_penalty).norm())
        shift = float((train_fd - exact_train).norm()) / step if step > 0 else 0.0
        if norm == 0:
            return Check(0.0 if float(fd.norm()) == 0 else math.inf, 1.0, shift)
        cosine = float(torch.nn.functional.cosine_similarity(fd, exact_penalty, dim=0))
        return Check(float((fd - exact_penalty).norm()) / norm, cosine, shift)

    def _exact(self, objective, batch: Batch, train_loss: Tensor, alpha: float) -> Grads:
        """The exact gradient of the step, where the estimate cannot be trusted (the capture has
        given its norms already)."""
        v = objective.value(Batch(batch.params, batch.output, batch.inputs, batch.labels, None, batch.shards),
                            create_graph=True)
        return list(torch.autograd.grad(train_loss + alpha * v.value, batch.params, allow_unused=True))


def warn(message: str, stacklevel: int = 4) -> None:
    """A RuntimeWarning pointing at the caller's line (``stacklevel`` frames up from here)."""
    warnings.warn(f"FisherPenalty: {message}", RuntimeWarning, stacklevel=stacklevel)
