"""Helpers that read distributions: their names in reports, the distribution inside
``Independent`` wrappers, whether a Normal's density is ``Normal``'s own, whether a
distribution with ``rsample`` still has a score-function part, which guide ``Delta`` passes
another site's draw on unchanged. Read-only: nothing here changes a user's distribution."""

from __future__ import annotations

import math

import torch
from pyro.distributions import Delta
from pyro.distributions.distribution import Distribution as PyroDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Distribution, Independent, Normal

__all__ = [
    "distribution_name",
    "expands",
    "passed_on",
    "slice_offset",
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


def expands(value, drawn: torch.Tensor) -> bool:
    """Whether ``value`` is ``drawn`` or an ``expand`` of it (the same memory, read with the
    same strides, zero strides on new or broadcast dims), so that it holds ``drawn``'s values:
    a plate (vectorized particles) expands the ``Delta`` that passes a draw on, and
    provenance tracking wraps the draw in another tensor object."""
    if value is drawn:
        return True
    if not isinstance(value, torch.Tensor) or value.dim() < drawn.dim():
        return False
    if value.data_ptr() != drawn.data_ptr() or value.dtype != drawn.dtype:
        return False
    lead = value.dim() - drawn.dim()
    if any(st != 0 for st in value.stride()[:lead]):
        return False
    return all(
        stride == old_stride and size == old_size or stride == 0 and old_size == 1
        for size, stride, old_size, old_stride in zip(
            value.shape[lead:], value.stride()[lead:], drawn.shape, drawn.stride()
        )
    )


def passed_on(fn, drawn: torch.Tensor) -> bool:
    """Whether ``fn`` is a ``Delta`` (any wrappers) at exactly the values of ``drawn``, with
    no log-density of its own: Pyro's ``AutoNormal`` passes its ``"<name>_unconstrained"``
    draw on as ``"<name>"`` this way where the support is real (the identity transform)."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    if not isinstance(fn, Delta) or tuple(fn.v.shape) != tuple(drawn.shape):
        return False
    density = fn.log_density
    zero = bool((density == 0).all()) if isinstance(density, torch.Tensor) else density == 0
    return zero and expands(fn.v, drawn)


def slice_offset(value, drawn: torch.Tensor):
    """Where ``value`` starts in ``drawn``'s last dim when it is a view of one contiguous
    block of it per batch index, reshaped: ``value[b].flatten() == drawn[b, k : k + n]``
    (``n`` the size of ``value[b]``, ``b`` any index of ``drawn``'s batch dims); ``None``
    otherwise. Pyro's ``AutoDiagonalNormal`` gives each site such a slice of its one latent
    vector."""
    batch = drawn.dim() - 1
    if not isinstance(value, torch.Tensor) or batch < 0:
        return None
    strides = zip(drawn.shape[:batch], value.stride(), drawn.stride())
    if (
        value.dtype != drawn.dtype or value.dim() < batch or value.device != drawn.device
        or tuple(value.shape[:batch]) != tuple(drawn.shape[:batch]) or drawn.stride()[-1] != 1
        or any(n > 1 and a != b for n, a, b in strides)
    ):  # fmt: skip
        return None
    inner = value.shape[batch:]
    expected = [1] * len(inner)
    for i in range(len(inner) - 2, -1, -1):
        expected[i] = expected[i + 1] * inner[i + 1]
    if any(n > 1 and s != e for n, s, e in zip(inner, value.stride()[batch:], expected)):
        return None
    start, size = value.data_ptr() - drawn.data_ptr(), value.element_size()
    offset, n = start // size, math.prod(inner)
    if start % size or offset < 0 or offset + n > drawn.shape[-1]:
        return None
    return offset
