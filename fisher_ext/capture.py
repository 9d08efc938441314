"""Capture: one forward's per-module inputs and the output gradients of a later backward.

Every module that owns trainable parameters (and the model itself) gets a forward hook that
records its inputs and its output, flattened at any depth (tuples, lists, dicts, dataclasses),
and a tensor hook on each output leaf that catches that leaf's gradient during the capture's own
backward. A thread-local ``TorchFunctionMode`` notes which module is running whenever a trainable
parameter is used, so a parameter used by another module's forward (weight tying, a parent using
a child's weight) is known. Before anything runs, :func:`validate` refuses what the rules cannot do
exactly. Compiled models run eagerly inside the capture (``torch.compiler.set_stance``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .rules import UnsupportedModuleError, rule_for
from .rules.functional import check_replayable, per_example_grads
from .rules.norm import check_batch_norm, uses_batch_statistics
from .rules.registry import Call
from ._schemas import check_precision
from .state import BufferState, RandomState

Tensor = torch.Tensor


def tensor_args(args: tuple, kwargs: dict) -> list:
    """The tensors among a call's arguments, one list or tuple deep (a cheap ``tree_leaves``: this
    runs on every torch call of a watched forward)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, list | tuple):
            found.extend(b for b in a if isinstance(b, Tensor))
    return found


def foreign_output(output: Any) -> ValueError:
    """The error for an output the watched forward did not return."""
    got = f"a tensor of shape {tuple(output.shape)} it did not return" if isinstance(output, Tensor) \
        else type(output).__name__
    return ValueError("output: expected a tensor the watched forward returned (the model's output, or a tensor "
                      f"inside it); got {got}")


def select_logits(logits: Any, output: Any) -> Any:
    """The likelihood's parameters in a model's output: ``logits(output)``, or the output itself."""
    if logits is None:
        return output
    if not callable(logits):
        raise TypeError(f"logits: expected a callable from the model's output to its logits, got "
                        f"{type(logits).__name__}")
    return logits(output)


def as_args(inputs: Any) -> tuple:
    """The model's positional arguments from ``inputs`` (a tensor or a tuple), checked to hold a
    batch of at least one example."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    first = next((a for a in leaves(args) if isinstance(a, Tensor)), None)  # a dict or list argument too
    if first is None:
        raise TypeError(f"inputs: expected a tensor, or a tuple of the model's arguments holding a tensor, got "
                        f"{type(inputs).__name__} without one")
    if first.dim() == 0 or first.shape[0] == 0:
        raise ValueError(f"inputs: expected a batch of at least one example, got shape {tuple(first.shape)}")
    return args


def leaves(obj: Any) -> list:
    """The leaves of a nested output: tensors (and other non-container values) in a fixed order."""
    if isinstance(obj, tuple | list):
        return [x for item in obj for x in leaves(item)]
    if isinstance(obj, dict):
        return [x for item in obj.values() for x in leaves(item)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [x for f in dataclasses.fields(obj) for x in leaves(getattr(obj, f.name))]
    return [obj]


def validate(model: nn.Module) -> dict[nn.Module, list[tuple[str, str]]]:
    """``{module: [(local name, full name)]}`` of the trainable parameters, after refusing up front
    what the rules cannot do exactly: weight tying (one tensor under two names), BatchNorm that
    normalizes with the batch's statistics (anywhere in the model, with parameters or not),
    parametrized weights, and each rule's own checks."""
    owners: dict[nn.Module, list[tuple[str, str]]] = {}
    seen: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        where = f"{type(module).__name__} ({prefix or 'the model'})"
        if uses_batch_statistics(module):
            try:
                check_batch_norm(module)
            except UnsupportedModuleError as e:
                raise UnsupportedModuleError(f"{where}: {e}") from None
        if torch.nn.utils.parametrize.is_parametrized(module):
            raise UnsupportedModuleError(
                f"{where}: parametrized weights ({', '.join(module.parametrizations)}; weight_norm, spectral_norm, "
                "orthogonal ...) are not supported: the per-example gradient of the parametrization's originals is "
                "not a layer rule; remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations)")
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if not p.requires_grad:
                continue  # frozen: not part of Tr(F)
            full = f"{prefix}.{local}" if prefix else local
            if id(p) in seen and seen[id(p)] != full:
                raise UnsupportedModuleError(
                    f"{full}: the same tensor as {seen[id(p)]} (weight tying or a module registered twice); its "
                    "per-example gradient is the sum of both uses, which per-module rules cannot form; untie the "
                    "weights or freeze one of them")
            seen[id(p)] = full
            owners.setdefault(module, []).append((local, full))
    for module in owners:
        rule = rule_for(module)
        try:
            if rule is not None and rule.check is not None:
                rule.check(module)
            elif rule is None:
                check_replayable(module)
        except UnsupportedModuleError as e:
            prefix = next(full for _, full in owners[module]).rpartition(".")[0]
            raise UnsupportedModuleError(f"{type(module).__name__} ({prefix or 'the model'}): {e}") from None
    if not owners:
        raise ValueError("model: expected at least one trainable parameter (requires_grad=True), found none")
    return owners


