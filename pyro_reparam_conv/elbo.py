"""RoutedELBO: a Pyro ELBO whose surrogate loss is built per site from its routed estimator.

The loss is the usual Monte Carlo ELBO estimate, ``-(sum log p(x, z) - sum log q(z))``
averaged over particles, equal to ``Trace_ELBO``'s on the same traces. Its gradient comes
from the surrogate of :mod:`pyro_reparam_conv.terms`: every site's terms as its estimator
gives them (pathwise sites differentiated through ``rsample``, Kingma & Welling 2014;
score-function sites with the Rao-Blackwellized cost of the terms downstream of them,
Schulman et al. 2015, less a baseline, Williams 1992, Mnih & Gregor 2014, Kool et al. 2019).
Which estimator a site gets is decided by :mod:`pyro_reparam_conv.routing` and reported in
``elbo.routes`` after every call.

Fast path (``fast_path=True``, the default): for a pathwise site whose model prior is a
latent site with a closed-form ``KL(q || p)`` and whose prior parameters depend on no
latent value, ``log p(z) - log q(z)`` is replaced in both the loss and the surrogate by
``-KL(q || p)`` (scaled and masked as the site is), as in Pyro's ``TraceMeanField_ELBO``:
the same expectation and expected gradient, and less variance where that term's own noise
dominates (a guide far from the posterior); near the exact posterior the Monte Carlo terms
cancel the likelihood's noise and vary less. With at least ``MEASURE_PARTICLES`` vectorized
particles the ELBO measures which varies less, once per trace structure on a separate draw
(:func:`~.analytic_kl.measure_kl`), and keeps the Monte Carlo terms where they
win. The loss then equals ``TraceMeanField_ELBO``'s rather than ``Trace_ELBO``'s;
``fast_path=False`` restores the plain Monte Carlo terms. Whether a prior depends on
latents is read from provenance (:mod:`pyro_reparam_conv.dependencies`); with
``dependency_tracking="order"`` that information is missing and the fast path stays off.
The fast path also computes with the kernels of :mod:`pyro_reparam_conv.kernels`
(``RoutedELBO.kernels``), which equal Pyro's own functions. ``Route.analytic_kl`` and
``Route.reason`` say, per site, whether and why (not).

An effect-based guide (``GuideMessenger``, e.g. ``AutoNormalMessenger``) runs the model
itself; its traces are the pair it records, as in Pyro's ``get_importance_trace``.

Each particle is one pure pass (:meth:`RoutedELBO.site_terms` returns its traces, routes and
site-term table); the only state across steps is the decaying-average baselines
(:meth:`~RoutedELBO.state_dict`) and the dependency cache (re-derived on the next tracked
step, so not saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import traceback
import warnings
from typing import Any, ClassVar, Mapping, Optional

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.util import check_model_guide_match, check_traceenum_requirements

from .dependencies import (
    Dependencies,
    TagLatents,
    fingerprint,
    prior_dependencies,
    signature,
    term_dependencies,
    untag_values,
    with_escapes,
)
from .analytic_kl import MEASURE_PARTICLES, kl_sites, measure_kl, plan_kl
from .backward import backward
from .baselines import DecayingAverages, normalize_kind, score_surrogate
from .enumeration import (
    EnumerationRefused,
    EnumerateModel,
    GuideMarginals,
    ModelEnumerates,
    model_route,
    enumerated_in_model,
    marginals,
    posterior_sample,
    sum_out_model_sites,
    symbolize,
)
from .estimators import ESTIMATORS
from .estimators import get as get_estimator
from .evaluations import SideBySideError, side_by_side_mismatch
from .kernels import FAST, REFERENCE, Kernels
from .folding import FoldLeadingDims
from .learned import Learned
from .locality import Footprint, cost_level, plan_footprints, precompute
from .routing import PlateNestingNeeded, Route, RouteMessenger, RoutingOptions, SitePlan
from .sparsity import Analysis
from .terms import ParticleTerms, add_terms, may_need_costs, particle_terms
from .weight_layers import BatchedLayers, WeightLayers, WeightUse

__all__ = ["NonFiniteLossError", "RoutedELBO", "SideBySideError"]


class NonFiniteLossError(ValueError):
    """The ELBO was NaN or infinite; ``sites`` lists the sites whose log-density was not finite."""

    def __init__(self, loss: float, sites: list[str]) -> None:
        self.loss = loss
        self.sites = sites
        where = ", ".join(sites) if sites else "no single site (the sum overflowed)"
        super().__init__(f"ELBO loss is {loss}; non-finite log-density at: {where}")


def effect_guide(guide) -> Optional[Messenger]:
    """The effect-based guide behind ``guide`` (a :class:`~pyro.poutine.guide.GuideMessenger`
    such as ``AutoNormalMessenger``, under any handlers), or ``None`` for a plain callable.
    Such a guide runs the model itself and records both traces (Pyro's ``get_traces``)."""
    unwrapped = poutine.unwrap(guide)
    return unwrapped if isinstance(unwrapped, Messenger) else None


def _traces(
    model, guide, args, kwargs, max_plate_nesting, enumerate_model=None
) -> tuple[Trace, Trace, Trace]:
    """The first half of Pyro's ``get_importance_trace("flat", ...)``: guide and model traces
    (the guide traced and the model replayed on it, under ``enumerate_model``
    (:class:`~.enumeration.EnumerateModel`) if given, or, for an effect-based guide, the pair
    the guide records, as Pyro takes it), checked against each other, subsample sites pruned
    (no log-densities yet); and the guide's subsample sites alone (the indices its plates
    drew)."""
    messenger = effect_guide(guide)
    if messenger is not None:
        guide(*args, **kwargs)  # the handlers around it (routing, provenance) apply
        model_trace, guide_trace = messenger.get_traces()
        untag_values(model_trace, guide_trace)
        marked = [n for n, site in model_trace.nodes.items() if n not in guide_trace
                  and site["type"] == "sample" and site["infer"].get("enumerate")]  # fmt: skip
        if marked:
            raise EnumerationRefused(
                f"model sites {marked} are marked for enumeration, but an effect-based guide "
                f"({type(messenger).__name__}) runs the model itself: RoutedELBO sums model "
                "sites out with function guides only (as TraceEnum_ELBO)"
            )
    else:
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        if enumerate_model is not None:  # inside the replay, as TraceEnum_ELBO has it
            model = enumerate_model(model)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed, graph_type="flat").get_trace(*args, **kwargs)
        if enumerate_model is not None:
            enumerate_model.check(model_trace, guide_trace)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
        if _marked(model_trace) or _marked(guide_trace):  # Pyro's checks of Pyro's markup
            check_traceenum_requirements(model_trace, guide_trace)
    pruned = prune_subsample_sites(guide_trace)
    subsamples = guide_trace.copy()
    for name in pruned.nodes:
        subsamples.remove_node(name)
    return prune_subsample_sites(model_trace), pruned, subsamples


