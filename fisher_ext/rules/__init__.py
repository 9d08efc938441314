"""Per-example squared gradient norms of one module's own parameters, one module per layer family,
behind a registry (:func:`register_rule`). Importing the package registers the built-in rules."""

from . import attention, conv, embedding, linear, norm, recurrent  # noqa: F401  (registers the built-in rules)
from .registry import Call, Rule, UnsupportedModuleError, register_rule, rule_for

__all__ = ["Call", "Rule", "UnsupportedModuleError", "register_rule", "rule_for"]