@dataclass(eq=False)
class Output:
    """A recorded output leaf that requires grad: what the rules and the backward need of it, but
    not its memory. A layer's output is usually freed as soon as the next op has read it; holding
    every layer's output until the backward makes the backward's new buffers miss the caches.
    ``edge`` is where the producing node hands out the output's gradient, so autograd can be asked
    for it with the tensor gone, or changed in place since (the gradient of the value the module
    produced, which the tensor hook sees too)."""

    shape: torch.Size
    dtype: torch.dtype
    node: Any  # the output's grad_fn when produced (None for a leaf)
    edge: GradientEdge
    version: int  # the version counter when produced (in-place use changes it)
    value: Tensor | None = None  # kept only where a rule re-runs the module and compares outputs

    @staticmethod
    def of(t: Tensor, keep: bool) -> Output:
        return Output(t.shape, t.dtype, t.grad_fn, get_gradient_edge(t), t._version, t if keep else None)

    def unchanged_value(self) -> Tensor | None:
        """The output itself where it was kept and not modified in place since; else None."""
        v = self.value
        return v if v is not None and v._version == self.version else None


@dataclass
class Record:
    args: tuple
    kwargs: dict
    outputs: list  # an Output per output leaf that is a tensor requiring grad (None elsewhere)
    grads: list = field(default_factory=list)
    batch_dims: list = field(default_factory=list)  # of each output (Capture.find_batch_dims)
    # takes (output index, gradient) in place of storing it, during the capture's own backward;
    # what it returns replaces the gradient (None: unchanged)
    consume: Any = None

    def values(self) -> list:
        """The outputs as a rule's :class:`Call` sees them: kept and unchanged, else None."""
        return [o.unchanged_value() if o is not None else None for o in self.outputs]


class _Uses(TorchFunctionMode):
    """Notes, for each trainable parameter used in a torch call, which hooked module was running."""

    def __init__(self, capture: Capture):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c = self.capture
        # a use that can carry a gradient: not metadata (.shape, .dtype) nor a detached value
        if c.recording and c.stack and any(isinstance(o, Tensor) and o.requires_grad
                                           for o in ((out,) if isinstance(out, Tensor) else tree_leaves(out))):
            for t in tensor_args(args, kwargs):
                if isinstance(t, Tensor) and id(t) in c.param_ids:
                    c.users.setdefault(c.param_ids[id(t)], set()).add(c.stack[-1])
        return out


