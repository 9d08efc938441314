"""The trace of the Fisher information matrix, Tr(F), for any PyTorch model.

``Tr(F) = (1/N) sum_n ||g_n||^2`` with ``g_n`` the gradient of ``-log p(yhat_n | x_n)`` over
all trainable parameters (docs/design.md, section 1). Labels ``yhat_n`` are sampled from the model's
predictive distribution (``estimator='mc'``, K samples), summed over with their
probabilities (``'exact'``, categorical outputs, one backward per class), or the true labels
(``'empirical'``).

Per-example norms come from one backward per label draw: module hooks capture each
parameter-owning module's input and output gradient, and :mod:`fisher_ext.layer_rules`
turns them into per-example squared norms (the compiled ops for Linear/Conv, closed forms
for norm layers and Embedding, a torch.func fallback for anything else). Parameter
``.grad`` is never touched.

Two entry points: :func:`fisher_trace` (one batch, its own forward) and
:class:`FisherTraceMonitor` (reuse the training forward, or a fixed probe set).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import torch
from torch import nn

from .layer_rules import UnsupportedModuleError, closed_form_norms, fallback_rule, linear_calls_rule, rule_for
from .likelihoods import Likelihood, get_likelihood

ESTIMATORS = ("mc", "exact", "empirical")


@dataclass
class FisherTraceResult:
    """One Tr(F) estimate.

    Attributes:
        trace: the estimate of Tr(F), ``per_example.mean()``.
        per_example: ``(N,)`` each example's squared gradient norm over all parameters
            (averaged over label samples; probability-weighted for the exact estimator).
        per_parameter: ``{name: mean over examples of that parameter's squared norm}``,
            keyed like ``model.named_parameters()``; the values sum to ``trace``.
        coverage: ``{name: rule}``: which rule produced each parameter's share
            ('linear', 'conv', 'layer_norm', 'group_norm', 'batch_norm', 'embedding',
            'linear_calls' (a parameter a module uses through F.linear, like nn.MultiheadAttention's
            projections), 'fallback', or 'unused' for a parameter the loss does not depend on).
    """

    trace: float
    per_example: torch.Tensor
    per_parameter: dict[str, float]
    coverage: dict[str, str]

    @property
    def standard_error(self) -> float:
        """Standard error of ``trace`` over the examples (0 for a single example)."""
        n = self.per_example.numel()
        return float(self.per_example.std() / math.sqrt(n)) if n > 1 else 0.0


@dataclass
class _Record:
    args: tuple
    kwargs: dict
    outputs: tuple  # tensor outputs that require grad (None elsewhere)
    grads: list = field(default_factory=list)
    versions: tuple = ()  # the outputs' version counters when produced (in-place use changes them)


class _Capture:
    """Forward hooks on every module that owns trainable parameters (and on the model itself),
    recording one forward's inputs and, through tensor hooks on the outputs, the output
    gradients of each backward.

    Tensor hooks (not full backward hooks) keep working when the output is later modified
    in place (``ReLU(inplace=True)``): they fire with the gradient of the value as produced.
    A parameter that gets a gradient although its own module never ran (used directly by an
    ancestor, like nn.MultiheadAttention's out_proj) goes to the fallback of the closest
    ancestor that ran; the model itself is the last resort.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.owners: dict[nn.Module, list[tuple[str, str]]] = {}  # module -> [(local name, full name)]
        self.prefix: dict[nn.Module, str] = {}
        seen: dict[int, str] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            self.prefix.setdefault(module, prefix)
            for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
                if not p.requires_grad:
                    continue
                full = f"{prefix}.{local}" if prefix else local
                if id(p) in seen and seen[id(p)] != full:
                    raise UnsupportedModuleError(
                        f"model: parameter {full!r} is the same tensor as {seen[id(p)]!r} (weight sharing); its "
                        "per-example gradient is the sum of both uses, which per-module rules cannot form")
                seen[id(p)] = full
                self.owners.setdefault(module, []).append((local, full))
        if not self.owners:
            raise ValueError("model: expected at least one trainable parameter (requires_grad=True), found none")
        self.param_names = [full for names in self.owners.values() for _, full in names]
        self._module_of = {full: m for m, names in self.owners.items() for _, full in names}
        by_name = dict(model.named_parameters(remove_duplicate=False))
        self.params = [by_name[name] for name in self.param_names]
        self._param = dict(zip(self.param_names, self.params))
        self.records: dict[nn.Module, _Record] = {}
        self.recording = False
        self.collecting = False  # output hooks store gradients only during our own backward
        self.rules: dict[str, str] = {}  # full parameter name -> rule of the last backward
        self._handles: list = []

    def __enter__(self) -> "_Capture":
        hooked = list(self.owners) + ([self.model] if self.model not in self.owners else [])
        self._handles = [m.register_forward_hook(self._hook(m), with_kwargs=True) for m in hooked]
        return self

    def __exit__(self, *exc) -> None:
        self.unhook()
        self.clear()

    def unhook(self) -> None:
        """Stops recording and removes the forward hooks; the records stay."""
        self.recording = False
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        """Drops the records. Each output's tensor hook refers to its record, which refers to the
        output: emptying the records breaks that cycle, so a step's graph is freed at once rather
        than by a later garbage collection (measured: otherwise memory grows and a ResNet-18
        estimate slows from 1.0 to 2.0 s by the third step)."""
        for record in self.records.values():
            record.args, record.kwargs, record.outputs, record.grads = (), {}, (), []
        self.records = {}

    def _hook(self, module: nn.Module):
        def hook(mod, args, kwargs, output):
            if not self.recording:
                return
            if module in self.records:
                raise UnsupportedModuleError(
                    f"{type(module).__name__} ({self.prefix[module] or 'the model'}): called more than once in one forward; "
                    "its per-example gradient sums over the calls, which per-call rules cannot form")
            outs = output if isinstance(output, tuple) else (output,)
            record = _Record(args, kwargs, tuple(o if isinstance(o, torch.Tensor) and o.requires_grad else None
                                                 for o in outs))
            record.grads = [None] * len(outs)
            record.versions = tuple(o._version if o is not None else 0 for o in record.outputs)
            for i, o in enumerate(record.outputs):
                if o is not None:
                    o.register_hook(self._grad_slot(record, i))
            self.records[module] = record

        return hook

    def _grad_slot(self, record: _Record, i: int):
        def store(g):
            if self.collecting:  # not during the caller's own backward
                record.grads[i] = g
        return store

    def start(self) -> None:
        self.clear()
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def norms(self, per_example_loss_sum: torch.Tensor, n: int, retain_graph: bool) -> dict[str, torch.Tensor]:
        """One backward of ``sum_n l_n``; returns ``{full parameter name: (N,) squared norms}``."""
        for record in self.records.values():
            record.grads = [None] * len(record.grads)
        # The backward asks for each module output's gradient directly, so it stops at the first
        # layer's output and forms no weight gradient. An output modified in place since (e.g. by
        # ReLU(inplace=True)) is no longer the value the module produced: there the module's
        # parameters are asked for instead, and the output's tensor hook catches the gradient.
        # Parameters of modules that did not run are asked for too, to learn whether they are used.
        targets, slots = [], []
        for module, record in self.records.items():
            for i, o in enumerate(record.outputs):
                if o is not None and o._version == record.versions[i]:
                    targets.append(o)
                    slots.append((record, i))
                elif o is not None:
                    for local, full in self.owners.get(module, []):
                        targets.append(self._param[full])
                        slots.append(None)
        unrecorded = [(i, name) for i, name in enumerate(self.param_names) if self._module_of[name] not in self.records]
        for i, _ in unrecorded:
            targets.append(self.params[i])
            slots.append(None)
        self.collecting = True
        try:
            grads = torch.autograd.grad(per_example_loss_sum, targets, retain_graph=retain_graph, allow_unused=True)
        finally:
            self.collecting = False
        for slot, g in zip(slots, grads):
            if slot is not None:
                slot[0].grads[slot[1]] = g
        used = {name for (_, name), g in zip(unrecorded, grads[len(grads) - len(unrecorded):]) if g is not None}
        del grads
        return self.norms_from_grads(n, used)

    def norms_from_grads(self, n: int, used_unrecorded: set[str], scale: float = 1.0,
                         differentiable: bool = False) -> dict[str, torch.Tensor]:
        """Per-example norms from the output gradients the hooks caught in the last backward.

        ``used_unrecorded``: the parameters of modules that did not run which the loss depends on.
        ``scale``: multiplies the caught gradients (e.g. N for a mean loss, docs/design.md section 2).
        ``differentiable``: keep the graph (inputs and gradients caught with ``create_graph``), so
        the norms can be differentiated w.r.t. the parameters; only closed-form rules allow it.
        """
        if scale != 1.0:
            for record in self.records.values():
                record.grads = [g * scale if g is not None else None for g in record.grads]
        if not differentiable:  # the norms are values, not part of a graph
            for record in self.records.values():
                record.grads = [g.detach() if g is not None else None for g in record.grads]
        used = set(used_unrecorded)
        for module, record in self.records.items():
            if any(g is not None for g in record.grads):
                used.update(full for _, full in self.owners.get(module, []))
        self.rules = {}
        todo: dict[nn.Module, list[str]] = {m: [] for m in self.records}  # fallback work per module
        for module, names in self.owners.items():
            for local, full in names:
                if full not in used:
                    continue
                if module in self.records and rule_for(module) != "fallback":
                    self.rules[full] = rule_for(module)
                    continue
                runner = self._closest_recorded(module, full)
                todo[runner].append(f"{self.prefix[module]}.{local}"[len(self.prefix[runner]):].lstrip("."))
                self.rules[full] = "fallback"
        out: dict[str, torch.Tensor] = {}
        for module, record in self.records.items():
            if all(g is None for g in record.grads):
                continue  # the loss does not depend on this call's output
            args = record.args if differentiable else _detach(record.args)
            if todo[module] and differentiable:
                raise UnsupportedModuleError(
                    f"{type(module).__name__} ({self.prefix[module] or 'the model'}): differentiating per-example "
                    "norms needs closed-form rules (Linear, Conv, LayerNorm, GroupNorm, BatchNorm-eval, Embedding); "
                    f"parameters {todo[module]} have none")
            if rule_for(module) != "fallback" and any(self.rules.get(full) for _, full in self.owners[module]):
                local = closed_form_norms(module, args, (record.grads[0],))
                out.update({dict(self.owners[module])[k]: v for k, v in local.items()})
            if todo[module]:
                kwargs = _detach(record.kwargs)
                local = linear_calls_rule(module, todo[module], args, kwargs, tuple(record.grads), n)
                if local is None:
                    local = fallback_rule(module, todo[module], args, kwargs, tuple(record.grads), n)
                else:
                    self.rules.update({self._full(module, k): "linear_calls" for k in local})
                out.update({self._full(module, k): v for k, v in local.items()})
        return out

    def _full(self, module: nn.Module, local: str) -> str:
        return f"{self.prefix[module]}.{local}" if self.prefix[module] else local

    def _closest_recorded(self, module: nn.Module, full: str) -> nn.Module:
        """The deepest module that ran in this forward and contains ``module``."""
        best = None
        for candidate in self.records:
            prefix = self.prefix[candidate]
            if candidate is module or prefix == "" or self.prefix[module].startswith(prefix + "."):
                if best is None or len(prefix) > len(self.prefix[best]):
                    best = candidate
        if best is None:
            raise UnsupportedModuleError(f"{full}: receives a gradient, but neither its module nor an ancestor "
                                         "ran as a module in this forward")
        return best


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _estimate(capture: _Capture, output: torch.Tensor, likelihood: Likelihood, estimator: str,
              labels: torch.Tensor | None, samples: int, generator: torch.Generator | None,
              retain_graph: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example totals and per-parameter (N,) norms, averaged over the label draws."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    likelihood.check(output)
    if not output.requires_grad:
        raise ValueError("output: expected a tensor that requires grad (was the forward run under torch.no_grad, "
                         "or with frozen parameters only?)")
    n = output.shape[0]
    if estimator == "empirical" and labels is None:
        raise ValueError("labels: the empirical Fisher needs the true labels, got None")

    if estimator == "exact":
        probs = likelihood.class_probabilities(output) if hasattr(likelihood, "class_probabilities") else None
        if probs is None:
            raise ValueError("estimator: 'exact' needs a categorical likelihood (class_probabilities)")
        draws = [(torch.full((n,), c, device=output.device, dtype=torch.long), probs[:, c])
                 for c in range(probs.shape[1])]
    elif labels is not None:
        draws = [(labels, None)]
    else:
        draws = [(likelihood.sample(output, generator), None) for _ in range(samples)]

    totals: dict[str, torch.Tensor] = {}
    for i, (y, weight) in enumerate(draws):
        last = i == len(draws) - 1
        norms = capture.norms(likelihood.nll(output, y).sum(), n, retain_graph=retain_graph or not last)
        for name, v in norms.items():
            v = v.double() * (weight.double() if weight is not None else 1.0 / len(draws))
            totals[name] = totals[name] + v if name in totals else v
    per_example = torch.stack(list(totals.values())).sum(0) if totals else torch.zeros(n, dtype=torch.float64,
                                                                                         device=output.device)
    return per_example, totals


def _result(capture: _Capture, per_example: torch.Tensor, totals: dict[str, torch.Tensor]) -> FisherTraceResult:
    coverage, per_parameter = {}, {}
    for module, names in capture.owners.items():
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
        generator: the random generator for sampling.
    """
    capture = _Capture(model)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with capture, torch.enable_grad():
        capture.start()
        output = model(*args)
        capture.stop()
        per_example, totals = _estimate(capture, output, get_likelihood(likelihood), estimator, labels, samples,
                                        generator, retain_graph=False)
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
    """

    def __init__(self, model: nn.Module, *, likelihood: Union[str, Likelihood] = "categorical",
                 estimator: str = "mc", samples: int = 1, every: int = 1, generator: torch.Generator | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.estimator, self.samples, self.every, self.generator = estimator, samples, every, generator
        self.history: list[tuple[int, float]] = []
        self._step = 0
        self._capture: _Capture | None = None

    def watch(self) -> "_Watch":
        """Context manager around the training forward whose output :meth:`estimate` will use."""
        return _Watch(self)

    def estimate(self, output: torch.Tensor, labels: torch.Tensor | None = None) -> FisherTraceResult | None:
        """Tr(F) from the output of the last watched forward (on every ``every``-th call, else None).

        The graph is kept for the caller's own backward; parameter ``.grad`` is not touched.
        """
        self._step += 1
        if (self._step - 1) % self.every:
            return None
        if self._capture is None or not self._capture.records:
            raise RuntimeError("estimate: no watched forward; run the model inside `with monitor.watch():` first")
        per_example, totals = _estimate(self._capture, output, self.likelihood, self.estimator, labels, self.samples,
                                        self.generator, retain_graph=True)
        result = _result(self._capture, per_example, totals)
        self.history.append((self._step - 1, result.trace))
        return result

    def probe(self, inputs: Union[torch.Tensor, Iterable], *, chunk_size: int = 128, eval_mode: bool = True,
              progress: bool = True) -> FisherTraceResult:
        """Tr(F) over a fixed probe set: a tensor (split into chunks) or an iterable of batches
        (tensors, or tuples whose first element is the input).

        Memory is that of one chunk. ``eval_mode`` puts the model in eval mode for the probe
        (dropout off, BatchNorm on running statistics) and restores its modes after.
        """
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
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                r = fisher_trace(self.model, x, likelihood=self.likelihood, estimator=self.estimator,
                                 samples=self.samples, generator=self.generator)
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


class _Watch:
    def __init__(self, monitor: FisherTraceMonitor):
        self.monitor = monitor

    def __enter__(self):
        monitor = self.monitor
        if monitor._capture is not None:  # the previous step's hooks and records
            monitor._capture.__exit__()
        monitor._capture = _Capture(monitor.model).__enter__()
        monitor._capture.start()
        return monitor

    def __exit__(self, *exc):
        self.monitor._capture.unhook()  # the records stay for estimate()
