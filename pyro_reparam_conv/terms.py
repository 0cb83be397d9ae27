"""The site-term table: what each sample site of one particle adds to the ELBO and its surrogate.

For one draw (a *particle*) of the guide and the model replayed on it, the ELBO estimate and
the surrogate whose gradient is the routed estimator are sums of per-site terms:

    ELBO      = sum_model log p  -  sum_guide log q
    surrogate = sum_model log p  -  sum_guide entropy_term
                + sum_guide score_function * stop_grad(cost - baseline)

where each guide site's ``(log q, score_function, entropy_term)`` are its score parts as its
estimator gives them (:mod:`.estimators`); latent sites are routed, observed guide sites and
guide factors keep their distribution's own parts. An analytic-KL pair (the fast path,
:mod:`.analytic_kl`) enters both sums as one ``-KL(q || p)`` row. This is the
surrogate of Pyro's ``Trace_ELBO``, with two differences that keep every expectation and
lower the variance: a score-function term's cost counts only the terms that depend on its
site (Rao-Blackwellization, Schulman et al. 2015), per element of the site's plates (Pyro's
:class:`~pyro.infer.util.MultiFrameTensor`; batch dims that no plate declares are summed, so
no independence is assumed where none is declared); and baselines (:mod:`.baselines`)
are subtracted from it. A score-function part whose dependencies are not tracked (a guide
factor with ``has_rsample=False``) is charged with every term, as ``Trace_ELBO`` does.

Terms that carry values of the guide's enumerated sites are weighed by the marginal
probability of those values (:class:`~.enumeration.GuideMarginals`); a score-function
site drawn per enumerated value gets the conditional expectation of its costs given the
values its own density carries.

:func:`particle_terms` builds a :class:`ParticleTerms`; the ELBO's loss, its surrogate, the
non-finite scan and :func:`~.diagnostics.audit_gradients`' per-site attribution all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.util import MultiFrameTensor
from pyro.ops.provenance import ProvenanceTensor, extract_provenance
from pyro.poutine import Trace

from .analytic_kl import kl_sites
from .dependencies import SiteKey, ordered_dependencies
from .baselines import BaselineSpec
from .distributions import partially_reparameterized
from .evaluations import (
    evaluations_of,
    expectation,
    expectation_per_element,
    present,
    weight_of,
    weighted_terms,
)
from .locality import Footprint, per_element, scaled_elements
from .routing import Route, SitePlan

__all__ = [
    "ParticleTerms",
    "SiteTerm",
    "add_terms",
    "may_need_costs",
    "needs_cost",
    "particle_terms",
]


def add_terms(terms) -> Any:
    """The sum of ``terms``, skipping Python zeros (no tensor op adds a 0)."""
    total: Any = 0.0
    for term in terms:
        if isinstance(term, (int, float)) and term == 0:
            continue
        total = term if isinstance(total, float) and total == 0 else total + term
    return total


@dataclass(frozen=True)
class SiteTerm:
    """One row of the table: a sample site of one particle.

    ``role``: ``"model"``, ``"guide"``, or ``"kl"`` for an analytic-KL pair. ``elbo``: its
    term of the ELBO (``log p``, ``-log q`` or ``-KL``, scaled and masked, summed).
    ``surrogate``: its differentiable term of the surrogate apart from the score function
    (``log p``, ``-entropy_term`` or ``-KL``, and an estimator's own term). ``score``: the
    score-function part (elementwise, unscaled) when the site has one, ``cost`` its
    Rao-Blackwellized cost (detached, same shape) and ``score_weight`` the (detached)
    weights of the evaluations it has. ``baseline``: the baseline spec of a routed site
    whose estimator takes one. ``particle_dim``: the dim of ``score`` and ``cost`` that
    Pyro's vectorized particle plate (``num_particles_vectorized``) declares, if any.
    """

    site: str
    role: str
    estimator: Optional[str]
    elbo: Any
    surrogate: Any
    score: Optional[torch.Tensor] = None
    cost: Optional[torch.Tensor] = None
    baseline: Optional[BaselineSpec] = None
    score_weight: Any = 1.0
    particle_dim: Optional[int] = None

    def __post_init__(self) -> None:
        # the one place that strips provenance from what the table holds: on a tracked step
        # the distributions' parameters carry it into every term computed from them
        for field_name in ("elbo", "surrogate", "score", "cost", "score_weight"):
            value = getattr(self, field_name)
            if isinstance(value, ProvenanceTensor):
                object.__setattr__(self, field_name, extract_provenance(value)[0])

    @property
    def label(self) -> str:
        """``"x (model)"``, ``"z (guide)"`` or ``"z (analytic KL)"``."""
        return f"{self.site} ({'analytic KL' if self.role == 'kl' else self.role})"

    @property
    def finite(self) -> bool:
        return not isinstance(self.elbo, torch.Tensor) or bool(torch.isfinite(self.elbo).all())


@dataclass(frozen=True)
class ParticleTerms:
    """The traces, routes and site-term table of one particle."""

    model_trace: Trace
    guide_trace: Trace
    routes: Mapping[str, Route]
    rows: tuple[SiteTerm, ...]
    dependencies: Mapping[SiteKey, frozenset] = field(default_factory=dict)

    def elbo(self) -> Any:
        """``log p - log q`` of this particle (a scalar tensor, or ``0.0`` with no sites)."""
        return add_terms(row.elbo for row in self.rows)

    def surrogate_elbo(self) -> Any:
        """The surrogate ELBO without its score-function terms (they need baselines)."""
        return add_terms(row.surrogate for row in self.rows)

    def scored(self) -> list[SiteTerm]:
        """The rows with a score-function part."""
        return [row for row in self.rows if row.score is not None]

    def non_finite(self) -> list[str]:
        """Labels of the rows whose ELBO term is NaN or infinite."""
        return [row.label for row in self.rows if not row.finite]


def needs_cost(fn, plan: Optional[SitePlan]) -> bool:
    """Whether a guide site may carry a score-function part or an estimator's own surrogate
    term, and so needs its cost (read from its estimator and distribution, before any
    log-density is computed): the one rule for every reader."""
    if plan is not None:
        return plan.estimator.has_score_function(fn) or plan.estimator.has_own_surrogate
    return not getattr(fn, "has_rsample", False) or partially_reparameterized(fn)


def may_need_costs(guide_trace: Trace, plans: Mapping[str, SitePlan]) -> bool:
    """Whether some guide sample site needs its cost (:func:`needs_cost`)."""
    return any(
        needs_cost(site["fn"], plans.get(name))
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
    )


def _costs(
    model_trace: Trace,
    guide_trace: Trace,
    targets: Mapping[str, dict],
    dependencies: Optional[Mapping[SiteKey, frozenset]],
    evaluations,
    marginals=None,
) -> dict[str, Any]:
    """Each target guide site's cost: the ``log p - log q`` terms that depend on it (all
    terms where ``dependencies`` is ``None`` or does not know the site), summed to its plates,
    per evaluation of the site and of those it depends on (other evaluations averaged; the
    guide's enumerated values by their conditional probability, ``marginals``)."""
    known = set() if dependencies is None else {s for deps in dependencies.values() for s in deps}
    costs = {name: MultiFrameTensor() for name in targets}
    kept = {
        name: {e.site for e in present(site["log_prob"], evaluations)}
        for name, site in targets.items()
    }  # the cost of a site keeps the evaluations its own terms have
    given = {
        name: marginals.symbols(site["log_prob"], site) if marginals else frozenset()
        for name, site in targets.items()
    }  # and the enumerated values they carry
    for role, sign, trace in (("model", 1.0, model_trace), ("guide", -1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or "log_prob" not in site:
                continue
            depends_on = () if dependencies is None else dependencies.get((role, name), ())
            term = None
            for target in targets:
                if target in depends_on or target not in known:
                    if term is None:
                        term = site["log_prob"] if sign > 0 else -site["log_prob"]
                    label = f"{name!r} ({role})"
                    value = expectation(term, evaluations, label, kept[target], detach=True)
                    if marginals is not None:
                        value = marginals.expect(value, site, given[target], label=label)
                    costs[target].add((site["cond_indep_stack"], value))
    eval_dims = {e.dim for e in evaluations} | (marginals.dims if marginals else set())
    return {
        name: _sum_to_site(costs[name], site["cond_indep_stack"], eval_dims)
        for name, site in targets.items()
    }


def _sum_to_site(cost: MultiFrameTensor, stack, eval_dims=frozenset()) -> Any:
    """``cost.sum_to`` the site's plates, then the sum over dims that neither such a plate
    nor an evaluation declares."""
    frames = frozenset(f for f in stack if f.vectorized)
    total = cost.sum_to(frames)
    if not isinstance(total, torch.Tensor):
        return total
    kept = {f.dim for f in frames} | set(eval_dims)
    dims = [d for d in range(-total.dim(), 0) if total.shape[d] != 1 and d not in kept]
    return total.sum(dims, keepdim=True) if dims else total


def _fit_to(cost: Any, like: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """``cost`` detached (unless not ``detach``), without leading singleton dims beyond
    ``like``'s rank, broadcast to ``like``'s shape."""
    cost = torch.as_tensor(cost, dtype=like.dtype, device=like.device)
    cost = cost.detach() if detach else cost
    while cost.dim() > like.dim() and cost.shape[0] == 1:
        cost = cost[0]
    return cost.expand(like.shape)


def _score_weight(t: torch.Tensor, evaluations, label: str, marginal=1.0) -> Any:
    """The (detached) weights of the evaluations ``t`` has (times ``marginal``, the
    probability of the guide's enumerated values it carries), or ``1.0`` if it has none."""
    found = present(t, evaluations)
    weight = weight_of(t, found, label) * marginal if found else marginal
    return weight.detach() if isinstance(weight, torch.Tensor) else weight


def _particle_dim(site: dict, score: Optional[torch.Tensor], event_dims: int) -> Optional[int]:
    """The dim of a score (batch dims, then ``event_dims``) that the vectorized particle
    plate declares, read from the site's plates (never counted)."""
    if score is None:
        return None
    for frame in site["cond_indep_stack"]:
        if frame.name == "num_particles_vectorized" and frame.vectorized:
            return frame.dim - event_dims
    return None


def _per_element(footprint: Footprint, model_trace: Trace, site: dict, evaluations):
    """Score, cost and score weights per element of a map site: its own ``log p(z_e) -
    log q(z_e)`` and the dependent maps summed over its footprint, each averaged over the
    evaluations its own terms do not have (:mod:`.locality`)."""
    name, event = site["name"], site["fn"].event_dim
    score = per_element(site)  # unscaled, as a score function is
    kept = {e.site for e in present(site["log_prob"], evaluations)}
    label = f"{name!r} (per element)"

    def average(t: torch.Tensor, event_dims: int) -> torch.Tensor:
        return expectation_per_element(t, event_dims, evaluations, label, kept)

    model_site = model_trace.nodes[name]
    own_p = scaled_elements(model_site, per_element(model_site))
    cost = average(own_p, event) - average(scaled_elements(site, score), event)
    for term, box_sum in footprint.sums.items():
        node = model_trace.nodes[term]
        per = per_element(node)
        if per is not None and tuple(per.shape) == box_sum.shape:
            values = average(scaled_elements(node, per), node["fn"].event_dim)
        else:  # no per-element density: the term per element of its batch shape
            values = expectation(node["log_prob"], evaluations, label, kept, detach=True)
        cost = cost + box_sum(values.detach())
    weight = _score_weight(site["log_prob"], evaluations, label)
    if isinstance(weight, torch.Tensor):
        weight = weight.reshape(weight.shape + (1,) * event)
    return score, _fit_to(cost, score), weight


def _marginal(marginals, t, site: dict, role: str) -> Any:
    """The probability of the guide's enumerated values that ``t`` carries (``1.0``: none)."""
    label = f"{site['name']!r} ({role})"
    return 1.0 if marginals is None else marginals.weight(t, site, label=label)


def _model_row(site: dict, evaluations, marginals=None) -> SiteTerm:
    """A model site's row: ``log p``, averaged over the evaluations it has."""
    name = site["name"]
    if evaluations or marginals is not None:
        lp = site["log_prob"]
        marginal = _marginal(marginals, lp, site, "model")
        elbo, surrogate = weighted_terms(lp, lp, evaluations, f"{name!r} (model)", marginal)
    else:
        elbo = surrogate = site["log_prob_sum"]
    return SiteTerm(name, "model", None, elbo, surrogate)


def _guide_terms(site: dict, parts, evaluations, marginals=None) -> tuple[Any, Any]:
    """A guide site's ELBO term ``-log q`` and surrogate term ``-entropy_term``."""
    entropy = parts.entropy_term
    surrogate_t = 0.0 if is_identically_zero(entropy) else -entropy
    if evaluations or marginals is not None:
        label = f"{site['name']!r} (guide)"
        marginal = _marginal(marginals, site["log_prob"], site, "guide")
        return weighted_terms(-site["log_prob"], surrogate_t, evaluations, label, marginal)
    surrogate = surrogate_t.sum() if isinstance(surrogate_t, torch.Tensor) else 0.0
    return -site["log_prob_sum"], surrogate


def _guide_row(
    site, plan, parts, cost, evaluations, footprint, model_trace, marginals=None
) -> SiteTerm:
    """A guide site's row: its terms, and where it has a score function, the score with its
    cost (per element of its map with a ``footprint``) and weights."""
    name = site["name"]
    elbo, surrogate = _guide_terms(site, parts, evaluations, marginals)
    score, score_weight, event_dims = None, 1.0, 0
    has_score = not is_identically_zero(parts.score_function)
    if footprint is not None and has_score:
        score, cost, score_weight = _per_element(footprint, model_trace, site, evaluations)
        event_dims = site["fn"].event_dim
    elif cost is not None:
        if has_score:
            score = parts.score_function
            marginal = _marginal(marginals, score, site, "guide")
            score_weight = _score_weight(score, evaluations, f"{name!r} (guide)", marginal)
        like = site["log_prob"] if score is None else score
        if plan is not None:
            live = _fit_to(cost, like, detach=not plan.estimator.cost_graph)
            own = plan.estimator.surrogate(site, live, plan.dim)
            if isinstance(own, torch.Tensor):
                own = expectation(own, evaluations, f"{name!r}", {name}, detach=True)
                if marginals is not None:
                    own = marginals.expect(own, site)
                surrogate = surrogate + own.sum()
        cost = _fit_to(cost, like)
    return SiteTerm(
        name, "guide", plan.estimator.name if plan else None, elbo, surrogate, score,
        cost if score is not None else None, plan.baseline if plan else None, score_weight,
        _particle_dim(site, score, event_dims),
    )  # fmt: skip


def particle_terms(
    model_trace: Trace,
    guide_trace: Trace,
    plans: Mapping[str, SitePlan],
    kl: Mapping[str, torch.Tensor],
    dependencies: Optional[Mapping[SiteKey, frozenset]],
    footprints: Mapping[str, Footprint] = {},
    marginals=None,
) -> ParticleTerms:
    """The table of one particle whose traces hold their log-densities and score parts, in
    one walk: model rows, guide rows (with the costs of the sites that need them,
    :func:`needs_cost`), analytic-KL rows.

    ``plans``: each routed guide site's :class:`~.routing.SitePlan`; ``kl``: the
    analytic-KL sites and their ``KL(q || p)``; ``dependencies``: which latent sites each
    ``(role, name)`` term depends on (``None``: unknown, then the sampling order stands in
    for latent sites); ``footprints``: the score-function sites whose costs are per element
    of their map (:mod:`.locality`); ``marginals``: the guide's enumerated sites'
    :class:`~.enumeration.GuideMarginals` (``None``: none).
    """
    evaluations = evaluations_of(guide_trace, plans)
    sample = [(n, s) for n, s in model_trace.nodes.items() if s["type"] == "sample"]
    in_model, in_guide = kl_sites(kl, plans)
    rows = [
        _model_row(site, evaluations, marginals) for name, site in sample if name not in in_model
    ]
    guide = []
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and name not in in_guide:
            plan = plans.get(name)
            parts = plan.estimator.score_parts(site) if plan else site["score_parts"]
            guide.append((site, plan, parts))
    targets = {s["name"]: s for s, plan, _ in guide if needs_cost(s["fn"], plan)}
    if dependencies is None and targets:
        dependencies = ordered_dependencies(model_trace, guide_trace, set(targets) & set(plans))
    costs = {}
    if targets:
        costs = _costs(model_trace, guide_trace, targets, dependencies, evaluations, marginals)
    for site, plan, parts in guide:
        footprint = footprints.get(site["name"])
        cost = costs.get(site["name"])
        rows.append(
            _guide_row(site, plan, parts, cost, evaluations, footprint, model_trace, marginals)
        )
    rows += [SiteTerm(name, "kl", plans[name].estimator.name, -v, -v) for name, v in kl.items()]
    routes = {name: plan.route for name, plan in plans.items()}
    return ParticleTerms(model_trace, guide_trace, routes, tuple(rows), dependencies or {})