class Capture:
    """Records one forward of ``model`` (between :meth:`start` and :meth:`stop`, inside ``with``).

    ``strict``: a call the rules cannot handle (a module called twice) raises during the forward;
    otherwise the error is kept and raised by :meth:`norms_from_grads`, and the forward goes on.
    ``precision``: passed by the Linear and Conv rules to the norm ops: 'full', or 'bf16' (bfloat16
    GEMMs where they are faster; values only: differentiable norms are always 'full').
    """

    def __init__(self, model: nn.Module, strict: bool = True, precision: str = "full"):
        check_precision(precision)
        self.precision = precision
        self.model = getattr(model, "_orig_mod", model)  # a compiled model's own module (run eagerly)
        self.owners = validate(self.model)
        self.prefix: dict[nn.Module, str] = {}
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            self.prefix.setdefault(module, prefix)
        self.param_names = [full for names in self.owners.values() for _, full in names]
        self.module_of = {full: m for m, names in self.owners.items() for _, full in names}
        by_name = dict(self.model.named_parameters(remove_duplicate=False))
        self.params = [by_name[name] for name in self.param_names]
        self.param_ids = {id(p): name for name, p in zip(self.param_names, self.params)}
        self.records: dict[nn.Module, Record] = {}
        self.users: dict[str, set] = {}  # parameter -> the hooked modules running when it was used
        self.stack: list[nn.Module] = []
        self.before: dict[nn.Module, tuple] = {}  # (random state, buffers) before a re-runnable module's call
        self.output_leaves: list = []  # the model's own output, to tell its tensors from others
        self.strict = strict
        self.error: UnsupportedModuleError | None = None
        self.recording = False
        self.collecting = False  # output hooks store gradients only during the capture's own backward
        self.rules: dict[str, str] = {}  # full parameter name -> rule of the last norms
        self._stack = contextlib.ExitStack()
        self._uses: _Uses | None = None

    # ---- hooks -------------------------------------------------------------------------------

    def __enter__(self) -> Capture:
        hooked = list(self.owners) + ([self.model] if self.model not in self.owners else [])
        # prepended: the capture sees the module's own output, before any user hook replaces it,
        # and is on the module stack while user pre-hooks run
        for m in hooked:
            self._stack.callback(m.register_forward_pre_hook(self._enter(m), prepend=True).remove)
            self._stack.callback(m.register_forward_hook(self._hook(m), with_kwargs=True, always_call=True,
                                                         prepend=True).remove)
        self._stack.enter_context(torch.compiler.set_stance("force_eager"))
        self._stack.callback(self.stop)
        return self

    def __exit__(self, *exc) -> None:
        self.unhook()
        self.clear()

    def unhook(self) -> None:
        """Stops recording and removes the hooks; the records stay."""
        self.recording = False
        self._stack.close()

    def clear(self) -> None:
        """Drops the records. Each output's tensor hook refers to its record, which refers to the
        output: emptying the records breaks that cycle, so a step's graph is freed at once rather
        than by a later garbage collection."""
        for record in self.records.values():
            record.args, record.kwargs, record.outputs, record.grads = (), {}, [], []
            record.consume = None
        self.records, self.users, self.before, self.output_leaves = {}, {}, {}, []
        self.error = None

    def start(self) -> None:
        """Records the forward that follows, up to :meth:`stop`. The parameter-use mode is active
        only in between: every torch call under it pays a Python call."""
        self.clear()
        self.stack = []
        self.recording = True
        if self._uses is None:
            self._uses = _Uses(self)
            self._uses.__enter__()

    def stop(self) -> None:
        self.recording = False
        if self._uses is not None:
            uses, self._uses = self._uses, None
            uses.__exit__(None, None, None)

    def _may_rerun(self, module: nn.Module) -> bool:
        """Whether ``module``'s call may be re-run (the exact fallback, or a rule that re-runs): its
        random state and buffers are noted before it, its output kept to compare."""
        return module is self.model or rule_for(module) is None or rule_for(module).reruns

    def _enter(self, module: nn.Module):
        rerun = self._may_rerun(module)

        def pre_hook(mod, args):
            if self.recording:
                self.stack.append(module)
                if rerun and torch.is_grad_enabled():  # what a re-run must replay
                    self.before[module] = (RandomState(), BufferState(module))
        return pre_hook

    def _hook(self, module: nn.Module):
        keep = self._may_rerun(module)  # see Output

        def hook(mod, args, kwargs, output):
            if not self.recording:
                return
            if self.stack and self.stack[-1] is module:
                self.stack.pop()
            if module is self.model:
                self.output_leaves = [t for t in leaves(output) if isinstance(t, Tensor)]
            if not torch.is_grad_enabled():  # no gradient can come of this call (a teacher's, an EMA's)
                return
            if module in self.records:
                error = UnsupportedModuleError(
                    f"{type(module).__name__} ({self.prefix[module] or 'the model'}): called more than once in one "
                    "forward; its per-example gradient sums over the calls, which per-call rules cannot form")
                if self.strict:
                    raise error
                self.error = self.error or error
                return
            args, kwargs = _positional(module, args, kwargs)
            live = [o if isinstance(o, Tensor) and o.requires_grad else None for o in leaves(output)]
            record = Record(args, kwargs, [Output.of(o, keep) if o is not None else None for o in live],
                            [None] * len(live))
            for i, o in enumerate(live):
                if o is not None:
                    o.register_hook(self._grad_slot(record, i))
            self.records[module] = record
        return hook

    def _grad_slot(self, record: Record, i: int):
        def store(g):
            if not self.collecting:  # not during the caller's own backward
                return None
            if record.consume is not None:
                return record.consume(i, g)
            record.grads[i] = g
            return None
        return store

    def produced(self, t: Any) -> bool:
        """Whether ``t`` is a tensor of the recorded forward's output."""
        return any(t is o for o in self.output_leaves)

    # ---- per-example norms ---------------------------------------------------------------------

    def norms(self, per_example_losses: Tensor, retain_graph: bool) -> dict[str, Tensor]:
        """One backward of ``sum_n l_n``; returns ``{full parameter name: (N,) squared norms}``."""
        self.find_batch_dims(per_example_losses)
        used = self._collect(per_example_losses.sum(), retain_graph)
        return self.norms_from_grads(per_example_losses.shape[0], used)

    def _collect(self, loss: Tensor, retain_graph: bool, params: bool = True) -> set[str]:
        """One backward of ``loss`` that the output hooks catch (into each record's ``grads``);
        returns the parameters of modules that did not run which got a gradient.

        The backward asks for each module output's gradient directly (at its edge: the value the
        module produced, even where ReLU(inplace=True) changed the tensor since), so it stops at the
        first layer's output and forms no weight gradient. Parameters of modules that did not run
        are asked for too, to learn whether they are used."""
        for record in self.records.values():
            record.grads = [None] * len(record.grads)
        targets, slots = [], []
        for record in self.records.values():
            for i, o in enumerate(record.outputs):
                if o is not None:
                    targets.append(o.edge)
                    slots.append((record, i))
        unrecorded = [name for name in self.param_names if self.module_of[name] not in self.records] if params else []
        targets += [self.params[self.param_names.index(name)] for name in unrecorded]
        slots += [None] * len(unrecorded)
        if not targets:
            return set()
        self.collecting = True
        try:
            grads = torch.autograd.grad(loss, targets, retain_graph=retain_graph, allow_unused=True)
        except RuntimeError as e:
            if "use_reentrant" not in str(e):
                raise
            raise UnsupportedModuleError(f"the model runs torch.utils.checkpoint with use_reentrant=True, whose "
                                         f"modules run without autograd; use use_reentrant=False ({e})") from e
        finally:
            self.collecting = False
        for slot, g in zip(slots, grads):
            if slot is not None:
                slot[0].grads[slot[1]] = g
        return {name for name, g in zip(unrecorded, grads[len(grads) - len(unrecorded):]) if g is not None}

    def find_batch_dims(self, per_example_losses: Tensor) -> None:
        """Which dimension of each recorded output holds the examples: the one along which the loss
        of example 0 reaches only index 0, and that of example N-1 only index N-1 (and of examples
        1, N-2, ... where those reached nothing or left two candidates). Backwards of single
        examples, on the first forward of each layout (cached per model and shapes); the records'
        caught gradients are left as they were."""
        n = per_example_losses.shape[0]
        cache = _BATCH_DIMS.setdefault(self.model, {})
        keys = {m: (self.prefix[m], tuple(tuple(o.shape) if o is not None else None for o in r.outputs))
                for m, r in self.records.items()}
        missing = [m for m in self.records if keys[m] not in cache]
        if missing:
            kept = {m: r.grads for m, r in self.records.items()}
            probes: list = []
            # examples 0 and N-1 first; more where a probe reached nothing (dead units) or two dims qualified
            for index in dict.fromkeys([0, n - 1, 1, n - 2, 2, n - 3][:max(1, min(n, 6))]):
                self._collect(per_example_losses[index], retain_graph=True, params=False)
                probes.append((index, {m: r.grads for m, r in self.records.items()}))
                found = {m: [_batch_dim(o.shape, [(i, p[m][j]) for i, p in probes], n) if o is not None else None
                             for j, o in enumerate(self.records[m].outputs)] for m in missing}
                if len(probes) >= 2 and all(d is not None for m in missing
                                            for d, o in zip(found[m], self.records[m].outputs) if o is not None):
                    break
            for m, r in self.records.items():
                r.grads = kept[m]
            for m in missing:
                cache[keys[m]] = found[m]
        for m, r in self.records.items():
            r.batch_dims = cache[keys[m]]

    def used_unrecorded(self, params: list, grads: list) -> set[str]:
        """Of ``params`` with a gradient in ``grads``, those whose own module did not run."""
        return {self.param_ids[id(p)] for p, g in zip(params, grads)
                if g is not None and id(p) in self.param_ids
                and self.module_of[self.param_ids[id(p)]] not in self.records}

    def norms_from_grads(self, n: int, used_unrecorded: set[str], scale: float = 1.0,
                         differentiable: bool = False, done: frozenset = frozenset(),
                         full_precision: bool = False) -> dict[str, Tensor]:
        """Per-example norms from the output gradients the hooks caught in the last backward.

        ``used_unrecorded``: the parameters of modules that did not run which the loss depends on.
        ``scale``: multiplies the caught gradients (N for a mean loss: docs/design.md, section 2).
        ``differentiable``: keep the graph (inputs and gradients caught with ``create_graph``), so
        the norms can be differentiated w.r.t. the parameters; only closed-form rules allow it.
        ``done``: modules whose norms the caller has formed already (the fused backward's); they
        count as used and keep their rule's name, but are not computed again.
        ``full_precision``: ignore the capture's ``precision`` (the training backward's norms).
        """
        if self.error is not None:
            raise self.error
        for module, record in self.records.items():
            if module in done:  # formed already: only whether a gradient reached it counts below
                continue
            record.grads = [(g * scale if scale != 1.0 else g) if g is not None else None for g in record.grads]
            if not differentiable:  # the norms are values, not part of a graph
                record.grads = [g.detach() if g is not None else None for g in record.grads]
        used = set(used_unrecorded)
        for module, record in self.records.items():
            if any(g is not None for g in record.grads):
                used.update(full for _, full in self.owners.get(module, []))
        self._refuse_foreign_uses(used)
        own: dict[nn.Module, list[str]] = {}  # closed-form work per module
        todo: dict[nn.Module, list[str]] = {}  # fallback work per (running) module, names relative to it
        self.rules = {}
        for module, names in self.owners.items():
            for local, full in names:
                if full not in used:
                    continue
                rule = rule_for(module)
                if module in self.records and rule is not None:
                    own.setdefault(module, []).append(local)
                    self.rules[full] = rule.name
                    continue
                runner = self._runner(module, full)
                relative = full[len(self.prefix[runner]):].lstrip(".")
                runner_rule = rule_for(runner)
                if runner_rule is not None and runner_rule.reruns:  # it covers the descendants it uses (attention)
                    own.setdefault(runner, []).append(relative)
                    self.rules[full] = runner_rule.name
                else:
                    todo.setdefault(runner, []).append(relative)
                    self.rules[full] = "fallback"
        out: dict[str, Tensor] = {}
        for module, record in self.records.items():
            if all(g is None for g in record.grads) or (module not in own and module not in todo) or module in done:
                continue
            for o, g, d in zip(record.outputs, record.grads, record.batch_dims or [None] * len(record.grads)):
                if g is not None and d is None:
                    raise UnsupportedModuleError(
                        f"{type(module).__name__} ({self.prefix[module] or 'the model'}): no dimension of its output "
                        f"(shape {tuple(o.shape)}) holds the batch's {n} examples one by one (a module run on a subset "
                        "of the examples, like a routed expert, or one that mixes examples?); per-example rules need "
                        "each module to see every example separately")
            rng, buffers = self.before.get(module, (None, None))
            call = Call(record.args if differentiable else _detach(record.args),
                        record.kwargs if differentiable else _detach(record.kwargs), record.values(), record.grads, n,
                        record.batch_dims, rng, buffers,
                        precision="full" if differentiable or full_precision else self.precision)
            rule = rule_for(module)
            if module in own:
                local = rule.fn(module, own[module], call)
                missing = set(own[module]) - set(local)
                if missing:
                    raise UnsupportedModuleError(
                        f"{type(module).__name__} ({self.prefix[module] or 'the model'}): its rule '{rule.name}' "
                        f"gives no norms for {sorted(missing)} (parameters it does not know, e.g. from a hook-based "
                        "weight_norm); register a rule that covers them")
                out.update({self._full(module, k): v for k, v in local.items()})
            if module in todo:
                if differentiable:
                    raise UnsupportedModuleError(
                        f"{type(module).__name__} ({self.prefix[module] or 'the model'}): differentiating per-example "
                        f"norms needs closed-form rules; parameters {todo[module]} have none")
                check_replayable(module)
                local = per_example_grads(module, todo[module], call)
                out.update({self._full(module, k): v for k, v in local.items()})
        return out

    def _refuse_foreign_uses(self, used: set[str]) -> None:
        """Parameters whose gradient the hooks cannot see whole: used by another module's forward
        as well as by their own."""
        for name in used:
            owner = self.module_of[name]
            foreign = {u for u in self.users.get(name, ()) if u is not owner}
            if foreign and owner in self.records:
                who = ", ".join(sorted(self.prefix[u] or "the model" for u in foreign))
                raise UnsupportedModuleError(
                    f"{name}: used by the forward of {who} as well as by its own module ({self.prefix[owner]}); its "
                    "per-example gradient sums the uses, which per-module rules cannot form (weight tying?)")

    def _full(self, module: nn.Module, local: str) -> str:
        return f"{self.prefix[module]}.{local}" if self.prefix[module] else local

    def _runner(self, module: nn.Module, full: str) -> nn.Module:
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


