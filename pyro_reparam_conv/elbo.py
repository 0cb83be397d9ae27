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

Fast path (``fast_path=True``, the default): for a pathwise site whose model prior is a
latent site with a closed-form ``KL(q || p)`` and whose prior parameters depend on no
latent value, ``log p(z) - log q(z)`` is replaced in both the loss and the surrogate by
``-KL(q || p)`` (scaled and masked as the site is), as in Pyro's ``TraceMeanField_ELBO``:
the same expectation and expected gradient, less variance. The loss then equals
``TraceMeanField_ELBO``'s rather than ``Trace_ELBO``'s; ``fast_path=False`` restores the
plain Monte Carlo terms. Whether a prior depends on latents is read from provenance
tracking (every latent is tagged on tracked steps); with ``dependency_tracking="order"``
that information is missing and the fast path stays off. ``Route.analytic_kl`` and
``Route.reason`` say, per site, whether and why (not).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_backward, torch_item
from pyro.ops.provenance import track_provenance
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import (
    check_if_enumerated,
    check_model_guide_match,
    check_site_shape,
    warn_if_inf,
    warn_if_nan,
)

from .estimators.analytic_kl import (
    compact_normal_log_prob,
    distribution_provenance,
    kl_name,
    site_kl,
)
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
    kl: dict[str, torch.Tensor] = field(default_factory=dict)


