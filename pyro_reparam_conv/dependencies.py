"""Which log-density terms depend on which latent sites.

Two readers need it: a score-function term's cost counts only the terms downstream of its
site (Rao-Blackwellization, Schulman et al. 2015), and the analytic KL applies only to a
site whose prior depends on no latent (:mod:`.estimators.analytic_kl`).

On a *tracked* step, :class:`TagLatents` wraps every latent value in a provenance-tracking
tensor carrying its site name (Wingate et al. 2011) after the trace has recorded it: the
model and guide code compute with the tagged value, so every distribution parameter and
log-density computed from it carries the name, while the trace keeps the very tensor the
distribution returned (a rejection sampler, or this package's ``NoiseReusingNormal``,
recognises its own draw by identity). :func:`term_dependencies` then reads and strips the
provenance of each log-density, :func:`prior_dependencies` that of each prior's parameters.

Provenance tensors cost about 5x per step on small models, so :class:`DependencyCache`
(``dependency_tracking="cached"``, the default) tracks on the first step and whenever the
traces' structure (sample sites and routes) changes, and reuses what it found meanwhile. A
step whose structure differs from the cached one falls back to :func:`ordered_dependencies`
(sampling order: conservative, unbiased, more variance) and the next step tracks again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.ops.provenance import detach_provenance, extract_provenance, track_provenance
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution
from torch.distributions.transforms import Transform

from .routing import Route, is_latent

__all__ = [
    "DEPENDENCY_TRACKING",
    "Dependencies",
    "DependencyCache",
    "SiteKey",
    "TagLatents",
    "ordered_dependencies",
    "prior_dependencies",
    "signature",
    "term_dependencies",
    "untag_values",
]

DEPENDENCY_TRACKING = ("cached", "always", "order")

SiteKey = tuple  # ("model" | "guide", site name)


class TagLatents(Messenger):
    """Hands the code a provenance-tagged copy of every latent value (after the trace has
    recorded the untagged value). A parameter's initial value computed from such values (an
    autoguide that initializes its parameters from a prior, lazily) enters the param store
    without provenance."""

    def _pyro_post_sample(self, msg: dict) -> None:
        if is_latent(msg):
            msg["value"] = track_provenance(msg["value"], frozenset({msg["name"]}))

    def _pyro_param(self, msg: dict) -> None:
        msg["args"] = tuple(detach_provenance(a) if isinstance(a, torch.Tensor) else a
                            for a in msg["args"])  # fmt: skip


def untag_values(*traces: Trace) -> None:
    """Gives every latent site of ``traces`` back the value its distribution returned, in
    place. Needed where a trace recorded the value after :class:`TagLatents` tagged it: an
    effect-based guide (``GuideMessenger``) records its traces inside the handlers around it."""
    for trace in traces:
        for site in trace.nodes.values():
            if is_latent(site):
                site["value"] = extract_provenance(site["value"])[0]


def _latents(trace: Trace) -> set[str]:
    return {name for name, site in trace.nodes.items() if is_latent(site)}


def term_dependencies(model_trace: Trace, guide_trace: Trace) -> dict[SiteKey, frozenset]:
    """Per ``(role, name)`` sample site of a tracked step, the latent sites its log-density
    depends on (its own, for a latent). Replaces the provenance-tracking log-densities and
    score parts by plain tensors in place."""
    dependencies: dict[SiteKey, frozenset] = {}
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        latents = _latents(trace)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or "log_prob" not in site:
                continue
            site["log_prob"], prov = extract_provenance(site["log_prob"])
            site["log_prob_sum"], _ = extract_provenance(site["log_prob_sum"])
            site["unscaled_log_prob"], _ = extract_provenance(site["unscaled_log_prob"])
            if "score_parts" in site:
                parts, _ = extract_provenance(tuple(site["score_parts"]))
                site["score_parts"] = ScoreParts(*parts)
            own = frozenset({name}) if name in latents else frozenset()
            dependencies[(role, name)] = frozenset(prov) | own
    return dependencies


def _provenance(fn) -> frozenset:
    """The provenance carried by any tensor parameter of distribution ``fn`` (wrapped
    distributions and transforms included; the value is not)."""
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


def prior_dependencies(model_trace: Trace) -> dict[str, frozenset]:
    """Per latent model site of a tracked step, the latents its prior's parameters depend on."""
    return {name: _provenance(site["fn"]) for name, site in model_trace.nodes.items()
            if is_latent(site)}  # fmt: skip


