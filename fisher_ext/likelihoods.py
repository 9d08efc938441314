"""Likelihoods p(y | model output): how to sample labels and the per-example negative log-likelihood.

The Fisher of docs/design.md (section 1) uses ``l_n = -log p(yhat_n | x_n)`` with ``yhat_n`` sampled
from the model's own predictive distribution (or the true label, for the empirical
Fisher). A likelihood only has to provide:

- ``check(output)``: raise a ValueError naming ``output`` if it cannot be this likelihood's
  parameters;
- ``sample(output, generator)``: labels drawn from ``p(. | output)`` (no gradient);
- ``nll(output, labels)``: ``(N,)`` per-example negative log-likelihood, differentiable in
  ``output`` and summed over every non-batch dimension (a sequence's tokens add up).

Any object with these three methods can be passed where a likelihood name is accepted.
Categorical outputs also offer ``class_probabilities`` for the exact Fisher.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import torch
import torch.nn.functional as F

from .reference import to_accumulation_dtype as _acc


@runtime_checkable
class Likelihood(Protocol):
    def check(self, output: torch.Tensor) -> None: ...

    def sample(self, output: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor: ...

    def nll(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


def _check_batched(output, what: str, min_dim: int) -> None:
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise ValueError(f"output: expected a floating-point tensor of {what}, got {type(output).__name__}"
                         + (f" of dtype {output.dtype}" if isinstance(output, torch.Tensor) else ""))
    if output.dim() < min_dim:
        raise ValueError(f"output: expected {what} with at least {min_dim} dims, got shape {tuple(output.shape)}")


def _valid_for_draws(output: torch.Tensor, masked: bool) -> torch.Tensor:
    """The logits, checked: NaN (and +inf, where classes compete) describes no distribution; -inf
    masks a class out (``masked``), but a row of them leaves none to draw."""
    bad = torch.isnan(output) | (torch.isposinf(output) if masked else torch.zeros_like(output, dtype=torch.bool))
    empty = (output == float("-inf")).all(-1) if masked and output.dim() > 1 else None
    if bool(bad.any()) or (empty is not None and bool(empty.any())):
        what = f"{int(bad.sum())} of the {output.numel()} logits are NaN{' or +inf' if masked else ''}" if bool(
            bad.any()) else f"{int(empty.sum())} rows of logits are all -inf (no class left)"
        raise FloatingPointError(f"output: {what}; labels cannot be drawn from them (the model has diverged, or its "
                                 "input is not finite)")
    return output


class Categorical:
    """Classes from logits ``(N, C)``, or per token from ``(N, T, C)`` (an example's loss sums its tokens)."""

    def check(self, output: torch.Tensor) -> None:
        _check_batched(output, "logits (N, C) or (N, T, C)", 2)
        if output.dim() > 3:
            raise ValueError(f"output: expected logits (N, C) or (N, T, C), got shape {tuple(output.shape)}")

    def sample(self, output, generator=None):
        probs = torch.softmax(_acc(_valid_for_draws(output.detach(), masked=True)), dim=-1)
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return flat.reshape(output.shape[:-1])

    def nll(self, output, labels):
        if labels.shape != output.shape[:-1]:
            raise ValueError(f"labels: expected shape {tuple(output.shape[:-1])} for logits of shape "
                             f"{tuple(output.shape)}, got {tuple(labels.shape)}")
        per_token = F.cross_entropy(_acc(output.reshape(-1, output.shape[-1])), labels.reshape(-1),
                                    reduction="none")
        return per_token.reshape(output.shape[0], -1).sum(1)

    def class_probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` predictive probabilities, for the exact Fisher (one backward per class)."""
        if output.dim() != 2:
            raise ValueError("estimator: 'exact' sums over every label of an example, which for (N, T, C) outputs "
                             f"means C**T label sequences; use 'mc' (output shape {tuple(output.shape)})")
        return torch.softmax(_acc(output.detach()), dim=-1)


class Bernoulli:
    """Independent binary labels from logits of any shape ``(N, *)`` (BCEWithLogits)."""

    def check(self, output):
        _check_batched(output, "logits (N, *)", 1)

    def sample(self, output, generator=None):
        return torch.bernoulli(torch.sigmoid(_acc(_valid_for_draws(output.detach(), masked=False))),
                               generator=generator)

    def nll(self, output, labels):
        if labels.shape != output.shape:
            raise ValueError(f"labels: expected shape {tuple(output.shape)} like the logits, got {tuple(labels.shape)}")
        loss = F.binary_cross_entropy_with_logits(_acc(output), _acc(labels), reduction="none")
        return loss.reshape(output.shape[0], -1).sum(1)


class Gaussian:
    """Regression: ``y ~ N(output, variance)`` per coordinate (MSE with unit variance by default)."""

    def __init__(self, variance: float = 1.0):
        if not variance > 0:
            raise ValueError(f"variance: expected > 0, got {variance!r}")
        self.variance = float(variance)

    def check(self, output):
        _check_batched(output, "means (N, *)", 1)

    def sample(self, output, generator=None):
        mean = _acc(output.detach())
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + self.variance ** 0.5 * noise

    def nll(self, output, labels):
        if labels.shape != output.shape:
            raise ValueError(f"labels: expected shape {tuple(output.shape)} like the output, got {tuple(labels.shape)}")
        return ((_acc(labels) - _acc(output)).square() / (2 * self.variance)).reshape(output.shape[0], -1).sum(1)


LIKELIHOODS = {"categorical": Categorical, "bernoulli": Bernoulli, "gaussian": Gaussian}


def get_likelihood(likelihood: Union[str, Likelihood]) -> Likelihood:
    """A likelihood from its name ('categorical', 'bernoulli', 'gaussian') or a user object."""
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)} or an object with check, sample "
                             f"and nll, got {likelihood!r}")
        return LIKELIHOODS[likelihood]()
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood: expected a name or an object with check, sample and nll methods, got "
                        f"{type(likelihood).__name__}")
    return likelihood