def _non_finite_sites(particles: list[_Particle]) -> list[str]:
    bad = []
    for p in particles:
        for role, trace in (("model", p.model_trace), ("guide", p.guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or "log_prob_sum" not in site:
                    continue  # an analytic-KL site: its KL is checked below
                if not bool(torch.isfinite(site["log_prob_sum"]).all()):
                    label = f"{name} ({role})"
                    if label not in bad:
                        bad.append(label)
        for name, value in p.kl.items():
            label = f"{name} (analytic KL)"
            if not bool(torch.isfinite(value).all()) and label not in bad:
                bad.append(label)
    return bad


class _TaggingRouteMessenger(RouteMessenger):
    """A :class:`RouteMessenger` that also tags pathwise values with their site name.

    Used on tracked steps of the fast path, so that the model's prior parameters reveal
    which latents they are computed from (provenance keeps the autograd graph).
    """

    def _pyro_sample(self, msg: dict) -> None:
        super()._pyro_sample(msg)
        route = self.routes.get(msg["name"])
        if route is None or route.estimator != "pathwise" or msg["value"] is not None:
            return
        value = msg["fn"](*msg["args"], **msg["kwargs"])
        msg["value"] = track_provenance(value, frozenset({msg["name"]}))


def _compact_normal_log_probs(trace: Trace, skip: frozenset) -> None:
    """Memoize Normal log-densities with broadcast (expanded) parameters, computed on the
    compact parameters (``Trace.compute_log_prob`` then leaves those sites alone)."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in skip or "log_prob" in site:
            continue
        if site["args"] or site["kwargs"]:
            continue
        log_p = compact_normal_log_prob(site["fn"], site["value"])
        if log_p is None:
            continue
        site["unscaled_log_prob"] = log_p
        log_p = scale_and_mask(log_p, site["scale"], site["mask"])
        site["log_prob"] = log_p
        site["log_prob_sum"] = log_p.sum()


def _compute_score_parts(trace: Trace, skip: frozenset) -> None:
    """``Trace.compute_score_parts`` for every sample site not in ``skip``."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in skip or "score_parts" in site:
            continue
        try:
            value = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        except ValueError as e:
            shapes = trace.format_shapes(last_site=site["name"])
            raise ValueError(
                f"Error while computing score_parts at site '{name}':\n{e}\n{shapes}"
            ) from e
        site["unscaled_log_prob"] = value.log_prob
        value = value.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"] = value
        site["log_prob"] = value.log_prob
        site["log_prob_sum"] = value.log_prob.sum()
        if is_validation_enabled():
            warn_if_nan(site["log_prob_sum"], f"log_prob_sum at site '{name}'")
            warn_if_inf(site["log_prob_sum"], f"log_prob_sum at site '{name}'", allow_neginf=True)


def _prior_dependencies(model_trace: Trace) -> dict[str, frozenset]:
    """Per latent model site, the latent sites its distribution's parameters depend on."""
    return {
        name: distribution_provenance(site["fn"])
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


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


def _signature(model_trace: Trace, guide_trace: Trace, routes: Mapping[str, Route]) -> tuple:
    """The sequence of sample sites (and routes) that a cached dependency map belongs to."""
    guide = tuple(
        (name, routes[name].estimator if name in routes else "obs")
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
    )
    model = tuple(name for name, site in model_trace.nodes.items() if site["type"] == "sample")
    return guide, model


def _sum(terms) -> Any:
    """The sum of ``terms``, skipping Python zeros (no tensor op adds a 0)."""
    total: Any = 0.0
    for term in terms:
        if isinstance(term, (int, float)) and term == 0:
            continue
        total = term if isinstance(total, float) and total == 0 else total + term
    return total


def _elbo(model_trace: Trace, guide_trace: Trace, kl: Mapping[str, torch.Tensor]):
    """``sum log p - sum log q`` with each KL site's pair of terms replaced by ``-KL``."""
    total: Any = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and name not in kl:
            total = total + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and name not in kl:
            total = total - site["log_prob_sum"]
    for value in kl.values():
        total = total - value
    return total


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
    :param fast_path: replace ``log p - log q`` by the analytic ``-KL(q || p)`` at pathwise
        sites where that is exact (see the module docstring); ``False`` gives the loss
        values of ``Trace_ELBO`` on the same draws.

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
        fast_path: bool = True,
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
        self.fast_path = bool(fast_path)
        self.routes: dict[str, Route] = {}
        self._averages = DecayingAverages()
        self._router: Optional[RouteMessenger] = None
        self._dependency_cache: Optional[tuple[tuple, dict, Optional[dict]]] = None
        self._kl: dict[str, torch.Tensor] = {}  # this particle's analytic-KL terms
        self._priors: Optional[dict[str, frozenset]] = None
        self._cache_valid = False

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
        messenger = _TaggingRouteMessenger if (track and self.fast_path) else RouteMessenger
        router = messenger(self.default_baseline, track=track)
        self._router, self._kl, self._cache_valid = router, {}, track
        if isinstance(poutine.unwrap(guide), Messenger):  # a GuideMessenger: Pyro's own path
            model_trace, guide_trace = get_importance_trace(
                "flat", self.max_plate_nesting, model, router(guide), args, kwargs
            )
            self._plan(model_trace, guide_trace, router)
        else:
            model_trace, guide_trace = self._importance_trace(model, router(guide), args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _importance_trace(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        """:func:`pyro.infer.enum.get_importance_trace` ("flat"), except that the
        log-densities of analytic-KL sites are not computed when nothing else reads them."""
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(model, trace=guide_trace), graph_type="flat"
        ).get_trace(*args, **kwargs)
        validate = is_validation_enabled()
        if validate:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        skip = self._plan(model_trace, guide_trace, self._router)
        if self.fast_path and not validate:
            _compact_normal_log_probs(model_trace, skip)
        model_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
        _compute_score_parts(guide_trace, skip)
        if validate:
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and "log_prob" in site:
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _plan(self, model_trace: Trace, guide_trace: Trace, router: RouteMessenger) -> frozenset:
        """Decide the analytic-KL sites (into ``self._kl``) and check the cached structure.

        Returns the sites whose log-densities nobody needs (KL sites, when no score site's
        cost could read them).
        """
        score_sites = any(r.estimator == "score" for r in router.routes.values())
        if (
            not router.track
            and self.dependency_tracking == "cached"
            and (score_sites or self.fast_path)
        ):
            cache = self._dependency_cache
            self._cache_valid = cache is not None and cache[0] == _signature(
                model_trace, guide_trace, router.routes
            )
            if not self._cache_valid:
                self._dependency_cache = None  # structure changed: track again next step
        if not self.fast_path:
            return frozenset()
        if router.track:
            priors = self._priors = _prior_dependencies(model_trace)
        elif self._cache_valid:
            priors = self._dependency_cache[2]
        else:
            priors = None
        self._kl = self._analytic_kl(model_trace, guide_trace, router, priors)
        return frozenset() if score_sites or router.track else frozenset(self._kl)

    def _particles(self, model, guide, args, kwargs, with_surrogate: bool) -> list[_Particle]:
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            router, kl = self._router, self._kl
            dependencies = self._dependencies(model_trace, guide_trace, router)
            elbo = _elbo(model_trace, guide_trace, kl)
            surrogate, terms = 0.0, []
            if with_surrogate:
                if kl and all(
                    name in kl
                    for name, site in guide_trace.nodes.items()
                    if site["type"] == "sample"
                ):
                    surrogate = elbo  # every guide term is an analytic KL: the same sum
                else:
                    surrogate = pathwise_surrogate_elbo(model_trace, guide_trace, router.routes, kl)
                terms = score_terms(model_trace, guide_trace, router.routes, dependencies)
            particles.append(
                _Particle(
                    model_trace,
                    guide_trace,
                    router.routes,
                    router.baselines,
                    elbo,
                    surrogate,
                    terms,
                    kl,
                )
            )
        self.routes = dict(particles[-1].routes)
        return particles

    def _dependencies(self, model_trace: Trace, guide_trace: Trace, router: RouteMessenger):
        """Which score sites each log-density depends on (see ``dependency_tracking``).

        On tracked steps the map (and, on the fast path, which latents each model prior
        depends on) is cached with the trace's signature; ``_plan`` checked it this step.
        """
        if router.track:
            dependencies = strip_provenance(model_trace, guide_trace)
            if self.dependency_tracking == "cached":
                signature = _signature(model_trace, guide_trace, router.routes)
                priors = self._priors if self.fast_path else None
                self._dependency_cache = (signature, dependencies, priors)
            return dependencies
        score_sites = [n for n, r in router.routes.items() if r.estimator == "score"]
        if not score_sites:
            return {}
        if self.dependency_tracking == "cached" and self._cache_valid:
            return self._dependency_cache[1]
        return ordered_dependencies(model_trace, guide_trace, score_sites)

    # ----------------------------------------------------------- analytic KL
    def _analytic_kl(
        self,
        model_trace: Trace,
        guide_trace: Trace,
        router: RouteMessenger,
        priors: Optional[Mapping[str, frozenset]],
    ) -> dict[str, torch.Tensor]:
        """``KL(q || p)`` (scaled, masked, summed) of each site where it is exact.

        Updates each pathwise route's ``analytic_kl`` and ``reason``.
        """
        kl: dict[str, torch.Tensor] = {}
        for name, route in list(router.routes.items()):
            if route.estimator != "pathwise":
                continue
            why_not = None
            model_site = model_trace.nodes.get(name)
            guide_site = guide_trace.nodes[name]
            if model_site is None or model_site["type"] != "sample":
                why_not = "no model site"
            elif model_site["is_observed"]:
                why_not = "observed in the model"
            elif priors is None:
                why_not = (
                    "prior dependencies unknown (dependency_tracking='order' or changed structure)"
                )
            elif priors.get(name):
                deps = ", ".join(sorted(map(repr, priors[name])))
                why_not = f"its prior depends on latent {deps}"
            elif _is_delta(guide_site["fn"]):
                # a point mass (e.g. AutoNormal's constrained value) may carry a log_density
                # that Pyro's KL(Delta || p) = -log p(v) leaves out; nothing to integrate anyway
                why_not = "the guide site is a Delta (a point mass)"
            elif not _same_scale_and_mask(model_site, guide_site):
                why_not = "model and guide sites differ in scale or mask"
            else:
                try:
                    kl[name] = site_kl(guide_site, model_site)
                except NotImplementedError:
                    why_not = f"no closed-form {kl_name(guide_site['fn'], model_site['fn'])}"
                except ValueError as e:
                    why_not = str(e)
            if why_not is None:
                reason = f"{route.reason}; analytic {kl_name(guide_site['fn'], model_site['fn'])}"
                router.routes[name] = replace(route, analytic_kl=True, reason=reason)
            else:
                reason = f"{route.reason}; no analytic KL: {why_not}"
                router.routes[name] = replace(route, reason=reason)
        return kl

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
        score_surrogate, fit_loss = self._score_surrogate(particles)
        elbo = _sum(p.elbo for p in particles)
        surrogate = _sum([*(p.surrogate_elbo for p in particles), score_surrogate])
        surrogate_loss = _sum([-surrogate, fit_loss])
        if self.num_particles > 1:
            scale = 1.0 / self.num_particles
            elbo, surrogate_loss = elbo * scale, surrogate_loss * scale
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