_BATCH_DIMS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _batch_dim(shape: torch.Size, probes: list, n: int) -> int | None:
    """The dim of size n where each probe (example index, gradient of that example's loss) reaches
    only its own index; None if there is not exactly one."""
    sizes = [d for d, size in enumerate(shape) if size == n]
    if n == 1:
        return sizes[0] if sizes else None
    found = []
    for d in sizes:
        reached = [(i, p.detach().abs().movedim(d, 0).reshape(n, -1).sum(1) != 0) for i, p in probes if p is not None]
        reached = [(i, r) for i, r in reached if bool(r.any())]
        if reached and all(r.nonzero().flatten().tolist() == [i] for i, r in reached):
            found.append(d)
    return found[0] if len(found) == 1 else None


_SIGNATURES: dict[type, inspect.Signature | None] = {}


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with those passed by keyword but declared positional (``lin(input=x)``)
    moved into ``args``, as the rules read them."""
    if not kwargs:
        return args, kwargs
    kind = type(module)
    if kind not in _SIGNATURES:
        try:
            _SIGNATURES[kind] = inspect.signature(module.forward)
        except (TypeError, ValueError):
            _SIGNATURES[kind] = None
    signature = _SIGNATURES[kind]
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    return bound.args, bound.kwargs


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):  # a namedtuple (PackedSequence) keeps its type
        items = [_detach(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value
