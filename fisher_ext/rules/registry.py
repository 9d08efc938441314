"""Which rule computes the per-example squared norms of a module's own parameters.

A rule is a function ``rule(module, names, call) -> {name: (N,) tensor}``:

- ``module``: the module whose call was captured;
- ``names``: the parameters to compute, by name local to ``module`` (its trainable ones, or,
  for the fallback, a descendant's it uses directly, like nn.MultiheadAttention's out_proj);
- ``call``: a :class:`Call`, the captured inputs and the output gradients ``dl_n/d output`` of
  per-example losses (their sum over the batch: no reduction rescaling is needed);
- it returns each named parameter's ``||dl_n/d p||^2`` per example, float32 (float64 for float64).

Rules are looked up by the module's exact type. ``check(module)``, run on every module before the
forward, raises :class:`UnsupportedModuleError` for a configuration the rule cannot do exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import torch
from torch import nn

from ..state import BufferState, RandomState

Norms = dict[str, torch.Tensor]


class UnsupportedModuleError(ValueError):
    """A model whose per-example gradients cannot be computed exactly by the rules (raised before
    the forward where it can be told from the model, naming the module, the parameter and what to do)."""


@dataclass
class Call:
    """One call of a module in the watched forward, as a rule sees it.

    Attributes:
        args, kwargs: the module's inputs (detached unless the norms must keep their graph).
        outputs: the module's output, flattened (tuples, lists, dicts, dataclasses at any depth);
            None where a leaf is not a tensor that requires grad.
        grads: ``dl_n / d outputs[i]`` of the per-example losses, one per output leaf (None where
            none reached it).
        n: the batch size.
        batch_dims: the dimension of each output leaf that holds the examples (None where no
            gradient reached it), found by the capture from the losses of single examples.
        rng, buffers: the random state and the module's buffers before the call, for :meth:`rerun`.
        precision: the ``precision`` a rule passes to the norm ops ('full', or 'bf16' under
            ``fisher_trace(..., precision='bf16')``: bfloat16 GEMMs allowed where they are faster).
    """

    args: tuple
    kwargs: dict
    outputs: list
    grads: list
    n: int
    batch_dims: list
    rng: RandomState | None = None
    buffers: BufferState | None = None
    precision: str = "full"

    def rerun(self, module: nn.Module) -> Any:
        """``module.forward`` on the captured inputs again, as the call ran: same random draws, same
        buffers (and the module's buffers left as the call left them), no hooks."""
        with contextlib.ExitStack() as stack:
            if self.rng is not None:
                stack.enter_context(self.rng.replayed())
            if self.buffers is not None:
                stack.enter_context(self.buffers.replayed())
            with torch.enable_grad():
                return module.forward(*self.args, **self.kwargs)

    @property
    def batch_dim(self) -> int:
        """The batch dimension of the single tensor output."""
        return next(d for d, g in zip(self.batch_dims, self.grads) if g is not None)

    @property
    def grad(self) -> torch.Tensor:
        """The gradient of the single tensor output (rules of single-output layers)."""
        present = [g for g in self.grads if g is not None]
        if len(present) != 1:
            raise UnsupportedModuleError(f"expected one output gradient, got {len(present)}")
        return present[0]


RuleFn = Callable[[nn.Module, list, Call], Norms]
# (module, names, call) -> ({name: gradient of the summed loss}, {name: (N,) norms}): a rule that
# also gives the parameters' batch gradients from the call, so a backward needs not form them.
GradientsFn = Callable[[nn.Module, list, Call], tuple[dict[str, torch.Tensor], Norms]]


@dataclass
class Rule:
    name: str
    fn: RuleFn
    check: Callable[[nn.Module], None] | None = None
    differentiable: bool = False  # the norms keep their graph to the parameters (objective 'trace')
    types: list = field(default_factory=list)
    reruns: bool = False  # it re-runs its module (the exact fallback), so it can take descendants' parameters
    applies: Callable[[nn.Module], bool] | None = None  # False: this configuration goes to the fallback
    gradients: GradientsFn | None = None  # the fused backward's (fisher_ext.fused_backward)


_RULES: dict[type, Rule] = {}


def register_rule(module_type: type | tuple, fn: RuleFn | None = None, *, name: str | None = None,
                  check: Callable[[nn.Module], None] | None = None, differentiable: bool = False,
                  reruns: bool = False, applies: Callable[[nn.Module], bool] | None = None,
                  gradients: GradientsFn | None = None) -> Any:
    """Registers ``fn`` as the per-example-norm rule of ``module_type`` (a type or a tuple of types),
    replacing any earlier one; usable as a decorator::

        @fisher_ext.register_rule(MyScale)
        def my_scale_rule(module, names, call):
            x, g = call.args[0], call.grad            # input (N, d), dl_n/d output (N, d)
            return {"scale": (x * g).square().sum(1)}  # y = x * scale: dl_n/dscale = x_n * g_n

    See the module docstring for the contract. ``check(module)`` may raise
    :class:`UnsupportedModuleError` up front; ``differentiable`` says the norms keep their graph.
    ``reruns``: the rule re-runs the module, so it also takes the parameters of descendants the module
    uses directly (given by names relative to it).
    ``applies(module)`` False sends that module to the exact fallback instead.
    ``gradients(module, names, call)``: optionally, the named parameters' gradients of the summed
    loss from the same call, with their norms; a backward that wants both (the Fisher Penalty's, the
    monitor's :meth:`~fisher_ext.FisherTraceMonitor.backward`) then asks autograd only for the
    module's output gradient.
    """
    types = module_type if isinstance(module_type, tuple) else (module_type,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"module_type: expected an nn.Module subclass or a tuple of them, got {t!r}")

    def add(f: RuleFn) -> RuleFn:
        if not callable(f):
            raise TypeError(f"fn: expected a callable rule(module, names, call), got {type(f).__name__}")
        rule = Rule(name or f.__name__.removesuffix("_rule"), f, check, differentiable, list(types), reruns, applies,
                    gradients)
        for t in types:
            _RULES[t] = rule
        return f

    return add(fn) if fn is not None else add


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule of this module's exact type, or None (the exact fallback)."""
    rule = _RULES.get(type(module))
    return rule if rule is None or rule.applies is None or rule.applies(module) else None
