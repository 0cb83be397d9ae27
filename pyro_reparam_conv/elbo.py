"""RoutedELBO: a Pyro ELBO whose surrogate loss is built per site from its routed estimator.

The loss is the usual Monte Carlo ELBO estimate, ``-(sum log p(x, z) - sum log q(z))``
averaged over particles, equal to ``Trace_ELBO``'s on the same traces. Its gradient comes
from the surrogate

    sum_model log p + sum_pathwise (-log q) + sum_score log q(z) * stop_grad(c - b)

where pathwise sites are differentiated through ``rsample`` (Kingma & Welling 2014), score
sites use the Rao-Blackwellized cost ``c`` of the terms downstream of them (Schulman et al.
2015) and a baseline ``b`` (Williams 1992; Mnih & Gregor 2014; Kool et al. 2019). Which
estimator a site gets is decided by :mod:`pyro_reparam_conv.routing` and reported in
``elbo.routes`` after every call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_backward, torch_item
from pyro.poutine import Trace
from pyro.util import check_if_enumerated

from .estimators.baselines import BaselineSpec, DecayingAverages, leave_one_out, normalize_kind
from .estimators.pathwise import pathwise_surrogate_elbo
from .estimators.score import ScoreTerm, ordered_dependencies, score_terms, strip_provenance
from .routing import Route, RouteMessenger

__all__ = ["NonFiniteLossError", "RoutedELBO"]

DEPENDENCY_TRACKING = ("cached", "always", "order")


class NonFiniteLossError(ValueError):
    """The ELBO was NaN or infinite; ``sites`` lists the sites whose log-density was not finite."""

    def __init__(self, loss: float, sites: list[str]) -> None:
        self.loss = loss
        self.sites = sites
        where = ", ".join(sites) if sites else "no single site (the sum overflowed)"
        super().__init__(f"ELBO loss is {loss}; non-finite log-density at: {where}")


@dataclass
class _Particle:
    model_trace: Trace
    guide_trace: Trace
    routes: dict[str, Route]
    baselines: dict[str, BaselineSpec]
    elbo: torch.Tensor
    surrogate_elbo: Any
    score_terms: list[ScoreTerm]


def _non_finite_sites(particles: list[_Particle]) -> list[str]:
    bad = []
    for p in particles:
        for role, trace in (("model", p.model_trace), ("guide", p.guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not bool(torch.isfinite(site["log_prob_sum"]).all()):
                    label = f"{name} ({role})"
                    if label not in bad:
                        bad.append(label)
    return bad


def _signature(model_trace: Trace, guide_trace: Trace, routes: Mapping[str, Route]) -> tuple:
    """The sequence of sample sites (and routes) that a cached dependency map belongs to."""
    guide = tuple(
        (name, routes[name].estimator if name in routes else "obs")
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
    )
    model = tuple(name for name, site in model_trace.nodes.items() if site["type"] == "sample")
    return guide, model


class RoutedELBO(ELBO):
    """Drop-in replacement for :class:`~pyro.infer.Trace_ELBO` with per-site estimator routing.

    :param num_particles: particles per estimate.
    :param max_plate_nesting: as for :class:`~pyro.infer.ELBO`.
    :param vectorize_particles: draw all particles in one vectorized pass.
    :param baseline: default baseline of score-routed sites: ``"auto"`` (leave-one-out with
        several particles, decaying average with one), ``"leave_one_out"``/``"loo"``,
        ``"decaying_avg"``/``"avg"``, or ``None`` for none. Sites override it through
        ``infer={"baseline": {...}}`` with Pyro's keys or ``infer={"baseline": None}``.
    :param dependency_tracking: how a score site's downstream terms are found. ``"cached"``
        (default): provenance tracking on the first step and whenever the sequence of sample
        sites changes, and the map found then reused (provenance tensors cost about 5x per
        step on small models); a step whose sites differ from the cached ones falls back to
        sampling order. ``"always"``: provenance on every step (for models whose data flow
        between sites changes while their sites stay the same). ``"order"``: sampling order
        only (every later term is charged; unbiased, more variance).

    After each call ``routes`` maps every guide latent site to its :class:`~.routing.Route`.
    Decaying-average baselines are state: :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        baseline: Optional[str] = "auto",
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: Optional[bool] = None,
        dependency_tracking: str = "cached",
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )
        self.baseline = normalize_kind(baseline)
        if self.baseline == "leave_one_out" and num_particles < 2:
            raise ValueError("baseline='leave_one_out' needs num_particles >= 2")
        if dependency_tracking not in DEPENDENCY_TRACKING:
            raise ValueError(
                f"dependency_tracking must be one of {DEPENDENCY_TRACKING}, "
                f"got {dependency_tracking!r}"
            )
        self.dependency_tracking = dependency_tracking
        self.routes: dict[str, Route] = {}
        self._averages = DecayingAverages()
        self._router: Optional[RouteMessenger] = None
        self._dependency_cache: Optional[tuple[tuple, dict]] = None

    @property
    def default_baseline(self) -> Optional[str]:
        if self.baseline == "auto":
            return "leave_one_out" if self.num_particles > 1 else "decaying_avg"
        return self.baseline

    # ----------------------------------------------------------------- traces
    def _get_trace(self, model, guide, args, kwargs):
        track = self.dependency_tracking == "always" or (
            self.dependency_tracking == "cached" and self._dependency_cache is None
        )
        router = RouteMessenger(self.default_baseline, track=track)
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, router(guide), args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        self._router = router
        return model_trace, guide_trace

    def _particles(self, model, guide, args, kwargs, with_surrogate: bool) -> list[_Particle]:
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            router = self._router
            dependencies = self._dependencies(model_trace, guide_trace, router)
            elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            surrogate, terms = 0.0, []
            if with_surrogate:
                surrogate = pathwise_surrogate_elbo(model_trace, guide_trace, router.routes)
                terms = score_terms(model_trace, guide_trace, router.routes, dependencies)
            particles.append(
                _Particle(
                    model_trace, guide_trace, router.routes, router.baselines, elbo, surrogate, terms
                )
            )
        self.routes = dict(particles[-1].routes)
        return particles

    def _dependencies(self, model_trace: Trace, guide_trace: Trace, router: RouteMessenger):
        """Which score sites each log-density depends on (see ``dependency_tracking``)."""
        if router.track:
            dependencies = strip_provenance(model_trace, guide_trace)
            if self.dependency_tracking == "cached":
                signature = _signature(model_trace, guide_trace, router.routes)
                self._dependency_cache = (signature, dependencies)
            return dependencies
        score_sites = [n for n, r in router.routes.items() if r.estimator == "score"]
        if self.dependency_tracking == "cached" and score_sites:
            signature, dependencies = self._dependency_cache
            if signature == _signature(model_trace, guide_trace, router.routes):
                return dependencies
            self._dependency_cache = None  # structure changed: track again next step
        return ordered_dependencies(model_trace, guide_trace, score_sites)

    # -------------------------------------------------------------- baselines
    def _particle_dim(self) -> Optional[int]:
        if self.vectorize_particles and self.num_particles > 1:
            return -int(self.max_plate_nesting)
        return None

    def _baseline_values(
        self, site: str, spec: BaselineSpec, costs: list[torch.Tensor]
    ) -> tuple[list[Any], Any]:
        """Baselines for one site's costs (one per particle) and the baseline-fitting loss."""
        kind = spec.kind
        zero = [0.0] * len(costs)
        if kind is None:
            return zero, 0.0
        particle_dim = self._particle_dim()
        if kind == "leave_one_out":
            if particle_dim is not None:
                return [leave_one_out(costs[0], particle_dim)], 0.0
            if len(costs) < 2:
                raise ValueError(
                    f"site {site!r}: a leave-one-out baseline needs num_particles >= 2"
                )
            if all(c.shape == costs[0].shape for c in costs):
                return list(leave_one_out(torch.stack(costs), 0).unbind(0)), 0.0
            means = torch.stack([c.mean() for c in costs])
            return list(leave_one_out(means, 0).unbind(0)), 0.0
        if kind == "decaying_avg":
            baseline = [self._averages.baseline(site, c) for c in costs]
            mean_cost = costs[0]
            if particle_dim is not None:
                mean_cost = mean_cost.mean(particle_dim, keepdim=True)
            elif len(costs) > 1 and all(c.shape == mean_cost.shape for c in costs):
                mean_cost = torch.stack(costs).mean(0)
            self._averages.update(site, mean_cost, spec.beta)
            return baseline, 0.0
        # learned baselines: an nn of a (detached) input, or a user tensor
        value = spec.nn(spec.nn_input.detach()) if kind == "nn" else spec.value
        value = value.to(costs[0])
        try:
            torch.broadcast_shapes(value.shape, costs[0].shape)
        except RuntimeError:
            raise ValueError(
                f"site {site!r}: baseline of shape {tuple(value.shape)} does not broadcast to "
                f"the site's cost shape {tuple(costs[0].shape)}"
            ) from None
        fit_loss = sum(((value - c) ** 2).sum() for c in costs) if value.requires_grad else 0.0
        return [value] * len(costs), fit_loss

    def _score_surrogate(self, particles: list[_Particle]) -> tuple[Any, Any]:
        grouped: dict[str, list[tuple[_Particle, ScoreTerm]]] = defaultdict(list)
        for p in particles:
            for term in p.score_terms:
                grouped[term.site].append((p, term))
        surrogate, fit_loss = 0.0, 0.0
        for site, entries in grouped.items():
            spec = entries[0][0].baselines[site]
            costs = [term.cost for _, term in entries]
            baselines, site_fit = self._baseline_values(site, spec, costs)
            fit_loss = fit_loss + site_fit
            for (_, term), b in zip(entries, baselines):
                advantage = (term.cost - b).detach()
                surrogate = surrogate + (term.score * advantage).sum()
        return surrogate, fit_loss

    # ---------------------------------------------------------------- losses
    def _check_finite(self, loss: float, particles: list[_Particle]) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(loss, _non_finite_sites(particles))

    def _loss_and_surrogate_loss(self, model, guide, args, kwargs):
        particles = self._particles(model, guide, args, kwargs, with_surrogate=True)
        scale = 1.0 / self.num_particles
        elbo = sum(p.elbo for p in particles) * scale
        surrogate = sum(p.surrogate_elbo for p in particles)
        score_surrogate, fit_loss = self._score_surrogate(particles)
        surrogate_loss = -(surrogate + score_surrogate) * scale + fit_loss * scale
        return -elbo, surrogate_loss, particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The ELBO loss ``-(log p - log q)`` averaged over particles (no gradients, no state)."""
        with torch.no_grad():
            particles = self._particles(model, guide, args, kwargs, with_surrogate=False)
            loss = -torch_item(sum(p.elbo for p in particles)) / self.num_particles
        self._check_finite(loss, particles)
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The ELBO loss; the routed surrogate's gradients are accumulated into ``.grad``."""
        loss, surrogate_loss, particles = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        loss = torch_item(loss)
        self._check_finite(loss, particles)
        torch_backward(surrogate_loss, retain_graph=self.retain_graph)
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """A tensor equal to the loss whose gradient is the routed estimator's."""
        loss, surrogate_loss, particles = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        if is_validation_enabled():
            self._check_finite(torch_item(loss), particles)
        return loss.detach() + (surrogate_loss - surrogate_loss.detach())

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Estimator state across steps (decaying-average baselines), for checkpoints."""
        return {"decaying_averages": self._averages.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._averages.load_state_dict(dict(state.get("decaying_averages", {})))
