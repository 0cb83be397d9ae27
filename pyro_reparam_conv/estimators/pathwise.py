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

from pyro.distributions.distribution import Distribution
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution

from ..sampling import distribution_name
from .base import Estimator, register

__all__ = ["PathwiseEstimator", "partially_reparameterized"]

# wrappers whose score_parts pass their base distribution's parts through
_DELEGATING = (MaskedDistribution.score_parts, ExpandedDistribution.score_parts)


def partially_reparameterized(fn) -> bool:
    """Whether ``fn`` overrides Pyro's default ``score_parts`` (which has no score-function
    part for a distribution with ``rsample``), as rejection samplers do."""
    while getattr(type(fn), "score_parts", None) in _DELEGATING:
        fn = fn.base_dist
    return (
        getattr(type(fn), "score_parts", Distribution.score_parts) is not Distribution.score_parts
    )


class PathwiseEstimator(Estimator):
    """Differentiate through ``rsample``; needs a distribution that has it."""

    name = "pathwise"
    priority = 0

    def why_not(self, fn) -> Optional[str]:
        if getattr(fn, "has_rsample", False):
            return None
        return f"{distribution_name(fn)} has no rsample"

    def because(self, fn) -> str:
        return f"{distribution_name(fn)} has rsample"

    def has_score_function(self, fn) -> bool:
        return partially_reparameterized(fn)


register(PathwiseEstimator())
