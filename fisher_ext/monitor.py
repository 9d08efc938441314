"""The trace of the Fisher information matrix, Tr(F), for any PyTorch model.

``Tr(F) = (1/N) sum_n ||g_n||^2`` with ``g_n`` the gradient of ``-log p(yhat_n | x_n)`` over
all trainable parameters (docs/design.md, section 1). Labels ``yhat_n`` are sampled from the model's
predictive distribution (``estimator='mc'``, K samples), summed over with their
probabilities (``'exact'``, categorical outputs, one backward per class), or the true labels
(``'empirical'``).

Per-example norms come from one backward per label draw: module hooks capture each
parameter-owning module's input and output gradient (:mod:`fisher_ext.capture`), and :mod:`fisher_ext.rules`
turns them into per-example squared norms (the compiled ops for Linear/Conv, closed forms
for norm layers and Embedding, a torch.func fallback for anything else). Parameter
``.grad`` is never touched.

Two entry points: :func:`fisher_trace` (one batch, its own forward) and
:class:`FisherTraceMonitor` (reuse the training forward, or a fixed probe set; or, through
:meth:`FisherTraceMonitor.backward`, the training backward itself: the empirical Fisher's Tr(F)
with no extra pass).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Union
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._schemas import check_precision
from .capture import Capture, as_args, foreign_output, select_logits
from .distributed import (accumulate_grads, agreement, check_same_model, gather, global_means, process_group, rank,
                          refuse_fsdp, refuse_static_graph, unwrap_ddp)
from .estimators import LabelGenerator, estimate_norms
from .fused_backward import backward_with_norms, leaf_uses
from .likelihoods import Likelihood, get_likelihood


@dataclass
class FisherTraceResult:
    """One Tr(F) estimate.

    Attributes:
        trace: the estimate of Tr(F), ``per_example.mean()``.
        per_example: ``(N,)`` each example's squared gradient norm over all parameters
            (averaged over label samples; probability-weighted for the exact estimator).
        per_parameter: ``{name: mean over examples of that parameter's squared norm}``,
            keyed like ``model.named_parameters()``; the values sum to ``trace``.
        coverage: ``{name: rule}``: which rule produced each parameter's share ('linear', 'conv',
            'conv_transpose', 'layer_norm', 'group_norm', 'batch_norm', 'embedding', 'attention',
            'recurrent', a registered rule's name, 'fallback' (the exact re-run of the module, or of
            the closest ancestor that uses the parameter directly), or 'unused' for a parameter the
            loss does not depend on). Frozen parameters are not part of Tr(F) and not listed.
    """

    trace: float
    per_example: torch.Tensor
    per_parameter: dict[str, float]
    coverage: dict[str, str]
    global_standard_error: float | None = field(default=None, repr=False)  # across processes

    @property
    def standard_error(self) -> float:
        """Standard error of ``trace`` over the examples (0 for a single example); across
        processes, over every rank's examples."""
        if self.global_standard_error is not None:
            return self.global_standard_error
        n = self.per_example.numel()
        return float(self.per_example.std() / math.sqrt(n)) if n > 1 else 0.0


def _result(capture: Capture, per_example: torch.Tensor, totals: dict[str, torch.Tensor]) -> FisherTraceResult:
    coverage, per_parameter = {}, {}
    for names in capture.owners.values():
        for _, full in names:
            coverage[full] = capture.rules.get(full, "unused")
            per_parameter[full] = float(totals[full].mean()) if full in totals else 0.0
    return FisherTraceResult(float(per_example.mean()), per_example, per_parameter, coverage)


