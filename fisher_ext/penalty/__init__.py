"""The Fisher Penalty of "Catastrophic Fisher Explosion" (Jastrzebski et al., ICML 2021).

An objective (:mod:`.objectives`: the Fisher Penalty's ``||gbar||^2``, the batch Tr(F), the
paper's GP / GPr / GPx baselines) crossed with a differentiation method (:mod:`.methods`: exact
double backward, or a finite difference with the watched pass's decisions replayed), driven by
one step in :class:`FisherPenalty`. :mod:`.replay` holds what makes an extra pass see the model
as the watched one did.
"""

from .fisher_penalty import FisherPenalty, PenaltyResult
from .methods import Check

__all__ = ["FisherPenalty", "PenaltyResult", "Check"]
