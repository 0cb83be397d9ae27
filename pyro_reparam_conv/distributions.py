"""Helpers that read distributions: their names in reports, the distribution inside
``Independent`` wrappers, whether a Normal's density is ``Normal``'s own, whether a
distribution with ``rsample`` still has a score-function part. Read-only: nothing here
changes a user's distribution."""

from __future__ import annotations

from pyro.distributions.distribution import Distribution as PyroDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Distribution, Independent, Normal

__all__ = [
    "distribution_name",
    "is_plain_normal",
    "partially_reparameterized",
    "unwrap_independent",
]


def distribution_name(fn) -> str:
    """``fn``'s name as reports show it, wrappers included: ``"Independent(Normal)"``."""
    names = []
    while fn is not None:
        names.append(getattr(type(fn), "display_name", type(fn).__name__))
        fn = getattr(fn, "base_dist", None)
    return "(".join(names) + ")" * (len(names) - 1)


def unwrap_independent(d: Distribution) -> tuple[Distribution, int]:
    """The distribution inside any ``Independent`` wrappers, and how many batch dims they
    reinterpret as event dims."""
    ndims = 0
    while isinstance(d, Independent):
        ndims += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, ndims


def is_plain_normal(d: Distribution) -> bool:
    """A torch/Pyro ``Normal`` whose density is ``Normal``'s own (not a subclass's)."""
    return isinstance(d, Normal) and (
        type(d).log_prob is Normal.log_prob or getattr(type(d), "exact_normal_density", False)
    )


# wrappers whose score_parts pass their base distribution's parts through
_DELEGATING = (MaskedDistribution.score_parts, ExpandedDistribution.score_parts)


def partially_reparameterized(fn) -> bool:
    """Whether ``fn`` overrides Pyro's default ``score_parts`` (which has no score-function
    part for a distribution with ``rsample``), as rejection samplers do."""
    while getattr(type(fn), "score_parts", None) in _DELEGATING:
        fn = fn.base_dist
    default = PyroDistribution.score_parts
    return getattr(type(fn), "score_parts", default) is not default
