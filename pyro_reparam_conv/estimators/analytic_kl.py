"""Analytic KL terms: ``log p(z) - log q(z)`` replaced by ``-KL(q || p)`` where that is exact.

For a latent ``z`` drawn from ``q(z | ...)`` whose model prior ``p(z)`` does not depend on any
other latent, ``E_q[log p(z) - log q(z)] = -KL(q || p)`` given everything sampled before
``z``; substituting the closed form keeps the ELBO's expectation and its gradient's
(the reparameterization gradient of the rest is unchanged) and removes the Monte Carlo
noise of that term (Kingma & Welling 2014, eq. 10; Pyro's ``TraceMeanField_ELBO``).

:func:`analytic_kl` evaluates ``Normal || Normal`` (under ``Independent``) in closed form
with broadcasting, so a prior such as ``Normal(0, 1).expand(shape)`` is never materialized;
other pairs go to ``torch.distributions.kl_divergence`` (with Pyro's registrations).
:func:`kl_surrogate_elbo` is :func:`~.pathwise.pathwise_surrogate_elbo` with the KL sites'
terms replaced.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.ops.provenance import extract_provenance
from pyro.poutine import Trace
from torch.distributions import Distribution, Independent, Normal
from torch.distributions.transforms import Transform

from ..routing import Route

__all__ = [
    "analytic_kl",
    "compact_normal_log_prob",
    "distribution_provenance",
    "kl_name",
    "kl_surrogate_elbo",
    "site_kl",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _unwrap_independent(d: Distribution) -> tuple[Distribution, int]:
    ndims = 0
    while isinstance(d, Independent):
        ndims += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, ndims


def _is_plain_normal(d: Distribution) -> bool:
    """A torch/Pyro ``Normal`` whose density is ``Normal``'s own (not a subclass's)."""
    return isinstance(d, Normal) and type(d).log_prob is Normal.log_prob


def _compact(t: torch.Tensor) -> torch.Tensor:
    """The smallest view of ``t`` that broadcasts back to it (drops stride-0 expanded dims)."""
    for dim in range(t.dim()):
        if t.stride(dim) == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def normal_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """``KL(Normal(q_loc, q_scale) || Normal(p_loc, p_scale))`` elementwise, broadcasting."""
    p_loc, p_scale = _compact(p_loc), _compact(p_scale)
    var_ratio = (q_scale / p_scale).pow(2)
    t1 = ((q_loc - p_loc) / p_scale).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def compact_normal_log_prob(fn: Distribution, value: torch.Tensor) -> Optional[torch.Tensor]:
    """``fn.log_prob(value)`` for an (``Independent``) ``Normal`` whose loc or scale is an
    expanded view (e.g. ``Normal(out, 1.0)``), computed on the compact parameters so the
    scale's log and square are not taken elementwise over the full shape. ``None`` for any
    other distribution (the caller then uses ``fn.log_prob``). No argument validation.
    """
    base, ndims = _unwrap_independent(fn)
    if not _is_plain_normal(base):
        return None
    if isinstance(base.loc, (int, float)) or isinstance(base.scale, (int, float)):
        return None
    loc, scale = _compact(base.loc), _compact(base.scale)
    if loc.numel() == base.loc.numel() and scale.numel() == base.scale.numel():
        return None  # nothing to save
    log_p = -((value - loc) ** 2) / (2 * scale**2) - scale.log() - _HALF_LOG_2PI
    full = fn.batch_shape + fn.event_shape
    if log_p.shape != full:
        log_p = log_p.expand(torch.broadcast_shapes(log_p.shape, full))
    return log_p.sum(list(range(-ndims, 0))) if ndims else log_p


def kl_name(q: Distribution, p: Distribution) -> str:
    q_base, _ = _unwrap_independent(q)
    p_base, _ = _unwrap_independent(p)
    return f"KL({type(q_base).__name__}\u2016{type(p_base).__name__})"


def analytic_kl(q: Distribution, p: Distribution) -> torch.Tensor:
    """``KL(q || p)`` with shape ``q.batch_shape``.

    Raises ``NotImplementedError`` when no closed form is registered, and ``ValueError``
    when the event shapes differ or ``p``'s batch shape does not broadcast to ``q``'s.
    """
    if q.event_shape != p.event_shape:
        raise ValueError(f"event shapes differ: {tuple(q.event_shape)} vs {tuple(p.event_shape)}")
    try:
        shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    except RuntimeError:
        shape = None
    if shape != q.batch_shape:
        raise ValueError(
            f"prior batch shape {tuple(p.batch_shape)} does not broadcast to the guide's "
            f"{tuple(q.batch_shape)}"
        )
    q_base, q_nd = _unwrap_independent(q)
    p_base, p_nd = _unwrap_independent(p)
    if _is_plain_normal(q_base) and _is_plain_normal(p_base) and q_nd == p_nd:
        kl = normal_kl(q_base.loc, q_base.scale, p_base.loc, p_base.scale)
        full = q.batch_shape + q.event_shape
        if kl.shape != full:
            kl = kl.expand(full)
        return kl.sum(list(range(-q_nd, 0))) if q_nd else kl
    kl = kl_divergence(q, p)
    if kl.shape != q.batch_shape:
        kl = kl.expand(q.batch_shape)
    return kl


def site_kl(guide_site: dict, model_site: dict) -> torch.Tensor:
    """The site's ``KL(q || p)`` with the guide site's scale and mask, summed (a scalar)."""
    kl, _ = extract_provenance(analytic_kl(guide_site["fn"], model_site["fn"]))
    kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
    return kl.sum()


def distribution_provenance(fn) -> frozenset:
    """The provenance (latent site names) carried by any tensor parameter of ``fn``.

    Walks wrapped distributions (``base_dist``) and transforms; the value is not included.
    """
    provenance: frozenset = frozenset()
    stack, seen = [fn], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                provenance = provenance | extract_provenance(value)[1]
            elif isinstance(value, (Distribution, Transform)):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, (Distribution, Transform)))
    return provenance


def kl_surrogate_elbo(
    model_trace: Trace,
    guide_trace: Trace,
    routes: Mapping[str, Route],
    kl: Mapping[str, torch.Tensor],
) -> torch.Tensor | float:
    """``pathwise_surrogate_elbo`` with ``log p - log q`` of each site in ``kl`` as ``-KL``."""
    total: torch.Tensor | float = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and name not in kl:
            total = total + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or name in kl or routes.get(name) is None:
            continue
        if routes[name].estimator == "pathwise":
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                total = total - entropy_term.sum()
    for value in kl.values():
        total = total - value
    return total
