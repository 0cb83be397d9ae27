"""Analytic KL terms: ``log p(z) - log q(z)`` replaced by ``-KL(q || p)`` where that is exact.

For a latent ``z`` drawn from ``q(z | ...)`` whose model prior ``p(z)`` does not depend on any
other latent, ``E_q[log p(z) - log q(z)] = -KL(q || p)`` given everything sampled before
``z``; substituting the closed form keeps the ELBO's expectation and its gradient's
(the reparameterization gradient of the rest is unchanged) and removes the Monte Carlo
noise of that term (Kingma & Welling 2014, eq. 10; Pyro's ``TraceMeanField_ELBO``).

A guide site without a model site of its name may pass its draw on to one: Pyro's
``AutoNormal`` draws ``"<name>_unconstrained"`` from a Normal and samples ``"<name>"`` as a
``Delta`` at that very value where the support is real (the identity transform, a log-density
of zero; :func:`~.distributions.passed_on`). Then ``log p(w) - log q(w_u) - 0`` with
``w = w_u`` is the same term, and ``-KL(q(w_u) || p(w))`` replaces all three
(``KLDecision.through`` names the ``Delta`` and its model site).

:func:`plan_kl` decides per pathwise site whether the substitution is exact and says why
(not) in the site's route; :func:`site_kl` gives a site's scaled, masked, summed KL with the
kernels of :mod:`pyro_reparam_conv.kernels`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.ops.provenance import extract_provenance
from pyro.poutine import Trace

from .distributions import (
    distribution_name,
    partially_reparameterized,
    passed_on,
    unwrap_independent,
)
from .kernels import FAST, Kernels
from .evaluations import spans
from .routing import KLDecision, SitePlan


__all__ = ["MEASURE_PARTICLES", "kl_name", "kl_sites", "measure_kl", "plan_kl", "site_kl"]

#: the fewest vectorized particles on which :func:`measure_kl` compares two variances (a
#: sample variance's relative standard error is about sqrt(2 / n): 14% at 100)
MEASURE_PARTICLES = 100


def kl_name(q, p) -> str:
    q_base, _ = unwrap_independent(q)
    p_base, _ = unwrap_independent(p)
    return f"KL({distribution_name(q_base)}\u2016{distribution_name(p_base)})"


def site_kl(guide_site: dict, model_site: dict, kernels: Kernels = FAST) -> torch.Tensor:
    """The site's ``KL(q || p)`` with the guide site's scale and mask, summed (a scalar)."""
    q, p, scale = guide_site["fn"], model_site["fn"], guide_site["scale"]
    if guide_site["mask"] is None and isinstance(scale, (int, float)):
        kl = kernels.kl_sum(q, p)
        if kl is not None:
            return kl if scale == 1.0 else scale * kl
    kl = kernels.kl(q, p)  # on a tracked step with provenance: the table strips it
    return scale_and_mask(kl, scale=scale, mask=guide_site["mask"]).sum()


def _is_delta(fn) -> bool:
    while fn is not None:
        if isinstance(fn, Delta):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _same_scale_and_mask(a: dict, b: dict) -> bool:
    def same(x, y) -> bool:
        if x is y:
            return True
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            return x.shape == y.shape and bool((x == y).all())
        return x == y

    return same(a["scale"], b["scale"]) and same(a["mask"], b["mask"])


def _why_not(model_site: Optional[dict], guide_site: dict, depends_on) -> Optional[str]:
    """Why ``-KL`` cannot replace the site's ``log p - log q`` (``None``: it can)."""
    if model_site is None or model_site["type"] != "sample":
        return "no model site"
    if model_site["is_observed"]:
        return "observed in the model"
    if depends_on is None:
        return "prior dependencies unknown (dependency_tracking='order' or changed structure)"
    if depends_on:
        return f"its prior depends on latent {', '.join(sorted(map(repr, depends_on)))}"
    if _is_delta(guide_site["fn"]):
        # a point mass (e.g. AutoNormal's constrained value) may carry a log_density that
        # Pyro's KL(Delta || p) = -log p(v) leaves out; nothing to integrate anyway
        return "the guide site is a Delta (a point mass)"
    if partially_reparameterized(guide_site["fn"]):
        return "partially reparameterized (its score function needs the site's own terms)"
    if not _same_scale_and_mask(model_site, guide_site):
        return "model and guide sites differ in scale or mask"
    return None


def _through(guide_trace: Trace, model_trace: Trace, name: str) -> Optional[str]:
    """The guide ``Delta`` site (with a model site of its name, the same scale and mask) that
    passes guide site ``name``'s draw on unchanged, if any."""
    site = guide_trace.nodes[name]
    for other, delta in guide_trace.nodes.items():
        if (
            other != name and delta["type"] == "sample" and other in model_trace.nodes
            and delta["fn"].event_dim == site["fn"].event_dim
            and _same_scale_and_mask(site, delta) and passed_on(delta["fn"], site["value"])
        ):  # fmt: skip
            return other
    return None


def kl_sites(kl: Mapping[str, torch.Tensor], plans: Mapping[str, SitePlan]):
    """``(model sites, guide sites)`` whose terms the analytic KLs ``kl`` replace."""
    through = {name: plans[name].route.kl.through for name in kl}
    model = frozenset(t or name for name, t in through.items())
    return model, frozenset(kl) | frozenset(t for t in through.values() if t)


