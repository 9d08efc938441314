"""The Fisher Penalty as a drop-in for an ordinary training loop: one objective (what is
penalized) crossed with one method (how its gradient is formed), driven by one step."""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Union
from collections.abc import Callable

import torch
from torch import nn

from ..estimators import LabelGenerator
from ..likelihoods import Likelihood, get_likelihood
from ..capture import Capture, as_args, foreign_output, select_logits
from ..distributed import (Shards, accumulate_grads, agreement, check_same_model, global_means, process_group, rank,
                           refuse_fsdp, refuse_static_graph, unwrap_ddp)
from ..fused_backward import leaf_uses
from .methods import Check, DoubleBackward, FiniteDifference, Rerun, warn
from .objectives import Batch, BatchTrace, GradientNorm, InputGradientNorm
from ..state import BufferState, RandomState
from .replay import FrozenDecisions

Tensor = torch.Tensor
OBJECTIVES = ("fisher", "trace", "gp", "gpr", "gpx")
METHODS = ("double_backward", "finite_difference")


@dataclass
class PenaltyResult:
    """One step of the penalty.

    Attributes:
        value: ``alpha`` times the objective (``alpha ||gbar||^2`` for the Fisher Penalty); across
            processes (scope 'global'), the global batch's, the same on every rank.
        gbar_sqnorm: ``||gbar||^2`` (NaN for the objectives 'trace' and 'gpx', which form no gbar).
        labels: the step's labels (sampled once, held fixed through every pass of the step).
        method: the method that formed this step's gradient ('double_backward' where the finite
            difference fell back to it).
        per_example: ``(B,)`` the ``||g_i||^2`` from the gbar backward, or None (``report_trace`` off,
            or where the per-example rules do not apply, e.g. BatchNorm in train mode); this rank's
            examples only.
        check: on the steps the finite difference was compared with the exact gradient, the
            comparison; else None.
        trace: the batch's Tr(F) estimate ``(1/B) sum_i ||g_i||^2`` (None as ``per_example``); across
            processes, over the global batch, the same on every rank.
    """

    value: float
    gbar_sqnorm: float
    labels: Tensor
    method: str
    per_example: Tensor | None = None
    check: Check | None = None
    trace: float | None = None


