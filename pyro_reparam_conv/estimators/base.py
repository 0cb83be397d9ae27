"""The estimator interface and its registry.

An estimator says, for one guide sample site ``z ~ q_phi``, how the ELBO's gradient in
``phi`` is estimated. Every estimator here fits one pattern: the site contributes Pyro's
three *score parts* (:class:`~pyro.distributions.score_parts.ScoreParts`),

- ``log_prob``: ``log q(z)``, its term of the ELBO's value;
- ``entropy_term``: differentiated as it is (``-entropy_term`` enters the surrogate), which
  is ``log q(z)`` through a reparameterized draw for the pathwise estimator;
- ``score_function``: multiplied by the site's fixed cost less a baseline,
  ``score_function * stop_grad(cost - b)``, which is ``log q(z)`` for the score function,

exactly as Pyro's ``Trace_ELBO`` combines the score parts of every guide site (Schulman et
al. 2015, "Gradient Estimation Using Stochastic Computation Graphs"). An estimator is a
class with

- ``name``: what ``infer={"estimator": name}`` and :func:`~..routing.force_estimator` use;
- :meth:`Estimator.why_not`: ``None`` when it applies to a distribution, else the reason;
- ``layout``: how the site's values are laid out (a :class:`Layout`): its ``draw`` (the
  default leaves the value to Pyro's own draw, ``fn(*args)``, which is ``rsample`` for a
  distribution that has it);
- what the site adds to the surrogate: :meth:`Estimator.score_parts`, the parts the site
  contributes, from the site as traced (Pyro has already computed the distribution's own
  parts into ``site["score_parts"]``), and :meth:`Estimator.surrogate`, a term of its own.

A layout may evaluate several values of the site in one particle
(:meth:`Layout.evaluations` > 1, or :meth:`Layout.site_evaluations` where the count depends
on the site's ``infer`` or plates: the exact sum over a finite support, an antithetic pair,
a mixture's components).
Routing then gives the site an *evaluation dim* left of every plate (where Pyro puts
enumeration dims) and :meth:`Layout.draw` lays the values out along it; the model and the
rest of the guide see them side by side, and every term that depends on them has the dim
too. The ELBO averages each term over the dim with :meth:`Layout.weights` (``q(k)`` for
enumeration, differentiable: its gradient is exact; ``1/2`` for an antithetic pair), and
:meth:`Estimator.surrogate` may add a term of its own computed from the site's cost per
evaluation (DisARM's). ``Layout.local_weights`` says whether the weights are per element
of the site's plates; then every term that depends on the site must lie inside those
plates.

:func:`register` adds an instance under its name (:func:`unregister` removes it);
:data:`ESTIMATORS` lists the registered names (a live view, in registration order), and
:func:`get` returns one. Adding an estimator is
one module defining and registering a subclass plus one import line in
:mod:`pyro_reparam_conv.estimators`; ``docs/architecture.md`` walks through an example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from pyro.distributions.score_parts import ScoreParts

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Layout",
    "RoutingOptions",
    "automatic",
    "get",
    "register",
    "unregister",
]


class Layout:
    """How an estimator lays out its site's values in one particle: one draw (this class:
    Pyro's own draw, ``rsample`` where the distribution has it), or several values side by
    side along an evaluation dim, which the ELBO averages with :meth:`weights`."""

    #: whether :meth:`weights` are per element of the site's plates (enumeration): then
    #: every term that depends on the site must lie inside the site's plates
    local_weights: ClassVar[bool] = False
    #: whether Pyro's parallel enumeration (``pyro.poutine.enum`` around the guide) lays out
    #: the values: then :meth:`draw` is not called, the dims are Pyro's (``pyro.markov``
    #: reuses them) and the ELBO weighs each term by the marginal probability of the values
    #: it carries (:class:`~pyro_reparam_conv.enumeration.GuideMarginals`)
    pyro_enumerates: ClassVar[bool] = False

    def evaluations(self, fn) -> int:
        """How many values of the site one particle evaluates side by side (1: one draw)."""
        return 1

    def site_evaluations(self, msg: dict) -> int:
        """:meth:`evaluations` for one site as routing sees it (its ``fn``, ``infer`` and
        plates, ``msg["cond_indep_stack"]``): a layout whose count depends on more than the
        distribution overrides this one (default: ``evaluations(msg["fn"])``)."""
        return self.evaluations(msg["fn"])

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        """Set ``msg["value"]`` for a latent site, or leave it ``None`` for Pyro's own draw.
        With :meth:`evaluations` > 1, ``dim`` is the site's evaluation dim (counted from the
        right of the batch shape, as a plate's): lay the values out along it."""

    def weights(self, site: dict, dim: int) -> Any:
        """How the ELBO averages the site's evaluations along ``dim``: a tensor broadcastable
        to the site's batch shape, or a number, summing to 1 over ``dim`` (default: equal)."""
        return 1.0 / site["value"].shape[dim - site["fn"].event_dim]


@dataclass(frozen=True)
class RoutingOptions:
    """What the automatic choice depends on besides the distribution.

    ``max_enumerate``: the largest support (values per plate element) that routing sums
    over exactly by itself (see ``docs/architecture.md`` for the measured table behind the
    default). ``avoid``: per site, estimators found not to work for it (the model does not
    compute values side by side independently), with the reason. ``layers``: per site whose
    value a step found used only as one layer call's weight, the layer estimator routing
    picks for it and why (:mod:`pyro_reparam_conv.weight_layers`). ``evaluations``: how many
    values the site being routed may evaluate side by side (its ``infer["evaluations"]``,
    set per site by routing; ``None``: the estimators' defaults).
    """

    max_enumerate: int = 16
    avoid: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    layers: Mapping[str, tuple] = field(default_factory=dict)
    evaluations: Optional[int] = None


