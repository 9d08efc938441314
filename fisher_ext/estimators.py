"""Label draws and the backward passes that turn a captured forward into per-example norms.

- ``'mc'``: labels sampled from the model's predictive distribution (K draws);
- ``'exact'``: every class, weighted by its probability (categorical outputs, one backward each);
- ``'empirical'``: the true labels.

Draws come from a :class:`LabelGenerator`, never the global random stream, so a monitored or
penalized run takes the same path (dropout masks, data order) as a plain one.
"""

from __future__ import annotations

import torch

from .capture import Capture
from .likelihoods import Likelihood

ESTIMATORS = ("mc", "exact", "empirical")


class LabelGenerator:
    """The random generator of label draws: the one given, or one per device seeded from
    ``torch.initial_seed()`` (mixed, so its stream is not the global one's), used by nothing else."""

    def __init__(self, generator: torch.Generator | None = None, stream: int = 0):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        # stream: the process's rank, so that the processes of one run draw independent labels
        self.seed = ((torch.initial_seed() + stream * 0x9E3779B97F4A7C15) * 6364136223846793005
                     + 1442695040888963407) % 2 ** 63
        self._own: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        if device not in self._own:
            self._own[device] = torch.Generator(device).manual_seed(self.seed)
        return self._own[device]

    def state_dict(self) -> dict:
        """The draws' position: the given generator's state, or each own generator's (by device)."""
        if self.generator is not None:
            return {"given": self.generator.get_state()}
        return {"seed": self.seed, "own": {str(d): g.get_state() for d, g in self._own.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "given" in state:
            if self.generator is None:
                raise ValueError("state: saved from a LabelGenerator with a given generator; this one has none")
            self.generator.set_state(state["given"])
            return
        self.seed = state["seed"]
        self._own = {}
        for device, rng_state in state["own"].items():
            self.on(torch.device(device)).set_state(rng_state)


def estimate_norms(capture: Capture, output: torch.Tensor, likelihood: Likelihood, estimator: str,
                   labels: torch.Tensor | None, samples: int, generator: LabelGenerator,
                   retain_graph: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example totals and per-parameter (N,) norms of the captured forward's ``output``,
    averaged over the label draws (one backward each)."""
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
        draws = [(likelihood.sample(output, generator.on(output.device)), None) for _ in range(samples)]

    totals: dict[str, torch.Tensor] = {}
    for i, (y, weight) in enumerate(draws):
        last = i == len(draws) - 1
        norms = capture.norms(likelihood.nll(output, y), retain_graph=retain_graph or not last)
        for name, v in norms.items():
            v = v.double() * (weight.double() if weight is not None else 1.0 / len(draws))
            totals[name] = totals[name] + v if name in totals else v
    per_example = torch.stack(list(totals.values())).sum(0) if totals else torch.zeros(n, dtype=torch.float64,
                                                                                         device=output.device)
    return per_example, totals


