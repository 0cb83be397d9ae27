"""The score-function (REINFORCE) estimator.

For a site ``z ~ q_phi``, ``grad_phi E_q[c(z)] = E_q[grad_phi log q_phi(z) * c(z)]``
(Williams 1992). The value is drawn with ``fn.sample()`` (no gradient path, so a
distribution that has ``rsample`` is left untouched: ``has_rsample_(False)`` would mutate
it, and fails on ``Independent`` under a plate) and the site contributes the score parts
``(log q(z), log q(z), 0)``: ``log q(z)`` is the score-function part, multiplied by the
site's fixed cost less a baseline. The cost counts only the terms downstream of ``z``
(Rao-Blackwellization, Schulman et al. 2015; see :mod:`pyro_reparam_conv.terms`), and the
baselines of :mod:`.baselines` reduce its variance without bias.
"""

from __future__ import annotations

from pyro.distributions.score_parts import ScoreParts

from .base import Estimator, Layout, register

__all__ = ["ScoreEstimator"]


class Sampled(Layout):
    """One draw without a gradient path (``fn.sample()``)."""

    def draw(self, msg: dict, dim=None) -> None:
        if msg["value"] is None:
            msg["value"] = msg["fn"].sample(*msg["args"], **msg["kwargs"])


class ScoreEstimator(Estimator):
    """Score function with a baseline; applies to every distribution (the fallback)."""

    name = "score"
    priority = 100
    uses_baseline = True
    element_costs = True
    layout = Sampled()

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], site["unscaled_log_prob"], 0.0)


register(ScoreEstimator())