def _release(error: BaseException) -> None:
    """Clear the locals of the frames an error handled by a retry holds (and those of its
    causes): Pyro's trace handler re-raises with the frame's locals referring to the error,
    a reference cycle that kept the failed attempt's traces (their tensors) alive until the
    cyclic garbage collector ran (3 GB peak over Pyro's ``test_enum.py``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _marked(trace: Trace) -> bool:
    """Whether a sample site carries Pyro's enumeration markup (the user's)."""
    return any(site["type"] == "sample" and site["infer"].get("enumerate")
               for site in trace.nodes.values())  # fmt: skip


def _drawn_leaves(particles: list[ParticleTerms]) -> list[torch.Tensor]:
    """The values drawn as leaves for an estimator that differentiates its cost in them
    (``cost_graph``): it took that gradient already, the backward pass need not."""
    return [
        site["value"]
        for p in particles
        for name, site in p.guide_trace.nodes.items()
        if site["type"] == "sample" and name in p.routes
        and isinstance(site["value"], torch.Tensor) and site["value"].is_leaf
        and p.routes[name].estimator in ESTIMATORS
        and get_estimator(p.routes[name].estimator).cost_graph
    ]  # fmt: skip


def _checked(loss: Any, particles: list[ParticleTerms]) -> float:
    """``loss`` as a float; :class:`NonFiniteLossError` naming the sites if it is not finite."""
    value = torch_item(loss)
    if not math.isfinite(value):
        sites = [label for p in particles for label in p.non_finite()]
        raise NonFiniteLossError(value, list(dict.fromkeys(sites)))
    return value


def _local(footprints: Mapping[str, Any]) -> dict[str, Footprint]:
    return {name: f for name, f in footprints.items() if isinstance(f, Footprint)}


def _order(analysis, model_trace) -> dict:
    """The sampling order of each program on a tracked step (a guide that runs the model
    itself records no separate model order: the model trace's order then)."""
    model = analysis.order["model"] or [n for n, s in model_trace.nodes.items()
                                        if s["type"] == "sample"]  # fmt: skip
    return {"guide": analysis.order["guide"], "model": model}


def _tracked(analysis, model_trace, guide_trace=None):
    """The prior dependencies of a tracked step: provenance, and the sampling-order rule
    after each escape the analysis recorded. With ``guide_trace`` (once log-densities are
    computed): the term dependencies so, and those of provenance alone."""
    order, escapes = _order(analysis, model_trace), analysis.escapes
    if guide_trace is None:
        return with_escapes(prior_dependencies(model_trace), escapes, order, "model")
    provenance = term_dependencies(model_trace, guide_trace)
    return with_escapes(provenance, escapes, order), provenance


def _decided(plans: Mapping[str, SitePlan], footprints, escapes) -> dict[str, SitePlan]:
    """The plans with their cost levels (:func:`~.locality.cost_level`) and, for a site
    whose value left the tensor graph, how."""
    how: dict[str, str] = {}
    for escape in escapes:
        for name in escape.provenance:
            how.setdefault(name, escape.how)
    decided = {}
    for name, plan in plans.items():
        if name in footprints:
            plan = plan.decided(costs=cost_level(footprints[name]))
        decided[name] = plan.decided(escaped=how[name]) if name in how else plan
    return decided


def _dependencies(analysis, cached, model_trace, guide_trace, plans, priors, untracked):
    """``(terms, footprints, found)``: the term dependencies (``None``: unknown) and the
    footprints of this step, from its analysis (then ``found``, with the step's ``priors``,
    is what to cache), from the cache, or neither (``untracked`` says why)."""
    if analysis is not None:
        terms, provenance = _tracked(analysis, model_trace, guide_trace)
        footprints = plan_footprints(
            analysis, model_trace, guide_trace, plans, terms, provenance=provenance
        )
        return terms, footprints, Dependencies(terms, priors, footprints, tuple(analysis.escapes))
    if cached is not None:
        return cached.terms, cached.footprints, None
    return None, plan_footprints(None, model_trace, guide_trace, plans, None, untracked), None


def _particle_terms(
    program, model_trace, guide_trace, plans, cached, analysis, *, kernels, fast_path, nesting,
    verify, untracked, measured=None,
) -> tuple[ParticleTerms, Optional[Dependencies]]:  # fmt: skip
    """One particle's site-term table from its traces (their log-densities computed here),
    and the dependencies found on a tracked step (``None`` otherwise).

    ``program`` is ``(model, guide, args, kwargs)`` (the plain callables, for the
    side-by-side check); ``plans`` the guide's :class:`~.routing.SitePlan` per latent site;
    ``cached`` the dependencies of this trace structure from an earlier tracked step, if
    any; ``analysis`` the tracked step's :class:`~.sparsity.Analysis` (``None``: untracked);
    ``verify`` the guide's subsample sites when the values side by side are to be checked;
    ``untracked`` what a route says when no dependencies are known; ``measured`` the sites
    whose analytic KL was measured to add variance (:func:`~.analytic_kl.measure_kl`)."""
    track = analysis is not None
    priors = _tracked(analysis, model_trace) if track else cached and cached.priors
    kl: Mapping[str, Any] = {}
    enumerated = bool(enumerated_in_model(model_trace, guide_trace))
    if enumerated:  # sites summed out: every log-density as Pyro computes it, no KL rows
        kernels, fast_path = REFERENCE, False
    if fast_path:
        kl, plans = plan_kl(model_trace, guide_trace, plans, priors, kernels, measured or {})
    keep = track or may_need_costs(guide_trace, plans)
    if cached is not None and not enumerated:  # element-level costs: per-element terms, once
        precompute(model_trace, guide_trace, _local(cached.footprints))
    skip = frozenset() if keep else frozenset().union(*kl_sites(kl, plans))
    kernels.log_densities(model_trace, guide_trace, skip, nesting)
    terms, footprints, found = _dependencies(
        analysis, cached, model_trace, guide_trace, plans, priors, untracked
    )
    in_guide = [n for n, p in plans.items() if p.estimator.layout.pyro_enumerates]
    marginals, in_model = None, {}
    if enumerated or in_guide:  # summed exactly (:mod:`.enumeration`)
        symbolize(model_trace, guide_trace)
        if in_guide:
            marginals = GuideMarginals(model_trace, guide_trace, in_guide)
            plans = {n: p.decided(summed=marginals.summations[n]) if n in in_guide else p
                     for n, p in plans.items()}  # fmt: skip
        fns = {n: model_trace.nodes[n]["fn"] for n in enumerated_in_model(model_trace, guide_trace)}
        terms, in_model = sum_out_model_sites(model_trace, guide_trace, terms)
        if marginals is not None:
            marginals.prepare(model_trace, guide_trace)
            terms = marginals.dependencies(terms, model_trace, guide_trace)
        footprints = {}  # the expectations span elements: site-level costs
    escapes = (found or cached).escapes if (found or cached) else ()
    plans = _decided(plans, footprints, escapes)
    if verify is not None:  # the guide's subsample sites (its plates' indices), to replay
        dims = {name: plan.dim for name, plan in plans.items() if plan.dim is not None}
        problem = side_by_side_mismatch(*program, model_trace, guide_trace, dims, verify)
        if problem:
            raise SideBySideError(problem)
    particle = particle_terms(
        model_trace, guide_trace, plans, kl, terms, _local(footprints), marginals
    )
    if in_model:  # the model's enumerated sites have routes too
        routes = {n: model_route(n, fns[n], summed) for n, summed in in_model.items()}
        particle = dataclasses.replace(particle, routes={**particle.routes, **routes})
    return particle, found


class _AttemptFailed(Exception):
    """A particle's attempt failed with ``error``; ``plans`` were its routes."""

    def __init__(self, error: Exception, plans: Mapping[str, SitePlan]) -> None:
        super().__init__(str(error))
        self.error, self.plans = error, plans


class RoutedELBO(ELBO):
    """Drop-in replacement for :class:`~pyro.infer.Trace_ELBO` with per-site estimator routing.

    The arguments up to ``tail_adaptive_beta`` are :class:`~pyro.infer.ELBO`'s, in its order
    and with its meaning; the routing options after them are keyword-only.

    :param num_particles: particles per estimate.
    :param max_plate_nesting: as for :class:`~pyro.infer.ELBO`.
    :param max_iarange_nesting: Pyro's deprecated alias of ``max_plate_nesting`` (Pyro warns).
    :param vectorize_particles: draw all particles in one vectorized pass.
    :param strict_enumeration_warning, ignore_jit_warnings, retain_graph: as for
        :class:`~pyro.infer.ELBO`.
    :param jit_options, tail_adaptive_beta: accepted and stored as ``Trace_ELBO`` accepts them,
        and, as there, without effect: there is no JIT-compiled ``RoutedELBO``
        (``JitTrace_ELBO``'s options do nothing here; the loss is computed eagerly) and the
        tail-adaptive exponent belongs to ``TraceTailAdaptive_ELBO``.
    :param baseline: default baseline of score-routed sites: ``"auto"`` (leave-one-out with
        several particles, decaying average with one), ``"leave_one_out"``/``"loo"``,
        ``"decaying_avg"``/``"avg"``, or ``None`` for none. Sites override it through
        ``infer={"baseline": {...}}`` with Pyro's keys or ``infer={"baseline": None}``.
    :param dependency_tracking: how a score site's downstream terms are found (see
        :mod:`pyro_reparam_conv.dependencies`): ``"cached"`` (default; provenance tracking on
        the first step and when the trace structure changes), ``"always"`` or ``"order"``.
    :param fast_path: replace ``log p - log q`` by the analytic ``-KL(q || p)`` at pathwise
        sites where that is exact (see the module docstring); ``False`` gives the loss
        values of ``Trace_ELBO`` on the same draws.
    :param max_enumerate: the largest finite support (values per plate element) that a
        site is summed over exactly without being asked (``"enumerate"``); larger discrete
        sites get DisARM (Bernoulli) or the score function.
    :param layer_estimators: ``"auto"`` (default): flipout (convolutions) and local
        reparameterization (linear layers) for every factorized Normal site that its first
        step shows used only as one ``F.linear``/``F.conv*`` call's weight, and whose
        layer's examples that step shows to reach the model's terms through terms of their
        own (:mod:`pyro_reparam_conv.per_example`: no mean over the batch, no batch
        statistics, no mixing of examples after the layer), which a weight drawn per
        example needs to stay unbiased; ``"requested"``: only for weight sites that ask for
        them (``infer={"estimator": "flipout"}``), with the same checks.

    After each call ``routes`` maps every guide latent site to its :class:`~.routing.Route`.
    """

    #: the kernels of the fast path (``kernels.REFERENCE`` in a subclass: Pyro's functions)
    kernels: ClassVar[Kernels] = FAST

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        max_iarange_nesting: Optional[float] = None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: Optional[dict] = None,
        retain_graph: Optional[bool] = None,
        tail_adaptive_beta: float = -1.0,
        *,
        baseline: Optional[str] = "auto",
        dependency_tracking: str = "cached",
        fast_path: bool = True,
        max_enumerate: int = RoutingOptions.max_enumerate,
        layer_estimators: str = "auto",
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            max_iarange_nesting=max_iarange_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )
        self.baseline = normalize_kind(baseline)
        if self.baseline == "leave_one_out" and num_particles < 2:
            raise ValueError("baseline='leave_one_out' needs num_particles >= 2")
        if not isinstance(max_enumerate, int) or max_enumerate < 0:
            raise ValueError(f"max_enumerate must be an int >= 0, got {max_enumerate!r}")
        self.fast_path = bool(fast_path)
        self.options = RoutingOptions(max_enumerate=max_enumerate)
        self.routes: dict[str, Route] = {}
        self._averages = DecayingAverages()
        if layer_estimators not in ("requested", "auto"):
            raise ValueError(
                f"layer_estimators must be 'requested' or 'auto', got {layer_estimators!r}"
            )
        self._learned = Learned(dependency_tracking, auto_layers=layer_estimators == "auto")
        #: what the last tracked step found per score-function map site: its
        #: :class:`~.locality.Footprint`, or why its costs stay site-level
        self.last_footprints: dict[str, Any] = {}

    @property
    def dependency_tracking(self) -> str:
        return self._learned.dependencies.mode

    @property
    def default_baseline(self) -> Optional[str]:
        if self.baseline == "auto":
            return "leave_one_out" if self.num_particles > 1 else "decaying_avg"
        return self.baseline

    # --------------------------------------------------------------- particles
    def site_terms(self, model, guide, *args, **kwargs) -> list[ParticleTerms]:
        """Draw the particles: per particle (one for all when vectorized) its traces, routes
        and site-term table (:class:`~pyro_reparam_conv.terms.ParticleTerms`)."""
        return self._site_terms(model, guide, args, kwargs)

    def _guess_plate_nesting(self, model, guide, args, kwargs) -> None:
        """Pyro's ``_guess_max_plate_nesting``, without its "Guessed ..." log line."""
        logger = logging.getLogger("pyro.infer.elbo")
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        finally:
            logger.setLevel(level)

    def _site_terms(self, model, guide, args, kwargs) -> list[ParticleTerms]:
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_plate_nesting(model, guide, args, kwargs)
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
            particles = [self._particle(model, guide, args, kwargs)]
        else:
            particles = [
                self._particle(model, guide, args, kwargs) for _ in range(self.num_particles)
            ]
        self.routes = dict(particles[-1].routes)
        return particles

    def _particle(self, model, guide, args, kwargs) -> ParticleTerms:
        """One particle. A site that evaluates several values before ``max_plate_nesting``
        is known makes the ELBO guess it (as Pyro's ``TraceEnum_ELBO`` does) and retry; a
        model runs under Pyro's enumeration until a step shows it has no site to sum out
        (``Learned.model_plain``), and a site marked for enumeration that then runs without
        it makes the model run under it again, the particle again from the same torch random
        state (:class:`~.enumeration.ModelEnumerates`); a
        failure that a change of what the ELBO learned can fix
        (:meth:`~.learned.Learned.remedy`: fold convolutions, then avoid side by side) is
        retried, each change at most once; when the retries fail too, the changes are undone
        and the last error raised."""
        tried: dict = {}
        while True:
            state = torch.get_rng_state()
            try:
                return self._attempt(model, guide, args, kwargs)
            except ModelEnumerates as retry_error:  # under Pyro's enumeration now, same draws
                if "enumerates" in tried:
                    raise
                _release(retry_error)
                tried["enumerates"] = None
                self._learned.model_plain = False
                torch.set_rng_state(state)
            except PlateNestingNeeded as retry_error:  # several values: dims left of plates
                if "nesting" in tried:
                    raise
                _release(retry_error)
                tried["nesting"] = None
                self._guess_plate_nesting(model, guide, args, kwargs)
            except _AttemptFailed as failed:
                if isinstance(failed.error, WeightUse):  # its layers stay plain from now on
                    self._learned.weight_used(failed.error, failed.plans)
                    _release(failed)
                    continue
                try:
                    retry = self._learned.remedy(failed.error, failed.plans, tried)
                except Exception:  # a requested estimator that cannot work: how to fix it
                    self._learned.undo(tried)
                    raise
                if not retry:
                    self._learned.undo(tried)
                    raise failed.error from None
                _release(failed)

    def _attempt(self, model, guide, args, kwargs) -> ParticleTerms:
        learned = self._learned
        arguments = fingerprint((args, kwargs))
        track = learned.dependencies.should_track(arguments)
        nesting = self.max_plate_nesting
        first_dim = None if nesting == float("inf") else -1 - int(nesting)
        options = learned.routing_options(self.options.max_enumerate)
        router = RouteMessenger(self.default_baseline, options, first_dim)
        layers = learned.layers
        skip = {name: why for name, why in layers.items() if why is not None}
        weights = WeightLayers(
            lambda: router.plans, lambda name: name not in layers, skip, learned.candidate,
            verify=lambda name: learned.to_check(name, arguments),
            batched=self.vectorize_particles, units=learned.units, parents=learned.parents,
        )
        routed = router(guide) if first_dim is None else EnumMessenger(first_dim)(router(guide))
        traced_model, traced_guide = weights(model), weights.guide()(routed)

        def needs_enum():  # the model under Pyro's enumeration (dims of every model site)
            return bool(router.dims) or not learned.model_plain

        analysis = Analysis() if track else None
        if track:

            def sources():  # the maps whose estimator may split its score per element
                return {n for n, p in router.plans.items() if p.estimator.element_costs}

            traced_guide = TagLatents(analysis, "guide")(traced_guide)
            traced_model = TagLatents(analysis, "model", sources)(traced_model)
        try:
            fold = FoldLeadingDims() if learned.fold else contextlib.nullcontext()
            with analysis if track else contextlib.nullcontext(), fold:
                enumerate_model = EnumerateModel(first_dim is not None, needs_enum)
                model_trace, guide_trace, subsamples = _traces(
                    traced_model, traced_guide, args, kwargs, nesting, enumerate_model
                )
            if enumerate_model.wrapped and not enumerated_in_model(model_trace, guide_trace):
                learned.model_plain = True  # later steps run it without the enumeration
            key = (signature(model_trace, guide_trace, router.routes), arguments)
            cached = None if track else learned.dependencies.lookup(key)
            verify = bool(router.dims) and (track or key not in learned.verified)
            weights.prove_examples(model_trace)
            plans = learned.layer_decisions(router.plans, weights)
            particle, found = _particle_terms(
                (model, guide, args, kwargs), model_trace, guide_trace, plans, cached,
                analysis, kernels=self.kernels if self.fast_path else REFERENCE,
                fast_path=self.fast_path, nesting=nesting, verify=subsamples if verify else None,
                untracked=learned.dependencies.why_unknown, measured=learned.kl_measured.get(key),
            )  # fmt: skip
        except (PlateNestingNeeded, ModelEnumerates):
            raise
        except Exception as error:
            raise _AttemptFailed(error, router.plans) from error
        if weights.watched:
            known = found or cached
            learned.guide_uses(weights, known.terms if known else None, router.plans)
        learned.shown(weights, arguments)
        if found is not None:
            self.last_footprints = dict(found.footprints)
            learned.dependencies.store(key, found if analysis.reusable else None)
        if verify:
            learned.verified.add(key)
        if self._should_measure(key, particle.routes, router.dims):
            learned.kl_measured[key] = self._measure_kl(model, guide, args, kwargs, particle)
            if learned.kl_measured[key]:  # fresh draws, independent of the measurement
                return self._attempt(model, guide, args, kwargs)
        return particle

    def _should_measure(self, key, routes, dims) -> bool:
        """Whether this structure's analytic KL sites are to be measured now: once per
        structure, with enough vectorized particles and no values side by side."""
        return (
            key not in self._learned.kl_measured and self.vectorize_particles and not dims
            and self.num_particles >= MEASURE_PARTICLES
            and any(r.analytic_kl for r in routes.values())
        )  # fmt: skip

    def _measure_kl(self, model, guide, args, kwargs, particle: ParticleTerms) -> dict[str, str]:
        """The analytic-KL sites of ``particle`` whose Monte Carlo terms give the ELBO less
        variance, measured on a separate vectorized draw of all particles."""
        options = self._learned.routing_options(self.options.max_enumerate)
        first_dim = -1 - int(self.max_plate_nesting)
        router = RouteMessenger(self.default_baseline, options, first_dim)
        nesting = self.max_plate_nesting
        with torch.no_grad(), BatchedLayers():  # weights with a particle dim: plain draws
            routed = EnumMessenger(first_dim)(router(guide))
            model_trace, guide_trace, _ = _traces(model, routed, args, kwargs, nesting)
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
        sites = {name: r.kl.through for name, r in particle.routes.items() if r.analytic_kl}
        return measure_kl(
            model_trace, guide_trace, sites, -int(nesting), self.num_particles, self.kernels
        )

    def _get_trace(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        """Pyro's per-particle hook (for code that walks an ELBO's traces): one particle's
        model and guide traces, log-densities computed."""
        particle = self._particle(model, guide, args, kwargs)
        return particle.model_trace, particle.guide_trace

    # ------------------------------------------------------- enumerated sites
    def _enumerated_traces(self, model, guide, args, kwargs, what: str):
        """One particle's traces with the model's enumerated sites side by side (not summed),
        log-densities computed (``TraceEnum_ELBO``'s ``compute_marginals`` and
        ``sample_posterior`` start from these): the guide drawn as Pyro draws it, only its
        sites with Pyro's markup enumerated (which these methods refuse, as Pyro's)."""
        if self.num_particles != 1:
            raise EnumerationRefused(
                f"RoutedELBO.{what}() is not compatible with multiple particles (as "
                f"TraceEnum_ELBO.{what}()); use num_particles=1"
            )
        if self.max_plate_nesting == float("inf"):
            self._guess_plate_nesting(model, guide, args, kwargs)
        guide = EnumMessenger(-1 - int(self.max_plate_nesting))(guide)
        model_trace, guide_trace, _ = _traces(
            model, guide, args, kwargs, self.max_plate_nesting, EnumerateModel(True)
        )
        REFERENCE.log_densities(model_trace, guide_trace, frozenset(), self.max_plate_nesting)
        return model_trace, guide_trace

    def compute_marginals(self, model, guide, *args, **kwargs):
        """The marginal posterior distribution of each enumerated model site, given one draw
        of the guide: ``{site: Distribution}``, as ``TraceEnum_ELBO.compute_marginals``."""
        traces = self._enumerated_traces(model, guide, args, kwargs, "compute_marginals")
        return marginals(*traces)

    def sample_posterior(self, model, guide, *args, **kwargs):
        """Run the model once with its enumerated sites drawn jointly from their posterior
        given one draw of the guide, as ``TraceEnum_ELBO.sample_posterior``; its return value."""
        with poutine.block(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Found vars in model but not guide")
            traces = self._enumerated_traces(model, guide, args, kwargs, "sample_posterior")
        return posterior_sample(model, args, kwargs, *traces)

    # ------------------------------------------------------------------ losses
    def loss_and_surrogate(self, particles: list[ParticleTerms]) -> tuple[Any, Any]:
        """``(loss, surrogate loss)`` of particles from :meth:`site_terms`, averaged over
        them: the surrogate's gradient is the routed estimator's. Updates the baselines'
        decaying averages."""
        scored = [row for p in particles for row in p.scored()]
        score, fit_loss = score_surrogate(scored, self._averages)
        elbo = add_terms(p.elbo() for p in particles)
        surrogate = add_terms([*(p.surrogate_elbo() for p in particles), score])
        surrogate_loss = add_terms([-surrogate, fit_loss])
        if self.num_particles > 1:
            scale = 1.0 / self.num_particles
            elbo, surrogate_loss = elbo * scale, surrogate_loss * scale
        return -elbo, surrogate_loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The ELBO loss ``-(log p - log q)`` averaged over particles (no gradients, no state)."""
        with torch.no_grad():
            particles = self.site_terms(model, guide, *args, **kwargs)
            elbo = add_terms(p.elbo() for p in particles)
        return _checked(-elbo / self.num_particles, particles)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The ELBO loss; the routed surrogate's gradients are accumulated into ``.grad``."""
        particles = self.site_terms(model, guide, *args, **kwargs)
        loss, surrogate_loss = self.loss_and_surrogate(particles)
        loss = _checked(loss, particles)
        backward(surrogate_loss, _drawn_leaves(particles), retain_graph=self.retain_graph)
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Any:
        """A tensor equal to the loss whose gradient is the routed estimator's."""
        particles = self.site_terms(model, guide, *args, **kwargs)
        loss, surrogate_loss = self.loss_and_surrogate(particles)
        if is_validation_enabled():
            _checked(loss, particles)
        if not isinstance(surrogate_loss, torch.Tensor):  # no sites: 0.0, as Trace_ELBO's
            return loss
        return loss.detach() + (surrogate_loss - surrogate_loss.detach())

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Estimator state across steps, for checkpoints: the decaying-average baselines and
        the estimators found not to work for a site (its values side by side)."""
        return {"decaying_averages": self._averages.state_dict(), **self._learned.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._averages.load_state_dict(dict(state.get("decaying_averages", {})))
        self._learned.load_state_dict(state)