def fisher_trace(
    model: nn.Module,
    inputs: Union[torch.Tensor, tuple],
    *,
    likelihood: Union[str, Likelihood] = "categorical",
    estimator: str = "mc",
    labels: torch.Tensor | None = None,
    samples: int = 1,
    generator: torch.Generator | None = None,
    logits: Callable[[Any], torch.Tensor] | None = None,
    precision: str = "full",
) -> FisherTraceResult:
    """Tr(F) of ``model`` on one batch, with its per-example and per-parameter parts.

    Args:
        model: any module; its train/eval mode is used as is (BatchNorm needs eval mode).
        inputs: the batch (a tensor, or a tuple of positional arguments of ``model``).
        likelihood: 'categorical' (logits ``(N, C)`` or ``(N, T, C)``), 'bernoulli', 'gaussian'
            (unit variance; pass ``fisher_ext.likelihoods.Gaussian(variance)`` for another), or
            an object with ``check``, ``sample`` and ``nll``.
        estimator: 'mc' (labels sampled from the model, ``samples`` draws), 'exact'
            (categorical ``(N, C)``: every class weighted by its probability), 'empirical'
            (``labels`` are the true labels).
        labels: fixed labels; for 'mc' they replace the sampled ones (tests, reproducibility).
        samples: label draws per example for 'mc'.
        generator: the random generator of the label draws; default: one of its own seeded from
            ``torch.initial_seed()`` (the global random stream is not drawn from).
        logits: where the likelihood's parameters are in the model's output, for a model that returns
            more than them (``lambda out: out[0]``, ``lambda out: out["logits"]``).
        precision: 'full' (default: float32 accumulation of the captured tensors as they are) or
            'bf16' (the Linear and Conv norms may use bfloat16 GEMMs where the CPU has native ones
            (AVX512-BF16, AMX) and they are faster, at a relative error of about 2e-4 per example;
            the same values as 'full' elsewhere; docs/precision.md).
    """
    return _trace(model, inputs, get_likelihood(likelihood), estimator, labels, samples, LabelGenerator(generator),
                  logits, precision)


def _trace(model: nn.Module, inputs, likelihood: Likelihood, estimator: str, labels: torch.Tensor | None,
           samples: int, draws: LabelGenerator, logits: Callable | None = None,
           precision: str = "full") -> FisherTraceResult:
    args = as_args(inputs)
    capture = Capture(model, precision=precision)  # refuses what the rules cannot do before anything runs
    with capture, torch.enable_grad():
        capture.start()
        output = capture.model(*args)
        capture.stop()
        output = select_logits(logits, output)
        per_example, totals = estimate_norms(capture, output, likelihood, estimator, labels, samples, draws,
                                             retain_graph=False)
        return _result(capture, per_example, totals)


