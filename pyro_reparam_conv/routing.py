"""Which gradient estimator each guide sample site gets, and why.

A site's estimator is, in order of precedence:

1. ``infer={"estimator": "pathwise" | "score"}`` on the site (or set by :func:`force_estimator`);
2. ``"pathwise"`` when its distribution has ``rsample`` (the reparameterization gradient,
   Kingma & Welling 2014; Rezende et al. 2014);
3. ``"score"`` otherwise (the score-function / REINFORCE gradient, Williams 1992).

Forcing ``"score"`` on a distribution that has ``rsample`` never mutates the distribution
(``has_rsample_(False)`` fails on ``Independent`` with current torch): the router draws the
value with ``fn.sample()``, which carries no gradient, and the ELBO adds the score term.
Each score-routed value is tagged with provenance (Wingate et al. 2011) so the ELBO can find
the cost terms downstream of it (Rao-Blackwellization, Schulman et al. 2015).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from pyro.ops.provenance import track_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from .estimators.baselines import BaselineSpec, parse_baseline
from .sampling import distribution_name

ESTIMATORS: tuple[str, ...] = ("pathwise", "score")

__all__ = ["ESTIMATORS", "Route", "RouteMessenger", "force_estimator", "route_site"]


@dataclass(frozen=True)
class Route:
    """The estimator a guide site gets (``"pathwise"`` or ``"score"``) and the reason."""

    site: str
    estimator: str
    reason: str
    distribution: str
    baseline: Optional[str] = None
    analytic_kl: bool = False

    def __str__(self) -> str:
        extra = f", baseline: {self.baseline}" if self.estimator == "score" else ""
        return f"{self.site}: {self.estimator} ({self.reason}{extra})"


def choose_estimator(name: str, fn, infer: dict) -> tuple[str, str]:
    """Return ``(estimator, reason)`` for site ``name`` with distribution ``fn``.

    Raises ``ValueError`` for an unknown estimator name, or for ``"pathwise"`` forced on a
    distribution without ``rsample``.
    """
    dist_name = distribution_name(fn)
    has_rsample = bool(getattr(fn, "has_rsample", False))
    requested = infer.get("estimator")
    if requested is None:
        if has_rsample:
            return "pathwise", f"{dist_name} has rsample"
        return "score", f"{dist_name} has no rsample"
    if requested not in ESTIMATORS:
        raise ValueError(
            f"site {name!r}: unknown estimator {requested!r} in infer['estimator']; "
            f"valid estimators are {', '.join(map(repr, ESTIMATORS))}"
        )
    if requested == "pathwise" and not has_rsample:
        raise ValueError(
            f"site {name!r}: infer['estimator']='pathwise' was requested but {dist_name} has "
            "no rsample, so no pathwise (reparameterized) gradient exists; use 'score' or a "
            "reparameterizable distribution (e.g. a relaxed/Gumbel-softmax one)"
        )
    return requested, f"infer['estimator']={requested!r} set on the site"


def route_site(msg: dict, default_baseline: Optional[str]) -> tuple[Route, Optional[BaselineSpec]]:
    """The :class:`Route` of one guide sample message, and its baseline spec if score-routed."""
    name, fn, infer = msg["name"], msg["fn"], msg["infer"]
    estimator, reason = choose_estimator(name, fn, infer)
    spec = parse_baseline(name, infer, default_baseline) if estimator == "score" else None
    route = Route(
        site=name,
        estimator=estimator,
        reason=reason,
        distribution=distribution_name(fn),
        baseline=spec.describe() if spec is not None else None,
    )
    return route, spec


def _is_latent(msg: dict) -> bool:
    return (
        msg["type"] == "sample" and not msg["is_observed"] and not isinstance(msg["fn"], _Subsample)
    )


class RouteMessenger(Messenger):
    """Routes each latent site of the guide it wraps; records ``routes`` and baseline specs.

    Score-routed sites are drawn without a gradient path and, with ``track=True``, tagged
    with their own name as provenance, so every log-density computed from them knows it
    depends on them.
    """

    def __init__(self, default_baseline: Optional[str] = None, track: bool = True) -> None:
        super().__init__()
        self.default_baseline = default_baseline
        self.track = track
        self.routes: dict[str, Route] = {}
        self.baselines: dict[str, BaselineSpec] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if not _is_latent(msg):
            return
        route, spec = route_site(msg, self.default_baseline)
        self.routes[msg["name"]] = route
        if route.estimator != "score":
            return
        self.baselines[msg["name"]] = spec
        if msg["value"] is None:
            msg["value"] = msg["fn"].sample(*msg["args"], **msg["kwargs"])
        if self.track:
            msg["value"] = track_provenance(msg["value"], frozenset({msg["name"]}))


class ForceEstimatorMessenger(Messenger):
    """Sets ``infer["estimator"]`` on latent sites (all, or those named in ``sites``)."""

    def __init__(
        self,
        estimator: str,
        sites: Optional[Iterable[str]] = None,
        skip_invalid: bool = False,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {estimator!r}; valid estimators are "
                f"{', '.join(map(repr, ESTIMATORS))}"
            )
        self.estimator = estimator
        self.sites = None if sites is None else frozenset(sites)
        self.skip_invalid = skip_invalid
        self.skipped: dict[str, str] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if not _is_latent(msg) or (self.sites is not None and msg["name"] not in self.sites):
            return
        if (
            self.skip_invalid
            and self.estimator == "pathwise"
            and not getattr(msg["fn"], "has_rsample", False)
        ):
            self.skipped[msg["name"]] = f"{distribution_name(msg['fn'])} has no rsample"
            return
        msg["infer"] = {**msg["infer"], "estimator": self.estimator}


def force_estimator(
    fn: Optional[Callable] = None,
    estimator: str = "score",
    sites: Optional[Iterable[str]] = None,
    skip_invalid: bool = False,
):
    """Handler forcing ``estimator`` on the latent sites of a guide (all, or ``sites``).

    Use it around the guide: ``RoutedELBO().loss(model, force_estimator(guide, "score"))``.
    With ``skip_invalid=True`` a forced ``"pathwise"`` leaves sites without ``rsample`` on
    their default route (listed in the messenger's ``skipped``) instead of raising.
    """
    messenger = ForceEstimatorMessenger(estimator, sites, skip_invalid)
    return messenger(fn) if fn is not None else messenger