class FisherPenalty:
    """The Fisher Penalty of "Catastrophic Fisher Explosion" (Jastrzebski et al., ICML 2021):
    ``alpha * ||gbar||^2``, ``gbar = grad (1/B) sum_i l(x_i, yhat_i)`` with ``yhat_i`` drawn from the
    model's predictive distribution once per step.

    The whole step in one call, for every method (the cheapest form of each)::

        penalty = fisher_ext.FisherPenalty(model, alpha=0.1, method="finite_difference")
        for x, y in loader:
            loss, result = penalty.backward(x, lambda logits: F.cross_entropy(logits, y))
            opt.step(); opt.zero_grad()

    Or, exact, as a term added to the caller's own loss (one backward for both)::

        with penalty.watch():
            logits = model(x)
        (F.cross_entropy(logits, y) + penalty.penalty_term(logits)).backward()

    Args:
        model: the model; its parameters with ``requires_grad`` are penalized. A compiled model
            (``torch.compile``) runs its original module eagerly in :meth:`backward`.
        alpha: the penalty weight (a finite number >= 0).
        objective: 'fisher' (the Fisher Penalty), 'trace' (the batch's Tr(F) estimate
            ``(1/B) sum_i ||g_i||^2`` itself, differentiated exactly through the per-example-norm
            ops), or the paper's baselines 'gp' (true labels: pass ``labels``), 'gpr' (uniform random
            labels) and 'gpx' (``(1/B) sum_i ||d l_i / d x_i||^2``, the input-gradient norm, true
            labels); see also :meth:`gp`, :meth:`gpr`, :meth:`gpx`.
        method: 'double_backward' (exact) or 'finite_difference' (objectives 'fisher', 'gp', 'gpr';
            :meth:`backward` only): two forwards and two backwards a step, see
            :mod:`fisher_ext.penalty.methods` for its error.
        likelihood: as in :func:`fisher_ext.fisher_trace`.
        every: apply on every k-th step (the paper's cost-saving k=10); the gradient is not rescaled.
        radius: the finite-difference step ``r`` (default: see :class:`~fisher_ext.penalty.methods.FiniteDifference`).
        check_every: the finite difference is compared with the exact gradient on its penalty steps
            1, 2, 4, ... and then every ``check_every``-th (0: never). A comparison off by more than
            5% warns with the numbers and switches the penalty to 'double_backward'.
        generator: the random generator of the label draws. Default: one of the penalty's own,
            seeded from ``torch.initial_seed()`` (and the rank, across processes); the global random
            stream is never drawn from. Across processes, give each rank a generator of its own seed.
        report_trace: give each step's per-example ``||g_i||^2`` and Tr(F) estimate from the gbar
            backward (no extra pass; the norm kernels run right after it). False hooks nothing.
        logits: where the likelihood's parameters are in the model's output, for a model that returns
            more than them (``lambda out: out["logits"]``); ``loss`` still gets the whole output.
        scope: across the processes of torch.distributed (a DistributedDataParallel model, or a
            process group initialized), 'global' (the default there) penalizes the global batch's
            ``||gbar||^2``, ``gbar`` the mean over every rank's examples, so that k processes with
            batch B each take the steps of one process with batch kB; 'local' penalizes each rank's
            own batch (the micro-batch penalty of the usual reimplementations). The gradient each
            rank writes is its share, averaged over the ranks by DDP's reducer (the model wrapped in
            DDP), or by the caller's own all-reduce of ``.grad`` (not wrapped). Constructing the
            penalty is then a collective call (every rank checks that all hold the same model).
    """

    def __init__(self, model: nn.Module, alpha: float, *, objective: str = "fisher",
                 method: str = "double_backward", likelihood: Union[str, Likelihood] = "categorical",
                 every: int = 1, radius: float | None = None, check_every: int = 1000,
                 generator: torch.Generator | None = None, report_trace: bool = True,
                 logits: Callable[[Any], Tensor] | None = None, scope: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = alpha.item()
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha: expected a finite real number >= 0, got {alpha!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        if radius is not None and not (isinstance(radius, int | float) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius: expected a finite number > 0 or None, got {radius!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every: expected an int >= 0, got {check_every!r}")
        inner, self.ddp = unwrap_ddp(model)
        refuse_static_graph(self.ddp)
        refuse_fsdp(inner, "model")
        self.model = getattr(inner, "_orig_mod", inner)  # a compiled model's own module, run eagerly
        named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: expected at least one trainable parameter (requires_grad=True), found none")
        self.names, self.params = [k for k, _ in named], [p for _, p in named]
        likelihood = get_likelihood(likelihood)
        self.objective = {"fisher": lambda: GradientNorm(likelihood, "sampled"),
                          "gp": lambda: GradientNorm(likelihood, "true"),
                          "gpr": lambda: GradientNorm(likelihood, "random"),
                          "trace": lambda: BatchTrace(likelihood),
                          "gpx": lambda: InputGradientNorm(likelihood)}[objective]()
        if method not in self.objective.methods:
            raise ValueError(f"method: objective {objective!r} is differentiated by {self.objective.methods}, got "
                             f"{method!r}")
        self.method = FiniteDifference(radius) if method == "finite_difference" else DoubleBackward()
        if self.method.name == "double_backward" or objective in ("trace", "gpx"):
            _refuse_sync_batchnorm(self.model)
        self.group = process_group(self.ddp, scope)
        if self.group is not None:
            check_same_model(self.group, self.params, "model")
        self.alpha, self.every, self.check_every = float(alpha), every, check_every
        self.report_trace = bool(report_trace)
        if logits is not None and not callable(logits):
            raise TypeError(f"logits: expected a callable from the model's output to its logits, got "
                            f"{type(logits).__name__}")
        self.logits = logits
        self._draws = LabelGenerator(generator, stream=rank(self.group))
        self.steps = 0  # calls of backward / penalty_term, the penalty's steps included or not
        self._fd_steps = 0
        self._watched: tuple | None = None  # (capture, the watched output's tensors) of the last watch()
        self.last_result: PenaltyResult | None = None

    # ---- named constructors: the paper's baselines ------------------------------------------------

    @classmethod
    def gp(cls, model: nn.Module, alpha: float, **kwargs) -> FisherPenalty:
        """GP: the gradient norm at the true labels (pass them as ``labels``)."""
        return cls(model, alpha, objective="gp", **kwargs)

    @classmethod
    def gpr(cls, model: nn.Module, alpha: float, **kwargs) -> FisherPenalty:
        """GPr: the gradient norm at uniformly random labels."""
        return cls(model, alpha, objective="gpr", **kwargs)

    @classmethod
    def gpx(cls, model: nn.Module, alpha: float, **kwargs) -> FisherPenalty:
        """GPx: the per-example input-gradient norm at the true labels (:meth:`backward` only)."""
        return cls(model, alpha, objective="gpx", **kwargs)

    # ---- entry points -----------------------------------------------------------------------------

    def backward(self, inputs: Union[Tensor, tuple], loss: Callable[[Tensor], Tensor],
                 labels: Tensor | None = None) -> tuple[Tensor, PenaltyResult | None]:
        """The step's whole backward: one forward of the model on ``inputs`` (the training forward:
        BatchNorm updates its statistics once, as in a plain step), then the gradient of
        ``loss(output)`` plus the penalty's, added into the parameters' ``.grad``. A parameter that
        gets no gradient keeps its ``.grad``. On steps skipped by ``every`` it is a plain step.

        Args:
            inputs: the batch: a tensor, or a tuple of the model's positional arguments.
            loss: the training loss, a callable from the model's output to a scalar tensor.
            labels: the step's labels: the true labels for 'gp' and 'gpx'; for the others they
                replace the drawn ones (tests, reproducibility).

        Returns:
            The training loss (detached) and the step's :class:`PenaltyResult` (None when skipped).

        Raises:
            FloatingPointError: the loss, the penalty or the step's gradient is not finite (naming
                the step); nothing is written into ``.grad``.
        """
        if not callable(loss):
            raise TypeError(f"loss: expected a callable taking the model's output and returning a scalar loss, "
                            f"got {type(loss).__name__}")
        step = self._next_step()
        # Across processes, each stretch of local work ends in an agreement (one tiny collective):
        # a rank that fails there makes every rank raise, instead of leaving the others waiting in
        # the step's next collective (DDP's forward, the gbar all-reduce).
        with self._agreement():
            args = as_args(inputs)
        if not self._due(step):  # a plain step
            with torch.enable_grad():
                with self._agreement():
                    train_loss = _scalar_loss(loss, (self.ddp or self.model)(*args))
                    _check_finite(step, "the training loss", train_loss)
                train_loss.backward()
            return train_loss.detach(), None
        if isinstance(self.objective, InputGradientNorm):
            args = (args[0].detach().requires_grad_(),) + args[1:]
        fd = isinstance(self.method, FiniteDifference)
        rng, capture = RandomState(), self._new_capture()
        buffers, decisions = (BufferState(self.model), FrozenDecisions()) if fd else (None, None)
        versions = tuple(a._version for a in args if isinstance(a, Tensor))
        with torch.enable_grad(), torch.compiler.set_stance("force_eager"), (capture or contextlib.nullcontext()):
            with self._agreement():
                with decisions.watching(self.model) if fd else contextlib.nullcontext():
                    output = self._forward(args, capture)
                train_loss = _scalar_loss(loss, output)
                _check_finite(step, "the training loss", train_loss)
                self._refuse_outside_leaves(train_loss, args)
                output = select_logits(self.logits, output)
                self.objective.likelihood.check(output)
                step_labels = self._step_labels(output, labels)
            batch = Batch(self.params, output, args, step_labels, capture, self._shards(output))
            rerun = Rerun(self.model, self.names, rng, buffers, decisions, loss, versions, self.logits)
            outcome = self.method.gradients(self.objective, batch, train_loss, self.alpha, rerun,
                                            fd and self._check_due())
        result = self._result(step, batch, outcome.value, outcome.method, outcome.check)
        if outcome.check is not None and not outcome.check.passed(self.method.tolerance):
            c = outcome.check
            warn(f"step {step}: the finite-difference gradient of the penalty is {c.relative_error:.3g} off the "
                 f"exact one (relative; cosine {c.cosine:.4f}; training gradient shifted by {c.training_shift:.3g}), "
                 f"more than {self.method.tolerance}; this step's gradient is the exact one, and the penalty uses "
                 "method='double_backward' from now on", stacklevel=3)
            self.method = DoubleBackward()
        grads = outcome.grads
        present = [g for g in grads if g is not None]
        with self._agreement():
            _check_finite(step, "the step's gradient", torch.stack(torch._foreach_norm(present)) if present
                          else torch.zeros(()))
        accumulate_grads(self.params, grads, self.ddp)
        self.last_result = result
        return train_loss.detach(), result

    def watch(self) -> contextlib.AbstractContextManager:
        """Context manager around the training forward whose output :meth:`penalty_term` will
        use: it hooks the layers for the free per-example norms and remembers the output."""
        return _Watch(self)

    def penalty_term(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        """The penalty as a differentiable scalar to add to the loss, from the output of the last
        watched forward (method 'double_backward'; one backward then serves both)::

            with penalty.watch():
                logits = model(x)
            (F.cross_entropy(logits, y) + penalty.penalty_term(logits)).backward()

        On steps skipped by ``every`` it is a zero without a graph. The step's
        :class:`PenaltyResult` is in ``penalty.last_result`` (None when skipped).
        """
        if not isinstance(self.method, DoubleBackward):
            raise ValueError(f"method: penalty_term differentiates the penalty's graph; expected 'double_backward', "
                             f"got {self.method.name!r} (use backward(inputs, loss) for the finite difference)")
        if isinstance(self.objective, InputGradientNorm):
            raise ValueError("objective: 'gpx' differentiates w.r.t. the inputs; use backward(inputs, loss, labels)")
        if self._watched is None:
            raise RuntimeError("penalty_term: no watched forward; run the model inside `with penalty.watch():` first")
        (capture, produced), self._watched = self._watched, None
        try:
            step = self._next_step()
            self.last_result = None
            with self._agreement():
                if not isinstance(output, Tensor) or not any(output is t for t in produced):
                    raise foreign_output(output)
                step_labels = self._step_labels(output, labels) if self._due(step) else None
            if not self._due(step):
                return output.new_zeros(())
            with torch.enable_grad():
                batch = Batch(self.params, output, (), step_labels, capture, self._shards(output))
                value = self.objective.value(batch, create_graph=True)
            result = self._result(step, batch, value, self.method.name, None)
            term = self.alpha * value.value  # the caller's backward differentiates it (see methods.DoubleBackward)
            _check_finite(step, "the penalty", term)
            self.last_result = result
            return term
        finally:
            if capture is not None:
                capture.clear()

    # ---- resuming ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: the step count (for ``every`` and the
        finite difference's check schedule), the method in use (after a fallback to the exact one)
        and the position of the label draws."""
        return {"steps": self.steps, "fd_steps": self._fd_steps, "method": self.method.name,
                "labels": self._draws.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (saved from a penalty built with the same arguments)."""
        if state["method"] not in (self.method.name, DoubleBackward.name):
            raise ValueError(f"state: saved with method {state['method']!r}, this penalty uses {self.method.name!r}")
        self.steps, self._fd_steps = int(state["steps"]), int(state["fd_steps"])
        if state["method"] != self.method.name:  # the saved run had fallen back to the exact method
            self.method = DoubleBackward()
        self._draws.load_state_dict(state["labels"])

    # ---- the step's parts -------------------------------------------------------------------------

    def _refuse_outside_leaves(self, train_loss: Tensor, args: tuple) -> None:
        """The step writes the model's parameters' gradients only: a loss that also trains another
        tensor (a learnable temperature) would leave it without its gradient."""
        known = {id(p) for p in self.params} | {id(a) for a in args if isinstance(a, Tensor)}
        outside = [leaf for key, (leaf, _) in leaf_uses(train_loss).items() if key not in known]
        if outside:
            shapes = ", ".join(str(tuple(t.shape)) for t in outside[:3])
            raise ValueError(f"loss: trains {len(outside)} tensor(s) outside the model (shapes {shapes}); "
                             "FisherPenalty writes the model's parameters' gradients only: register them as "
                             "parameters of the model, or detach them in the loss")

    def _next_step(self) -> int:
        self.steps += 1
        return self.steps

    def _due(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def _check_due(self) -> bool:
        """On the finite difference's penalty steps 1, 2, 4, ..., then every ``check_every``-th."""
        self._fd_steps += 1
        k = self._fd_steps
        if self.check_every == 0:
            return False
        return k % self.check_every == 0 if k >= self.check_every else (k & (k - 1)) == 0

    def _step_labels(self, output: Tensor, given: Tensor | None) -> Tensor:
        """The step's labels: given, or drawn once for the objective on the penalty's own generator."""
        return self.objective.labels(output, given, self._draws.on(output.device))

    def _new_capture(self) -> Capture | None:
        if not self.report_trace and not isinstance(self.objective, BatchTrace):
            return None
        try:
            # the free norms are optional: a model they cannot handle gives none, not an error
            return Capture(self.model, strict=isinstance(self.objective, BatchTrace))
        except ValueError:  # e.g. weight sharing: the batch penalty itself needs no per-example gradients
            if isinstance(self.objective, BatchTrace):
                raise
            return None

    def _agreement(self) -> contextlib.AbstractContextManager:
        return agreement(self.group, self.params[0].device)

    def _shards(self, output: Tensor) -> Shards | None:
        return Shards(self.group, output.shape[0], output.device) if self.group is not None else None

    def _forward(self, args: tuple, capture: Capture | None) -> Tensor:
        if capture is not None:
            capture.start()
        try:  # under DDP through its wrapper: it syncs buffers and readies its reducer for the step's gradient
            return (self.ddp or self.model)(*args)
        finally:
            if capture is not None:
                capture.stop()

    def _result(self, step: int, batch: Batch, value, method: str, check: Check | None) -> PenaltyResult:
        penalty = self.alpha * float(value.value.detach())
        _check_finite(step, "the penalty", torch.tensor(penalty))
        gbar_sqnorm = float(value.value.detach()) if value.gbar is not None else float("nan")
        per_example = value.per_example
        if self.group is None:
            trace = None if per_example is None else float(per_example.mean())
        else:  # every rank joins, with or without norms of its own: none anywhere gives none
            missing = per_example is None
            (total, none), _ = global_means(self.group, [0.0 if missing else float(per_example.double().sum()),
                                                         float(missing)], 0 if missing else per_example.numel(),
                                            self.params[0].device)
            trace = None if none > 0 or math.isnan(total) else total
        return PenaltyResult(penalty, gbar_sqnorm, batch.labels, method, per_example, check, trace)


class _Watch:
    """Hooks the layers (free norms) and remembers the tensors the model's forward returned."""

    def __init__(self, penalty: FisherPenalty):
        self.penalty = penalty

    def __enter__(self) -> FisherPenalty:
        p = self.penalty
        capture = p._new_capture()
        if capture is not None:
            capture.__enter__()
            capture.start()
        produced: list = []
        def collect(module, args, out):
            produced.extend(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor))

        # under DDP also the wrapper's outputs: with find_unused_parameters they are new tensors
        self._hooks = [m.register_forward_hook(collect) for m in (p.model, p.ddp) if m is not None]
        self._capture = capture
        p._watched = (capture, produced)
        return p

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._capture is not None:
            self._capture.unhook()  # the records stay for penalty_term()


def _refuse_sync_batchnorm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.SyncBatchNorm):
            raise ValueError(f"model: {name or 'the model'} is a SyncBatchNorm, which has no double backward; use "
                             "method='finite_difference' (objectives 'fisher', 'gp', 'gpr'), or BatchNorm / GroupNorm")


def _scalar_loss(loss: Callable, output) -> Tensor:
    value = loss(output)
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
        got = f"a tensor of shape {tuple(value.shape)}, requires_grad={value.requires_grad}" \
            if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"loss: expected the callable to return a scalar tensor with a graph to the output, got {got}")
    return value.reshape(())


def _check_finite(step: int, what: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value.detach()).all()):
        raise FloatingPointError(f"step {step}: {what} is not finite ({value.detach().flatten()[:4].tolist()}); "
                                 "nothing was written into .grad")
