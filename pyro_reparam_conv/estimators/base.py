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
- :meth:`Estimator.draw`: how the site's value is drawn (``None``: Pyro's own draw,
  ``fn(*args)``, which is ``rsample`` for a distribution that has it);
- :meth:`Estimator.score_parts`: the parts the site contributes, from the site as traced
  (Pyro has already computed the distribution's own parts into ``site["score_parts"]``).

:func:`register` adds an instance under its name (:func:`unregister` removes it);
:data:`ESTIMATORS` lists the registered names (a live view, in registration order), and
:func:`get` returns one. Adding an estimator is
one module defining and registering a subclass plus one import line in
:mod:`pyro_reparam_conv.estimators`; ``docs/architecture.md`` walks through an example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Optional

from pyro.distributions.score_parts import ScoreParts

__all__ = ["ESTIMATORS", "Estimator", "automatic", "get", "register", "unregister"]


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

    def why_not(self, fn) -> Optional[str]:
        """``None`` if the estimator applies to distribution ``fn``, else the reason it does not."""
        return None

    def because(self, fn) -> str:
        """Why it applies to ``fn``, for a route's reason (e.g. ``"Normal has rsample"``)."""
        return ""

    def has_score_function(self, fn) -> bool:
        """Whether :meth:`score_parts` can carry a score-function part for ``fn`` (then the
        site needs a cost). Conservative default: yes."""
        return True

    def draw(self, msg: dict) -> None:
        """Set ``msg["value"]`` for a latent site, or leave it ``None`` for Pyro's own draw."""

    def score_parts(self, site: dict) -> ScoreParts:
        """``(log_prob, score_function, entropy_term)`` of a traced guide site: ``log_prob``
        and ``entropy_term`` scaled and masked as the site is, ``score_function`` not (its
        cost carries the scale). Default: the distribution's own parts, as Pyro computes them."""
        return site["score_parts"]


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
