"""Which log-density terms depend on which latent sites.

Two readers need it: a score-function term's cost counts only the terms downstream of its
site (Rao-Blackwellization, Schulman et al. 2015), and the analytic KL applies only to a
site whose prior depends on no latent (:mod:`.analytic_kl`).

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
from typing import Any, Iterable, Mapping, Optional

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.ops.provenance import detach_provenance, extract_provenance, track_provenance
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger

from .routing import Route, is_latent
from .sparsity import distribution_tensors

__all__ = [
    "DEPENDENCY_TRACKING",
    "Dependencies",
    "DependencyCache",
    "SiteKey",
    "TagLatents",
    "fingerprint",
    "ordered_dependencies",
    "prior_dependencies",
    "signature",
    "term_dependencies",
    "untag_values",
    "with_escapes",
]

DEPENDENCY_TRACKING = ("cached", "always", "order")

SiteKey = tuple  # ("model" | "guide", site name)


class TagLatents(Messenger):
    """Hands the code a provenance-tagged copy of every latent value (after the trace has
    recorded the untagged value). With an ``analysis`` (:class:`~.sparsity.Analysis`), also
    records the sampling order of ``role``'s program and, in the model, starts following
    the elements of the latent maps that ``sources()`` names. A parameter's initial value
    computed from tagged values (an autoguide that initializes its parameters from a prior,
    lazily) enters the param store without provenance."""

    def __init__(self, analysis=None, role: str = "guide", sources=lambda: ()) -> None:
        super().__init__()
        self.analysis, self.role, self.sources = analysis, role, sources

    def __enter__(self):
        if self.analysis is not None:
            self.analysis.role = self.role
        return super().__enter__()

    def _pyro_post_sample(self, msg: dict) -> None:
        analysis = self.analysis
        if analysis is not None:
            analysis.order[self.role].append(msg["name"])
            analysis.positions[self.role] += 1
        if is_latent(msg):
            msg["value"] = track_provenance(msg["value"], frozenset({msg["name"]}))
            if analysis is not None and self.role == "model" and msg["name"] in self.sources():
                analysis.add_source(msg["name"], msg["value"])

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


def with_escapes(found: dict, escapes, order: Mapping[str, list], role_of=None) -> dict:
    """``found`` (per ``(role, name)`` key, or per model site name for ``role_of="model"``)
    with the sampling-order rule applied after each escape (:class:`~.sparsity.Escape`):
    every site sampled after it in its program, and every model site after a guide escape,
    depends on the escaped latents."""
    found = dict(found)
    for escape in escapes:
        later = [(escape.role, n) for n in order[escape.role][escape.position :]]
        if escape.role == "guide":
            later += [("model", n) for n in order["model"]]
        for role, name in later:
            key = name if role_of is not None else (role, name)
            if (role_of is None or role == role_of) and key in found:
                found[key] = frozenset(found[key]) | escape.provenance
    return found


def fingerprint(value: Any) -> Any:
    """What a model's data flow may depend on in its arguments besides tensor values:
    shapes, dtypes and devices of tensors, and every other value (objects by identity)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (str, bytes, int, float, bool, complex, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(fingerprint(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, fingerprint(v)) for k, v in sorted(value.items(), key=str)))
    return ("object", id(value))


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
    found = (extract_provenance(t)[1] for t in distribution_tensors(fn))
    return frozenset().union(*found)


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
    (:class:`~.locality.Footprint`) or why its costs stay site-level (a string);
    ``escapes``: where latent values left the tensor graph (:class:`~.sparsity.Escape`)."""

    terms: Mapping[SiteKey, frozenset]
    priors: Mapping[str, frozenset]
    footprints: Mapping[str, object] = field(default_factory=dict)
    escapes: tuple = ()


class DependencyCache:
    """The :class:`Dependencies` of tracked steps, per structure key (the sample sites, their
    routes, and the fingerprint of the model's arguments: :func:`fingerprint`), the last
    :attr:`SIZE` kept. A step whose key is not cached gets the sampling-order rule and the
    next step tracks.

    ``mode``: ``"cached"`` (track when the next key may be unknown), ``"always"`` (track every
    step; for models whose data flow changes with something their arguments do not show) or
    ``"order"`` (never track: sampling order only, and no analytic KL).
    """

    SIZE = 8

    def __init__(self, mode: str = "cached") -> None:
        if mode not in DEPENDENCY_TRACKING:
            raise ValueError(
                f"dependency_tracking must be one of {DEPENDENCY_TRACKING}, got {mode!r}"
            )
        self.mode = mode
        self._entries: dict[tuple, Dependencies] = {}
        self._missed = True

    def should_track(self, arguments: Any = None) -> bool:
        """Whether the next step tracks: always, after a miss, or when no cached structure
        has the ``arguments``' fingerprint."""
        if self.mode != "cached":
            return self.mode == "always"
        return self._missed or all(key[-1] != arguments for key in self._entries)

    def lookup(self, key: tuple) -> Optional[Dependencies]:
        """The cached dependencies for structure ``key``; on a miss the next step tracks."""
        found = self._entries.get(key)
        self._missed = found is None
        return found

    @property
    def why_unknown(self) -> str:
        """Why a step that neither tracks nor finds its structure cached has no dependencies."""
        if self.mode == "order":
            return "no dependencies are tracked (dependency_tracking='order')"
        return "the trace's structure changed; found again on the next step"

    def clear(self) -> None:
        """Forget what is cached: the next step tracks (in ``"cached"`` mode)."""
        self._entries.clear()
        self._missed = True

    def store(self, key: tuple, dependencies: Optional[Dependencies]) -> None:
        """Keep what a tracked step found (``None``: it may not be reused; track again)."""
        if self.mode != "cached":
            return
        self._missed = dependencies is None
        if dependencies is not None:
            self._entries.pop(key, None)
            self._entries[key] = dependencies
            while len(self._entries) > self.SIZE:
                self._entries.pop(next(iter(self._entries)))