class Estimator:
    """One gradient estimator (see the module docstring). Stateless: one instance serves
    every site and every call."""

    #: the name sites ask for with ``infer={"estimator": name}``
    name: ClassVar[str] = ""
    #: whether routing may choose it without being asked (a biased estimator must say False)
    automatic: ClassVar[bool] = True
    #: order of preference for the automatic choice: the applicable estimator with the
    #: lowest priority wins (pathwise 0, score function 100, the fallback)
    priority: ClassVar[int] = 50
    #: whether its score-function part takes a baseline (``infer={"baseline": ...}``)
    uses_baseline: ClassVar[bool] = False
    #: whether a map site's score function may be split per element, each element charged
    #: with the terms in its footprint only (:mod:`pyro_reparam_conv.locality`)
    element_costs: ClassVar[bool] = False

    #: how the site's values are laid out in one particle (:class:`Layout`; default: one
    #: draw, Pyro's own)
    layout: ClassVar["Layout"]
    #: whether the fast path may replace the site's ``log p - log q`` by ``-KL(q || p)``
    #: (its draw is reparameterized and its terms differentiated as they are)
    takes_analytic_kl: ClassVar[bool] = False
    #: whether its gradient differentiates the cost through the draw: biased where the cost
    #: is not differentiable in the site (what ``audit_gradients(check_bias=True)`` tests)
    through_the_cost: ClassVar[bool] = False
    #: whether :meth:`surrogate` gets the site's cost with its graph (to differentiate it in
    #: the site's value, which its layout draws as a leaf that requires grad)
    cost_graph: ClassVar[bool] = False
    #: what an error adds when the estimator is requested for a site it does not apply to
    hint_when_refused: ClassVar[str] = ""

    def why_not(self, fn) -> Optional[str]:
        """``None`` if the estimator applies to distribution ``fn``, else the reason it does not."""
        return None

    def auto_why_not(self, fn, options: RoutingOptions) -> Optional[str]:
        """Why routing should not choose it by itself for ``fn`` (default: :meth:`why_not`);
        an empty reason skips it without saying why in the route (another estimator's
        reason already covers it)."""
        return self.why_not(fn)

    def because(self, fn) -> str:
        """Why it applies to ``fn``, for a route's reason (e.g. ``"Normal has rsample"``)."""
        return ""

    def note(self, fn, infer: dict) -> str:
        """What a route's reason adds whenever the estimator is used (its cost, its bias)."""
        return ""

    def one_draw(self, infer: dict) -> Optional[dict]:
        """The site's ``infer`` with which the estimator draws one value per particle, for a
        site whose values side by side failed (``RoutingOptions.avoid``): ``infer`` itself
        where it draws one already, ``None`` (default) where it cannot do without them (then
        routing takes the next estimator)."""
        return None

    def has_score_function(self, fn) -> bool:
        """Whether :meth:`score_parts` can carry a score-function part for ``fn``, or
        :meth:`surrogate` a term (either way the site needs its cost). Default: yes."""
        return True

    def surrogate(self, site: dict, cost: Any, dim: Optional[int]) -> Any:
        """A surrogate term of the estimator's own, from the site's cost (detached unless
        :attr:`cost_graph`, the site's batch shape, one entry per evaluation along ``dim``),
        to be maximized; default none."""
        return 0.0

    @property
    def has_own_surrogate(self) -> bool:
        """Whether it overrides :meth:`surrogate` (its term then needs the site's cost)."""
        return type(self).surrogate is not Estimator.surrogate

    def score_parts(self, site: dict) -> ScoreParts:
        """``(log_prob, score_function, entropy_term)`` of a traced guide site: ``log_prob``
        and ``entropy_term`` scaled and masked as the site is, ``score_function`` not (its
        cost carries the scale). Default: the distribution's own parts, as Pyro computes them."""
        return site["score_parts"]


Estimator.layout = Layout()

_REGISTRY: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    """Add ``estimator`` to the registry under ``estimator.name`` (a new name only)."""
    name = estimator.name
    if not name or not isinstance(name, str):
        raise ValueError(f"{type(estimator).__name__}: an estimator needs a non-empty str name")
    if name in _REGISTRY and type(_REGISTRY[name]) is not type(estimator):
        raise ValueError(f"an estimator named {name!r} is registered already")
    _REGISTRY[name] = estimator
    return estimator


def unregister(name: str) -> Estimator:
    """Remove the estimator called ``name`` from the registry and return it."""
    return _REGISTRY.pop(get(name).name)


def get(name: str) -> Estimator:
    """The registered estimator called ``name``; ``KeyError`` listing the valid names if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown estimator {name!r}; valid estimators are {', '.join(map(repr, _REGISTRY))}"
        ) from None


def automatic() -> list[Estimator]:
    """The estimators routing may choose by itself, most preferred first."""
    return sorted((e for e in _REGISTRY.values() if e.automatic), key=lambda e: e.priority)


class _Names(Sequence):
    """The registered estimator names, in registration order (a live, read-only view)."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __add__(self, other) -> tuple:
        return tuple(self) + tuple(other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


#: names of the registered estimators (``"pathwise"``, ``"score"``, and any registered later)
ESTIMATORS: Sequence[str] = _Names()