def _per_particle(value, dim: int, n: int) -> torch.Tensor:
    """A log-density summed over everything but the particle ``dim`` (a batch dim, counted
    from the right): one value per particle."""
    value = torch.as_tensor(value)
    if value.dim() < -dim:  # the same for every particle
        return value.sum().expand(n)
    value = value.movedim(dim, 0)
    return value.reshape(value.shape[0], -1).sum(1).expand(n)


def measure_kl(
    model_trace: Trace, guide_trace: Trace, sites: Mapping[str, Optional[str]], dim: int, n: int,
    kernels: Kernels = FAST,
) -> dict[str, str]:  # fmt: skip
    """For the ``sites`` planned with an analytic KL (each with its ``through`` site, or
    ``None``; :class:`~.routing.KLDecision`): the ones whose Monte Carlo terms
    ``log p - log q`` give the ELBO less variance than ``-KL`` does, each with why, measured
    on traces of ``n`` independent particles vectorized along batch ``dim`` (log-densities
    computed, no values side by side). ``-KL`` is ``E[log p - log q]`` given what is sampled
    before the site, so it removes that term's own noise, but where the guide is close to
    the posterior ``log p(x, z) - log q(z)`` is nearly constant and the Monte Carlo terms
    cancel the likelihood's noise (zero variance at the exact posterior). Each site is
    compared with every other site's Monte Carlo terms in place."""
    with torch.no_grad():
        model = [_per_particle(s["log_prob"], dim, n) for s in model_trace.nodes.values()
                 if "log_prob" in s]  # fmt: skip
        guide = [_per_particle(s["log_prob"], dim, n) for s in guide_trace.nodes.values()
                 if "log_prob" in s]  # fmt: skip
        total = sum(model) - sum(guide)
        kept: dict[str, str] = {}
        for name, through in sites.items():
            q_site, p_site = guide_trace.nodes[name], model_trace.nodes[through or name]
            terms = _per_particle(p_site["log_prob"], dim, n) - _per_particle(
                q_site["log_prob"], dim, n)  # fmt: skip
            if through:  # the Delta's own log-density (zero)
                terms = terms - _per_particle(guide_trace.nodes[through]["log_prob"], dim, n)
            kl, _ = extract_provenance(kernels.kl(q_site["fn"], p_site["fn"]))
            kl = scale_and_mask(kl, scale=q_site["scale"], mask=q_site["mask"])
            with_kl = total - terms - _per_particle(kl, dim, n)
            var_terms, var_kl = total.var().item(), with_kl.var().item()
            if var_terms < var_kl:
                kept[name] = (
                    f"measured: the ELBO varies less with log p - log q (variance {var_terms:.3g}) "
                    f"than with -KL ({var_kl:.3g}) over {n} particles"
                )
    return kept


def _evaluated(guide_site: dict, dims: Mapping[str, int]) -> Optional[str]:
    """Why not, when the guide distribution has the evaluation dim of another site."""
    shape = guide_site["fn"].batch_shape
    for site, dim in dims.items():
        if spans(shape, dim) > 1:
            return f"it depends on {site!r}, whose values are evaluated side by side"
    return None


def plan_kl(
    model_trace: Trace,
    guide_trace: Trace,
    plans: Mapping[str, SitePlan],
    priors: Optional[Mapping[str, frozenset]],
    kernels: Kernels = FAST,
    measured: Mapping[str, str] = {},
) -> tuple[dict[str, torch.Tensor], dict[str, SitePlan]]:
    """``KL(q || p)`` (scaled, masked, summed) of each site whose estimator takes it
    (:attr:`~.estimators.base.Estimator.takes_analytic_kl`) where it is exact, and the plans
    with their :class:`~.routing.KLDecision`.

    ``priors`` maps each latent model site to the latents its prior's parameters depend on
    (``None``: unknown, and no site gets the KL); a KL that has the evaluation dim of a
    site evaluated at several values would need its weights: no KL; ``measured`` the sites
    whose Monte Carlo terms were measured to vary less (:func:`measure_kl`), with why.
    """
    kl: dict[str, torch.Tensor] = {}
    planned, passes = dict(plans), {}
    dims = {name: plan.dim for name, plan in plans.items() if plan.dim is not None}
    for name, plan in plans.items():
        if not plan.estimator.takes_analytic_kl:
            continue
        model_site, guide_site = model_trace.nodes.get(name), guide_trace.nodes[name]
        through = _through(guide_trace, model_trace, name) if model_site is None else None
        if through is not None:
            model_site = model_trace.nodes[through]
        depends_on = None if priors is None else priors.get(through or name, frozenset())
        why_not = (measured.get(name) or _why_not(model_site, guide_site, depends_on)
                   or _evaluated(guide_site, dims))  # fmt: skip
        if why_not is None:
            try:
                kl[name] = site_kl(guide_site, model_site, kernels)
            except NotImplementedError:
                why_not = f"no closed-form {kl_name(guide_site['fn'], model_site['fn'])}"
            except ValueError as e:
                why_not = str(e)
        if why_not is None:
            what = kl_name(guide_site["fn"], model_site["fn"])
            if through is not None:
                what += f" with model site {through!r} (its guide Delta passes the draw on)"
                passes[through] = KLDecision(False, f"its terms are in the analytic KL of {name!r}")
            decision = KLDecision(True, what, through)
        else:
            decision = KLDecision(False, why_not)
        planned[name] = plan.decided(kl=decision)
    for through, decision in passes.items():
        planned[through] = planned[through].decided(kl=decision)
    return kl, planned
