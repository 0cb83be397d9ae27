"""Exact enumeration of a finite support, by Pyro's parallel enumeration.

For a site ``y ~ q_phi`` with a finite support ``{0, ..., K - 1}`` (Bernoulli, Categorical,
OneHotCategorical), the ELBO's expectation over ``y`` is a sum,
``E_q[f(y)] = sum_k q_phi(k) f(k)``, and so is its gradient: ``sum_k grad q_phi(k) f(k) +
q_phi(k) grad f(k)``. Routing marks the site for Pyro's parallel enumeration and the
:class:`~pyro.poutine.enum_messenger.EnumMessenger` around the guide lays its ``K`` values
out along a dim left of every plate (as in ``TraceEnum_ELBO``; ``pyro.markov`` reuses dims),
so the model and the rest of the guide run once on all of them side by side. Every term
that carries enumerated values is weighed by their marginal probability under the guide,
computed by variable elimination (:class:`~pyro_reparam_conv.enumeration.GuideMarginals`;
differentiable, so the site's gradient has no variance at all), which for a chain of such
sites is polynomial in its length rather than ``K^T``.

Per plate element: inside ``pyro.plate("N", n)`` the values are ``y_i = k`` for every ``i``
at once, so ``n`` Bernoullis cost 2 evaluations, not ``2^n``; this is exact when each
element's terms depend on its own ``y_i`` only (the usual case: a latent per data point).
Automatically routed sites are checked one value at a time on tracked steps
(:func:`~pyro_reparam_conv.evaluations.side_by_side_mismatch`) and routed elsewhere when a
term outside the site's plates depends on them. Downstream pathwise and score-function
sites keep their own estimators within each of the ``K`` evaluations.
"""

from __future__ import annotations

import weakref

from typing import Optional

from pyro.distributions.score_parts import ScoreParts

from ..distributions import distribution_name
from .base import Estimator, Layout, RoutingOptions, register

__all__ = ["EnumerateEstimator"]


_SIZES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def support_size(fn) -> int:
    """The number of values of one element of ``fn``'s finite support (found once per
    distribution object: routing asks several times per site)."""
    size = _SIZES.get(fn)
    if size is None:
        size = _SIZES[fn] = fn.enumerate_support(expand=False).shape[0]
    return size


class Support(Layout):
    """Every value of the finite support side by side, laid out by Pyro's enumeration and
    weighed by the marginal probability of the values each term carries."""

    local_weights = True
    pyro_enumerates = True

    def evaluations(self, fn) -> int:
        return support_size(fn)


class EnumerateEstimator(Estimator):
    """The exact sum over the support, ``K`` evaluations side by side."""

    name = "enumerate"
    priority = 10
    layout = Support()

    def why_not(self, fn) -> Optional[str]:
        if getattr(fn, "has_enumerate_support", False):
            return None
        return f"{distribution_name(fn)} has no finite support to enumerate"

    def auto_why_not(self, fn, options: RoutingOptions) -> Optional[str]:
        why_not = self.why_not(fn)
        if why_not is None and support_size(fn) > options.max_enumerate:
            why_not = f"support of {support_size(fn)} > max_enumerate={options.max_enumerate}"
        return why_not

    def because(self, fn) -> str:
        return f"support of {support_size(fn)} <= max_enumerate"

    def note(self, fn, infer: dict) -> str:
        return f"exact sum: {support_size(fn)} evaluations, no variance"

    def has_score_function(self, fn) -> bool:
        return False

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], 0.0, site["log_prob"])


register(EnumerateEstimator())
