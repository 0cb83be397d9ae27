"""The pathwise (reparameterization) estimator.

For ``z = g(eps, phi)`` drawn by ``rsample``,
``grad_phi E_q[f(z)] = E_eps[grad_phi f(g(eps, phi))]`` (Kingma & Welling 2014; Rezende,
Mohamed & Wierstra 2014): the site's terms are differentiated as they are, through the
draw. Its score parts are the distribution's own: ``entropy_term = log q(z)`` through the
draw and no score-function part, except for a partially reparameterized distribution
(a rejection sampler such as Pyro's ``ShapeAugmentedGamma``, Naesseth et al. 2017), whose
``score_parts`` also carries the score function of its accept step; that part gets the
site's Rao-Blackwellized cost like any score-function term.
"""

from __future__ import annotations

from typing import Optional

from ..distributions import distribution_name, partially_reparameterized
from .base import Estimator, register

__all__ = ["PathwiseEstimator"]

class PathwiseEstimator(Estimator):
    """Differentiate through ``rsample``; needs a distribution that has it."""

    name = "pathwise"
    priority = 0
    takes_analytic_kl = True
    through_the_cost = True
    hint_when_refused = (
        "; use 'score' or a reparameterizable distribution (e.g. a relaxed/Gumbel-softmax one)"
    )

    def why_not(self, fn) -> Optional[str]:
        if getattr(fn, "has_rsample", False):
            return None
        return f"{distribution_name(fn)} has no rsample"

    def because(self, fn) -> str:
        return f"{distribution_name(fn)} has rsample"

    def has_score_function(self, fn) -> bool:
        return partially_reparameterized(fn)


register(PathwiseEstimator())