def ordered_dependencies(
    model_trace: Trace, guide_trace: Trace, sites: Iterable[str]
) -> dict[SiteKey, frozenset]:
    """A conservative map from sampling order alone, for the guide ``sites`` that need costs:
    every model term, and every guide term sampled at or after the site, depends on it.
    The extra (independent) terms add variance but no bias."""
    sites = set(sites)
    dependencies: dict[SiteKey, frozenset] = {}
    seen: set[str] = set()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            if name in sites:
                seen.add(name)
            dependencies[("guide", name)] = frozenset(seen)
    everything = frozenset(seen)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            dependencies[("model", name)] = everything
    return dependencies


def signature(model_trace: Trace, guide_trace: Trace, routes: Mapping[str, Route]) -> tuple:
    """The sequence of sample sites (and routes, and how each routed site asks its costs to
    be Rao-Blackwellized) that a dependency map belongs to."""
    guide = tuple(
        (name, routes[name].estimator, site["infer"].get("rao_blackwell"))
        if name in routes
        else (name, "observed")
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
    )
    model = tuple(name for name, site in model_trace.nodes.items() if site["type"] == "sample")
    return guide, model


@dataclass(frozen=True)
class Dependencies:
    """What a tracked step found: ``terms`` per ``(role, name)`` sample site, the latents
    its log-density depends on; ``priors`` per latent model site, the latents its prior's
    parameters depend on; ``footprints`` per score-function map site, its footprints
    (:class:`~.locality.Footprint`) or why its costs stay site-level (a string)."""

    terms: Mapping[SiteKey, frozenset]
    priors: Mapping[str, frozenset]
    footprints: Mapping[str, object] = field(default_factory=dict)


class DependencyCache:
    """The :class:`Dependencies` of the last tracked step, kept while the structure holds.

    ``mode``: ``"cached"`` (track when nothing valid is cached), ``"always"`` (track every
    step; for models whose data flow changes while their sites stay the same) or
    ``"order"`` (never track: sampling order only, and no analytic KL).
    """

    def __init__(self, mode: str = "cached") -> None:
        if mode not in DEPENDENCY_TRACKING:
            raise ValueError(
                f"dependency_tracking must be one of {DEPENDENCY_TRACKING}, got {mode!r}"
            )
        self.mode = mode
        self._entry: Optional[tuple[tuple, Dependencies]] = None

    def should_track(self) -> bool:
        return self.mode == "always" or (self.mode == "cached" and self._entry is None)

    def lookup(self, key: tuple) -> Optional[Dependencies]:
        """The cached dependencies for structure ``key``; on a mismatch the cache is
        dropped, so that the next step tracks again."""
        if self._entry is not None and self._entry[0] == key:
            return self._entry[1]
        self._entry = None
        return None

    @property
    def why_unknown(self) -> str:
        """Why a step that neither tracks nor finds its structure cached has no dependencies."""
        if self.mode == "order":
            return "no dependencies are tracked (dependency_tracking='order')"
        return "the trace's structure changed; found again on the next step"

    def clear(self) -> None:
        """Forget what is cached: the next step tracks (in ``"cached"`` mode)."""
        self._entry = None

    def store(self, key: tuple, dependencies: Dependencies) -> None:
        if self.mode == "cached":
            self._entry = (key, dependencies)