class FisherTraceMonitor:
    """Tr(F) during training, from the training forward or over a fixed probe set.

    In a training loop (one extra backward on the steps it runs, no extra forward)::

        monitor = FisherTraceMonitor(model, every=10)
        for step, (x, y) in enumerate(loader):
            with monitor.watch():
                logits = model(x)
            result = monitor.estimate(logits)   # None on steps it skips
            loss_fn(logits, y).backward()      # .grad is exactly what it would be without the monitor

    Over a probe set (the paper's protocol: a fixed subset of training examples), in chunks::

        result = monitor.probe(probe_inputs, chunk_size=128)

    Hooks are attached only inside ``watch()`` and ``probe()`` and removed on exit.

    Across the processes of torch.distributed (a DistributedDataParallel model, or a process group
    initialized; ``scope='global'``, the default there) each rank's per-example norms are its own
    examples', while ``trace`` and ``per_parameter`` are the global batch's means, the same on every
    rank (:meth:`gather` collects the per-example values); :meth:`probe` splits the probe set
    across the ranks; :meth:`backward` writes its gradient through DDP's reducer. ``scope='local'``:
    each rank's own batch.

    ``precision='bf16'`` lets the Linear and Conv norms of :meth:`estimate` and :meth:`probe` use
    bfloat16 GEMMs (as :func:`fisher_trace`); :meth:`backward`'s come from the training gradient's
    own pass, in full precision.
    """

    def __init__(self, model: nn.Module, *, likelihood: Union[str, Likelihood] = "categorical",
                 estimator: str = "mc", samples: int = 1, every: int = 1, generator: torch.Generator | None = None,
                 logits: Callable[[Any], torch.Tensor] | None = None, scope: str | None = None,
                 precision: str = "full"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        check_precision(precision)
        self.precision = precision
        self.model, self.ddp = unwrap_ddp(model)
        refuse_fsdp(self.model, "model")
        self.group = process_group(self.ddp, scope)
        if self.group is not None:
            check_same_model(self.group, [p for p in self.model.parameters() if p.requires_grad], "model")
        self.likelihood = get_likelihood(likelihood)
        self.estimator, self.samples, self.every = estimator, samples, every
        self._draws = LabelGenerator(generator, stream=rank(self.group))
        self.logits = logits  # for probe(); estimate() is given the logits tensor itself
        self.history: list[tuple[int, float]] = []
        self._step = 0
        self._capture: Capture | None = None
        self._wrapper_outputs: list = []  # under DDP, the wrapper's output tensors of the watched forward

    def state_dict(self) -> dict:
        """The step count, the history and the position of the label draws (to resume exactly)."""
        return {"step": self._step, "history": list(self.history), "labels": self._draws.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._step, self.history = int(state["step"]), [tuple(h) for h in state["history"]]
        self._draws.load_state_dict(state["labels"])

    def watch(self) -> _Watch:
        """Context manager around the training forward whose output :meth:`estimate` will use."""
        return _Watch(self)

    def estimate(self, output: torch.Tensor, labels: torch.Tensor | None = None) -> FisherTraceResult | None:
        """Tr(F) from the output of the last watched forward (on every ``every``-th call, else None).

        The graph is kept for the caller's own backward; parameter ``.grad`` is not touched.
        """
        self._step += 1
        if (self._step - 1) % self.every:
            return None
        with self._agreement():  # across processes, a failure here makes every rank raise
            if self._capture is None or not self._capture.records:
                raise RuntimeError("estimate: no watched forward; run the model inside `with monitor.watch():` first")
            if not self._capture.produced(output) and not any(output is t for t in self._wrapper_outputs):
                raise foreign_output(output)
            per_example, totals = estimate_norms(self._capture, output, self.likelihood, self.estimator, labels,
                                                 self.samples, self._draws, retain_graph=True)
            local = _result(self._capture, per_example, totals)
        result = self._global(local)
        self.history.append((self._step - 1, result.trace))
        return result

    def gather(self, result: FisherTraceResult) -> torch.Tensor:
        """Every rank's per-example values of ``result`` in rank order, on every rank (a collective
        call; one process: ``result.per_example``)."""
        return result.per_example if self.group is None else gather(self.group, result.per_example)

    def _agreement(self):
        return agreement(self.group, next((p.device for p in self.model.parameters()), None))

    def _global(self, result: FisherTraceResult) -> FisherTraceResult:
        """Across processes: ``trace`` and ``per_parameter`` over the global batch."""
        if self.group is None:
            return result
        n = result.per_example.numel()
        names = sorted(result.per_parameter)  # every trainable parameter of the model: the same on every rank
        values = result.per_example.double()
        means, total = global_means(self.group, [result.per_parameter[k] * n for k in names]
                                    + [float(values.sum()), float(values.square().sum())], n)
        trace, square = means[-2], means[-1]
        se = math.sqrt(max(square - trace * trace, 0.0) * total / (total - 1) / total) if total > 1 else 0.0
        return FisherTraceResult(trace, result.per_example, dict(zip(names, means[:-2])), result.coverage, se)

    def backward(self, losses: torch.Tensor, *, reduction: str = "mean") -> FisherTraceResult | None:
        """The training backward of the watched forward's per-example losses, with the Tr(F) of the
        empirical Fisher (each example's gradient at its own loss, whatever ``estimator`` says) from
        the same pass::

            with monitor.watch():
                logits = model(x)
            result = monitor.backward(F.cross_entropy(logits, y, reduction="none"))
            optimizer.step()

        It adds into ``.grad`` what ``losses.mean().backward()`` (``reduction='sum'``:
        ``losses.sum()``) would, for every tensor that backward reaches. Linear and Conv layers take
        their weight gradients from the fused ops (:func:`fisher_ext.linear_grad_sqnorm`), so their
        norms cost little more than the weight gradient itself; other layers get autograd's gradient
        and their rule's norms. On steps skipped by ``every`` it is that plain backward, and
        returns None.

        Args:
            losses: ``(N,)`` per-example losses of the watched forward's output, ``losses[n]``
                depending on example n only. A term that reads the model's parameters outside its
                forward (weight decay) is refused: it is no example's gradient, so it belongs in a
                separate backward. Tensors outside the model that require grad (a learnable
                temperature) get their ``.grad``; Tr(F) covers the model's parameters.
            reduction: 'mean' or 'sum', the training loss made of ``losses``; the norms are those of
                each example's own loss either way.

        Raises:
            ValueError: the losses do not come from the watched forward, read the model's parameters
                directly, or (after ``.grad`` is written) do not give per-example norms (a loss that
                mixes examples, or a model the rules refuse).
        """
        with self._agreement():  # across processes, a failure here makes every rank raise
            loss, uses = self._checked_backward_loss(losses, reduction)
        capture = self._capture
        self._step += 1
        try:
            if (self._step - 1) % self.every:
                loss.backward()
                return None
            with self._agreement():
                n = losses.shape[0]
                capture.find_batch_dims(losses)
                params = capture.params + [leaf for key, (leaf, _) in uses.items()
                                           if key not in capture.param_ids]  # other tensors the loss reaches
                errors: list = []
                grads, norms = backward_with_norms(capture, loss, params, n,
                                                   scale=float(n) if reduction == "mean" else 1.0, retain_graph=False,
                                                   norms_required=False, errors=errors, uses=uses)
            accumulate_grads(params, grads, self.ddp)
            with self._agreement():
                if errors:
                    raise ValueError(f"losses: no per-example norms ({errors[0]}); .grad holds this step's gradient. "
                                     "losses[n] must be example n's own loss, of the watched forward's batch, in "
                                     "order") from errors[0]
        finally:
            capture.clear()
        totals = {k: v.double() for k, v in norms.items()}  # as estimate() gives them
        per_example = torch.stack(list(totals.values())).sum(0) if totals else torch.zeros(
            n, dtype=torch.float64, device=losses.device)
        result = self._global(_result(capture, per_example, totals))
        self.history.append((self._step - 1, result.trace))
        return result

    def _checked_backward_loss(self, losses, reduction: str):
        """backward()'s loss from ``losses``, and its leaves' uses, checked."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        refuse_static_graph(self.ddp)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.requires_grad:
            got = f"shape {tuple(losses.shape)}{'' if losses.requires_grad else ' not requiring grad'}" \
                if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses: expected the (N,) per-example losses of the watched forward (reduction='none'), "
                             f"with their graph; got {got}")
        capture = self._capture
        if capture is None or not capture.records:
            raise RuntimeError("backward: no watched forward since the last estimate() or backward(); run the model "
                               "inside `with monitor.watch():` before each call")
        loss = losses.mean() if reduction == "mean" else losses.sum()
        nodes: set = set()
        uses = leaf_uses(loss, seen=nodes)
        if not any(o.grad_fn in nodes for o in capture.output_leaves if o.grad_fn is not None):
            raise ValueError("losses: expected the per-example losses of the watched forward's output; these do not "
                             "depend on it (a forward run outside `with monitor.watch():`?)")
        in_forward = leaf_uses(*(o for o in capture.output_leaves if o.grad_fn is not None))
        for name, p in zip(capture.param_names, capture.params):
            if uses.get(id(p), (p, 0))[1] > in_forward.get(id(p), (p, 0))[1]:
                raise ValueError(f"losses: read the parameter {name} outside the model's forward (weight decay?); "
                                 "that term is no example's gradient: backpropagate it separately, after "
                                 "monitor.backward(losses)")
        return loss, uses

    def probe(self, inputs: Union[torch.Tensor, Iterable], *, chunk_size: int = 128, eval_mode: bool = True,
              progress: bool = True) -> FisherTraceResult:
        """Tr(F) over a fixed probe set: a tensor (split into chunks) or an iterable of batches
        (tensors, or tuples whose first element is the input).

        Memory is that of one chunk. ``eval_mode`` puts the model in eval mode for the probe
        (dropout off, BatchNorm on running statistics) and restores its modes after. Across
        processes each rank takes its part (of a tensor: a contiguous slice; of an iterable, which
        must have a length: every k-th batch) and the result is the whole probe set's.
        """
        with self._agreement():  # across processes, a failure here makes every rank raise
            local = self._probe_local(self._my_part(inputs) if self.group is not None else inputs, chunk_size,
                                      eval_mode, progress)
        return self._global(local)

    def _probe_local(self, inputs, chunk_size: int, eval_mode: bool, progress: bool) -> FisherTraceResult:
        if isinstance(inputs, torch.Tensor):
            batches: Iterable = inputs.split(chunk_size)
            total = math.ceil(inputs.shape[0] / chunk_size)
        else:
            batches, total = inputs, (len(inputs) if hasattr(inputs, "__len__") else None)
        modes = {m: m.training for m in self.model.modules()}
        if eval_mode:
            self.model.eval()
        try:
            parts, per_param, coverage = [], {}, {}
            for i, batch in enumerate(batches):
                x = batch[0] if isinstance(batch, tuple | list) else batch
                r = _trace(self.model, x, self.likelihood, self.estimator, None, self.samples, self._draws, self.logits,
                           self.precision)
                parts.append(r.per_example)
                for k, v in r.per_parameter.items():
                    per_param[k] = per_param.get(k, 0.0) + v * r.per_example.numel()
                coverage = r.coverage
                if progress:
                    done = sum(p.numel() for p in parts)
                    print(f"\rprobe: chunk {i + 1}{'/' + str(total) if total else ''}, {done} examples, "
                          f"Tr(F) so far {float(torch.cat(parts).mean()):.6g}", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)
        finally:
            for m, training in modes.items():
                m.train(training)
        if not parts:
            raise ValueError("inputs: expected at least one probe example, got none")
        per_example = torch.cat(parts)
        n = per_example.numel()
        return FisherTraceResult(float(per_example.mean()), per_example, {k: v / n for k, v in per_param.items()},
                                 coverage)

    def _my_part(self, inputs):
        import torch.distributed as dist

        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if isinstance(inputs, torch.Tensor):
            if inputs.shape[0] < world:
                raise ValueError(f"inputs: a probe set split across {world} processes needs at least {world} "
                                 f"examples, got {inputs.shape[0]}")
            return inputs.tensor_split(world)[rank]
        if not hasattr(inputs, "__len__"):
            raise TypeError(f"inputs: across {world} processes, probe() splits an iterable of batches by its length; "
                            f"got a {type(inputs).__name__} without one (pass a list, a tensor or a DataLoader)")
        if len(inputs) < world:
            raise ValueError(f"inputs: a probe set split across {world} processes needs at least {world} batches, got "
                             f"{len(inputs)}")
        return [batch for i, batch in enumerate(inputs) if i % world == rank]


class _Watch:
    def __init__(self, monitor: FisherTraceMonitor):
        self.monitor = monitor

    def __enter__(self):
        monitor = self.monitor
        if monitor._capture is not None:  # the previous step's hooks and records
            monitor._capture.__exit__()
        monitor._capture = Capture(monitor.model, precision=monitor.precision).__enter__()
        monitor._capture.start()
        monitor._wrapper_outputs = []
        self._hook = None if monitor.ddp is None else monitor.ddp.register_forward_hook(  # new tensors with
            lambda m, args, out: monitor._wrapper_outputs.extend(  # find_unused_parameters
                t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)))
        return monitor

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
        self.monitor._capture.unhook()  # the records stay for estimate()
