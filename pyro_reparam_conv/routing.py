"""Which gradient estimator each guide sample site gets, and why.

A latent guide site's estimator is, in order of precedence:

1. ``infer={"estimator": name}`` on the site (or set by :func:`force_estimator`), any name
   in :data:`~pyro_reparam_conv.estimators.ESTIMATORS`; a name that does not apply to the
   site's distribution (``"pathwise"`` without ``rsample``) is a ``ValueError`` naming both;
2. otherwise, for a factorized Normal site whose value an earlier step found used only as
   the weight of one ``F.linear`` / ``F.conv*`` call (``RoutingOptions.layers``), flipout
   (conv layers) or local reparameterization (linear layers);
3. otherwise the most preferred registered estimator that applies and may be chosen
   automatically (``docs/architecture.md`` has the table): the pathwise
   (reparameterization) gradient when the distribution has ``rsample`` (Kingma & Welling
   2014; Rezende et al. 2014), the exact sum over a small finite support, for Bernoulli
   sites DisARM (2 evaluations) or ARMS (a site's ``infer={"evaluations": K}``, K > 2: the
   lower variance at 4 evaluations in ``benchmarks/bernoulli_vae.py``), leave-one-out
   REINFORCE for other sites given ``infer["evaluations"]``, the score function otherwise
   (Williams 1992).

The choice is a :class:`Route` with the reason; :class:`RouteMessenger` records the routes
of a guide run, gives each site whose estimator evaluates several values an evaluation dim
(left of every plate, as Pyro's enumeration does), and lets the estimator draw the value.
Routing never mutates a distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.subsample_messenger import _Subsample

from .estimators import ESTIMATORS, base
from .estimators.base import RoutingOptions
from .baselines import BaselineSpec, parse_baseline
from .distributions import distribution_name

__all__ = [
    "ESTIMATORS",
    "CostLevel",
    "KLDecision",
    "PlateNestingNeeded",
    "Route",
    "RouteMessenger",
    "RoutingOptions",
    "SitePlan",
    "Summation",
    "choose_estimator",
    "force_estimator",
    "is_latent",
]


class PlateNestingNeeded(RuntimeError):
    """An estimator needs an evaluation dim, which goes left of every plate: the ELBO must
    know ``max_plate_nesting`` (it guesses it, as Pyro's ``TraceEnum_ELBO`` does, and retries)."""


@dataclass(frozen=True)
class KLDecision:
    """Whether ``-KL(q || p)`` replaces a pathwise site's ``log p - log q``: ``applies``,
    and what (the KL's name) or why not; ``through``: the site (a guide ``Delta`` and its
    model site, of another name) that passes the draw on to the model, whose terms the KL
    replaces too (``None``: the model site has the guide site's name)."""

    applies: bool
    reason: str
    through: Optional[str] = None

    def __str__(self) -> str:
        return f"analytic {self.reason}" if self.applies else f"no analytic KL: {self.reason}"


@dataclass(frozen=True)
class CostLevel:
    """Which costs a score-function map site's score gets: per element of the map
    (``element``; ``reason`` describes the footprint) or per plate element, and why."""

    element: bool
    reason: str

    def __str__(self) -> str:
        return f"{'element' if self.element else 'site'}-level costs: {self.reason}"


@dataclass(frozen=True)
class Summation:
    """How an enumerated site is summed: in the ``guide`` (its values weighed by their
    marginal probability) or the ``model`` (summed out of the likelihood), ``jointly`` with
    the other enumerated sites that share a factor with it, directly or through others
    (empty: on its own), and the number of entries of the largest factor (log-density
    tensor) that the variable elimination of its group takes in."""

    side: str
    jointly: tuple = ()
    largest_factor: int = 1

    def __str__(self) -> str:
        how = (f"jointly with {len(self.jointly)} other sites ({', '.join(self.jointly[:4])}"
               f"{', ...' if len(self.jointly) > 4 else ''})" if self.jointly else "on its own")
        return (f"summed in the {self.side} by variable elimination, {how}; largest factor "
                f"{self.largest_factor} entries")  # fmt: skip


@dataclass(frozen=True)
class Route:
    """The estimator a guide site (or a model site enumerated in the model) gets and why,
    for users (``elbo.routes``).

    ``because``: why the estimator (routing's choice); ``kl``, ``costs``, ``summed``: the
    decisions made after routing (:class:`KLDecision`, :class:`CostLevel`,
    :class:`Summation`; ``layers``: for a weight site routed to flipout or local
    reparameterization, whether its layers were rewritten this step or why it was a plain
    draw); ``escaped``: how the site's value left the tensor graph, if it did (its cost
    then counts every term after that point in sampling order). ``reason`` renders them
    all; ``baseline`` describes its baseline, if it has one."""

    site: str
    estimator: str
    because: str
    distribution: str
    baseline: Optional[str] = None
    forced: bool = False  # set by infer={"estimator": ...}, not chosen automatically
    markup: Optional[str] = None  # Pyro's enumeration markup that asked for it, if any
    kl: Optional[KLDecision] = None
    costs: Optional[CostLevel] = None
    escaped: Optional[str] = None
    layers: Optional[str] = None  # a weight site's layers: rewritten, or why a plain draw
    summed: Optional[Summation] = None  # an enumerated site: with which others, at what cost

    @property
    def analytic_kl(self) -> bool:
        return self.kl is not None and self.kl.applies

    @property
    def reason(self) -> str:
        decisions = (self.kl, self.costs, self.summed)
        parts = [self.because, *(str(d) for d in decisions if d is not None)]
        if self.layers is not None:
            parts.append(self.layers)
        if self.escaped is not None:
            parts.append(
                f"its value leaves the tensor graph ({self.escaped}): its cost counts every "
                "term after that point in sampling order"
            )
        return "; ".join(parts)

    def __str__(self) -> str:
        extra = f", baseline: {self.baseline}" if self.baseline is not None else ""
        return f"{self.site}: {self.estimator} ({self.reason}{extra})"


@dataclass(frozen=True)
class SitePlan:
    """Everything the ELBO does with one routed guide site, decided once per particle: its
    :class:`Route` (what users see), the estimator object, its evaluation dim (``None``:
    one draw) and its baseline spec (``None``: none)."""

    route: Route
    estimator: base.Estimator
    dim: Optional[int] = None
    baseline: Optional[BaselineSpec] = None

    def decided(self, **changes) -> "SitePlan":
        """The plan with its route's decisions (``kl``, ``costs``, ``escaped``, ``layers``,
        ``summed``) set."""
        return _copy(self, route=_copy(self.route, **changes))


def _copy(record, **changes):
    """``dataclasses.replace`` for these frozen records without ``__post_init__``, at a
    tenth of its cost (it runs per site and step)."""
    fields = record.__dataclass_fields__
    unknown = set(changes) - set(fields)
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field {sorted(unknown)[0]!r}")
    new = object.__new__(type(record))
    new.__dict__.update(record.__dict__, **changes)
    return new


def _unknown(name: str, requested: object) -> ValueError:
    return ValueError(
        f"site {name!r}: unknown estimator {requested!r} in infer['estimator']; "
        f"valid estimators are {', '.join(map(repr, ESTIMATORS))}"
    )


def choose_estimator(
    name: str, fn, infer: dict, options: RoutingOptions = RoutingOptions()
) -> tuple[base.Estimator, str]:
    """``(estimator, reason)`` for site ``name`` with distribution ``fn`` and ``infer`` dict.

    Raises ``ValueError`` for an unknown estimator name, or for one that does not apply.
    """
    estimator, reason = _choose(name, fn, infer, options)
    try:
        note = estimator.note(fn, infer)
    except ValueError as e:  # a bad option of the estimator's in infer
        raise ValueError(f"site {name!r}: {e}") from None
    return estimator, f"{reason}; {note}" if note else reason


def _markup(infer: dict) -> Optional[str]:
    """The estimator Pyro's enumeration markup asks for: ``"enumerate"`` for
    ``infer={"enumerate": "parallel"}`` (with ``num_samples``: that many draws side by side,
    as Pyro's multiple sampling) and for ``"sequential"`` (``TraceEnum_ELBO`` sums both
    exactly; here the values are side by side, checked one at a time on tracked steps, and
    a model that does not broadcast over them is an error naming the site)."""
    return "enumerate" if infer.get("enumerate") in ("parallel", "sequential") else None


def _choose(name: str, fn, infer: dict, options: RoutingOptions) -> tuple[base.Estimator, str]:
    requested = infer.get("estimator")
    if infer.get("evaluations") is not None:  # what the site may spend: part of the choice
        options = _copy(options, evaluations=infer["evaluations"])
    if requested is None and _markup(infer) is not None:
        estimator = base.get("enumerate")
        if estimator.why_not(fn) is None:
            how = f"infer['enumerate']={infer['enumerate']!r}"
            if infer.get("num_samples") is not None:
                how += f", num_samples={infer['num_samples']} (Monte Carlo, 1/n each)"
            return estimator, f"{how} (Pyro's markup) set on the site"
    chosen = options.layers.get(name) if requested is None else None
    if chosen is not None and base.get(chosen[0]).why_not(fn) is None:  # a weight, found so
        return base.get(chosen[0]), chosen[1]
    if requested is None:
        skipped = []
        for estimator in base.automatic():
            avoided = options.avoid.get(name, {}).get(estimator.name)
            if avoided and estimator.one_draw(infer) is not None:  # usable with one draw
                skipped.append(f"{avoided}: one draw per particle instead")
                avoided = None
            why_not = avoided or estimator.auto_why_not(fn, options)
            if why_not is None:
                reason = "; ".join(r for r in (*skipped, estimator.because(fn)) if r)
                return estimator, reason or f"{estimator.name} applies to {distribution_name(fn)}"
            skipped.append(why_not)
        raise ValueError(f"site {name!r}: no registered estimator applies: {'; '.join(skipped)}")
    if not isinstance(requested, str) or requested not in ESTIMATORS:
        raise _unknown(name, requested)
    estimator = base.get(requested)
    why_not = estimator.why_not(fn)
    if why_not is not None:
        hint = estimator.hint_when_refused
        raise ValueError(
            f"site {name!r}: infer['estimator']={requested!r} was requested but {why_not}, so "
            f"that estimator does not apply{hint}"
        )
    return estimator, f"infer['estimator']={requested!r} set on the site"


def is_latent(msg: dict) -> bool:
    """A sample site that is neither observed nor a plate's subsample index."""
    return (
        msg["type"] == "sample" and not msg["is_observed"] and not isinstance(msg["fn"], _Subsample)
    )


class RouteMessenger(Messenger):
    """Routes each latent site of the guide it wraps and lets the site's estimator draw it.

    After the guide has run, ``plans`` maps each latent site to its :class:`SitePlan`
    (its route, estimator, evaluation dim and baseline); a site with several evaluations
    gets an evaluation dim allocated leftwards from ``first_available_dim`` (``None``:
    ``max_plate_nesting`` is not known yet, and such a site raises
    :class:`PlateNestingNeeded`). Use a fresh messenger per guide run.
    """

    def __init__(
        self,
        default_baseline: Optional[str] = None,
        options: RoutingOptions = RoutingOptions(),
        first_available_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.default_baseline = default_baseline
        self.options = options
        self.first_available_dim = first_available_dim
        self.plans: dict[str, SitePlan] = {}
        self._marked: dict[str, Optional[str]] = {}  # the markup the user gave, per site

    def __enter__(self):
        if self.first_available_dim is not None:  # the dims are Pyro's enumeration dims
            _ENUM_ALLOCATOR.set_first_available_dim(self.first_available_dim)
        return super().__enter__()

    @property
    def routes(self) -> dict[str, Route]:
        return {name: plan.route for name, plan in self.plans.items()}

    @property
    def dims(self) -> dict[str, int]:
        return {name: plan.dim for name, plan in self.plans.items() if plan.dim is not None}

    def _pyro_sample(self, msg: dict) -> None:
        if not is_latent(msg):
            return
        name, fn = msg["name"], msg["fn"]
        if msg["infer"].get("estimator") is None:  # values side by side failed: one draw
            for avoided in self.options.avoid.get(name, {}):
                infer = base.get(avoided).one_draw(msg["infer"]) if avoided in ESTIMATORS else None
                msg["infer"] = msg["infer"] if infer is None else infer
        estimator, reason = choose_estimator(name, fn, msg["infer"], self.options)
        markup = None  # the enumeration Pyro's markup asked for and got
        if msg["infer"].get("estimator") is None and _markup(msg["infer"]) == estimator.name:
            markup = msg["infer"]["enumerate"]
        spec = None
        if estimator.uses_baseline:
            spec = parse_baseline(name, msg["infer"], self.default_baseline)
        route = Route(
            site=name,
            estimator=estimator.name,
            because=reason,
            distribution=distribution_name(fn),
            baseline=spec.describe() if spec is not None else None,
            forced=msg["infer"].get("estimator") is not None or markup is not None,
            markup=markup,
        )
        dim = None
        layout = estimator.layout
        evaluations = layout.site_evaluations(msg)
        if evaluations > 1 and self.first_available_dim is None:
            raise PlateNestingNeeded(name)
        self.plans[name] = SitePlan(route, estimator, None, spec)
        # Pyro's EnumMessenger around the guide enumerates by the markup: for the draw only,
        # it says "parallel" where routing enumerates and nothing elsewhere
        self._marked[name] = msg["infer"].pop("enumerate", None)
        if layout.pyro_enumerates:  # Pyro's enumeration draws it
            msg["infer"]["enumerate"] = "parallel"
            return
        if evaluations > 1:
            dim, _ = _ENUM_ALLOCATOR.allocate()  # Pyro's allocator: the model's dims follow
            self.plans[name] = SitePlan(route, estimator, dim, spec)
        layout.draw(msg, dim)
        if dim is not None:  # Pyro's enumeration reads the dims as its own (packed tensors)
            msg["infer"]["_dim_to_id"] = dict(_ENUM_ALLOCATOR.dim_to_id)
        if msg["value"] is not None:
            msg["done"] = True  # drawn here: no other handler (Pyro's enumeration) draws it

    def _pyro_post_sample(self, msg: dict) -> None:
        name = msg["name"]
        if name not in self._marked:
            return
        markup = self._marked.pop(name)  # the trace shows the user's markup
        msg["infer"].pop("enumerate", None)
        if markup is not None:
            msg["infer"]["enumerate"] = markup
        plan = self.plans[name]
        if not plan.estimator.layout.pyro_enumerates:
            return
        dim = msg["infer"].get("_enumerate_dim")
        if dim is None:
            raise RuntimeError(
                f"site {name!r} is routed to 'enumerate' but was not enumerated: the guide "
                "must run under pyro.poutine.enum (RoutedELBO does this)"
            )
        self.plans[name] = _copy(plan, dim=dim)


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
        self.extra: dict = {}  # further infer keys set with the estimator

    def _pyro_sample(self, msg: dict) -> None:
        if not is_latent(msg) or (self.sites is not None and msg["name"] not in self.sites):
            return
        if self.skip_invalid:
            why_not = base.get(self.estimator).why_not(msg["fn"])
            if why_not is not None:
                self.skipped[msg["name"]] = why_not
                return
        msg["infer"] = {**msg["infer"], **self.extra, "estimator": self.estimator}


def force_estimator(
    fn: Optional[Callable] = None,
    estimator: str = "score",
    sites: Optional[Iterable[str]] = None,
    skip_invalid: bool = False,
):
    """Handler forcing ``estimator`` on the latent sites of a guide (all, or ``sites``).

    Use it around the guide: ``RoutedELBO().loss(model, force_estimator(guide, "score"))``.
    With ``skip_invalid=True`` sites the estimator does not apply to keep their default
    route (listed with the reason in the messenger's ``skipped``) instead of raising.
    """
    messenger = ForceEstimatorMessenger(estimator, sites, skip_invalid)
    return messenger(fn) if fn is not None else messenger
