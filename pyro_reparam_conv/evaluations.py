"""Evaluation dims: a guide site evaluated at several values side by side.

An estimator that evaluates several values of its site in one particle (the exact sum over
a finite support, an antithetic pair) gets an *evaluation dim* left of every plate, as
Pyro's parallel enumeration does (``TraceEnum_ELBO``): the model and the rest of the guide
run once on all the values, and every term computed from them has the dim. The ELBO then
averages each term over the evaluation dims it has, with the estimators' weights
(:class:`Evaluation`): ``E[t] = sum_k w_k t_k``, the weights of a site whose weights
depend on another evaluated site (``q(k | j)``) bringing that site's weights in too.

Side by side is only right when the code computes each value's terms independently of the
others (it broadcasts over the extra leading dims, as Pyro's enumeration requires).
:func:`side_by_side_mismatch` checks it on tracked steps: it replays two of the
evaluations one at a time and compares every log-density with the side-by-side one, and
:func:`avoid_after_failure` says which automatically routed sites to route elsewhere when
the values side by side fail.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import pyro.poutine as poutine
import torch
from pyro.poutine import Trace


__all__ = [
    "Evaluation",
    "SideBySideError",
    "avoid_after_failure",
    "batch_first",
    "evaluations_of",
    "events_last",
    "expectation",
    "expectation_per_element",
    "has",
    "present",
    "spans",
    "side_by_side_mismatch",
    "weight_of",
    "weighted_terms",
]


@dataclass(frozen=True)
class Evaluation:
    """A guide site evaluated at several values side by side along ``dim`` (left of every
    plate): the ELBO averages every term that has the dim with ``weight`` (a number, or a
    tensor of the site's batch shape; summing to 1 over ``dim``). ``local``: the weights are
    per element of the site's plates (``plate_dims``), so a term with the dim must lie in
    them."""

    site: str
    dim: int
    size: int
    weight: Any
    local: bool
    plate_dims: frozenset


def evaluations_of(guide_trace: Trace, plans) -> list[Evaluation]:
    """The evaluations of a guide trace: its sites whose plan has an evaluation dim."""
    found = []
    for name, plan in plans.items():
        if plan.dim is None or plan.estimator.layout.pyro_enumerates:  # marginals weigh those
            continue
        site, estimator, dim = guide_trace.nodes[name], plan.estimator, plan.dim
        plates = frozenset(f.dim for f in site["cond_indep_stack"] if f.vectorized)
        size = site["value"].shape[dim - site["fn"].event_dim]
        layout = estimator.layout
        weight = layout.weights(site, dim)
        found.append(Evaluation(name, dim, size, weight, layout.local_weights, plates))
    return found


def has(t: Any, dim: int, size: int) -> bool:
    """Whether tensor ``t`` has the evaluation dim ``dim`` of ``size`` values (> 1)."""
    return isinstance(t, torch.Tensor) and size > 1 and spans(t.shape, dim) == size


def spans(shape, dim: int) -> int:
    """How many values ``shape`` has along ``dim`` (counted from the right; 1 if it has not
    that many dims): the one test of "has an evaluation dim" (more than 1)."""
    return shape[dim] if len(shape) >= -dim else 1


def present(t: Any, evaluations, exclude=()) -> list[Evaluation]:
    """The evaluations whose dim ``t`` has, closed under the dims of their own weights (an
    enumerated site's ``q(k | j)`` brings the site ``j`` it depends on), except ``exclude``."""
    found = [e for e in evaluations if e.site not in exclude and has(t, e.dim, e.size)]
    for e in found:  # grows while iterating: the closure
        found += [
            f
            for f in evaluations
            if f not in found and f.site not in exclude and has(e.weight, f.dim, f.size)
        ]
    return found


def weight_of(t: torch.Tensor, found, label: str) -> Any:
    """The product of the evaluations' weights (``found`` by :func:`present`), checked to be
    local to ``t``."""
    total: Any = 1.0
    for e in found:
        if e.local and isinstance(e.weight, torch.Tensor):
            for d in e.plate_dims:
                if has(e.weight, d, e.weight.shape[d]) and not has(t, d, e.weight.shape[d]):
                    raise ValueError(
                        f"site {e.site!r} is evaluated per element of its plates ({e.size} "
                        f"values along dim {e.dim}), but the term of {label} depends on it "
                        f"outside its plate at dim {d}; route {e.site!r} to 'disarm' "
                        "(Bernoulli) or 'score' instead"
                    )
        total = total * e.weight
    return total


def expectation(t: torch.Tensor, evaluations, label: str, exclude=(), detach=False) -> Any:
    """``t`` times the weights of the evaluations it has (but ``exclude``), summed over their
    dims (keepdim): its expectation over them."""
    found = present(t, evaluations, exclude)
    if not found:
        return t
    weight = weight_of(t, found, label)
    weight = weight.detach() if detach and isinstance(weight, torch.Tensor) else weight
    return (t * weight).sum([e.dim for e in found], keepdim=True)


def batch_first(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """``t`` (batch..., event...) with its event dims moved to the front, so that its batch
    dims are the rightmost, as the evaluations' dims count them (:func:`events_last` undoes it)."""
    if not event_dims:
        return t
    order = [*range(t.dim() - event_dims, t.dim()), *range(t.dim() - event_dims)]
    return t.permute(order)


def events_last(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """The inverse of :func:`batch_first`."""
    if not event_dims:
        return t
    order = [*range(event_dims, t.dim()), *range(event_dims)]
    return t.permute(order)


def expectation_per_element(
    t: torch.Tensor, event_dims: int, evaluations, label: str, exclude=()
) -> torch.Tensor:
    """:func:`expectation` (detached weights) of a per-element tensor (batch..., event...)."""
    moved = expectation(batch_first(t, event_dims), evaluations, label, exclude, detach=True)
    return events_last(moved, event_dims)


def _where_possible(weight, t):
    """``t`` with 0 where ``weight`` is 0: values of probability zero contribute nothing
    (``0 * -inf`` would be NaN), as in Pyro's ``Dice``."""
    if isinstance(weight, torch.Tensor) and isinstance(t, torch.Tensor):
        impossible = weight == 0
        if bool(impossible.any()):
            return torch.where(impossible, t.new_zeros(()), t)
    return t


def weighted_terms(elbo_t, surrogate_t, evaluations, label: str, marginal=1.0) -> tuple[Any, Any]:
    """The row's ELBO term and differentiable surrogate term, summed, with its evaluations
    averaged: ``sum W elbo`` and ``sum (W - stop W) stop(elbo) + stop(W) surrogate`` (the
    product rule: weights that depend on parameters, an enumerated site's ``q(k)``, get the
    gradient of their expectation, the terms their own). ``marginal``: the probability of
    the guide's enumerated values the term carries (a factor of ``W``)."""
    found = present(elbo_t, evaluations)
    no_marginal = isinstance(marginal, float) and marginal == 1.0
    if not found and no_marginal:
        return elbo_t.sum(), (surrogate_t.sum() if isinstance(surrogate_t, torch.Tensor) else 0.0)
    weight = weight_of(elbo_t, found, label) * marginal
    elbo_t, surrogate_t = _where_possible(weight, elbo_t), _where_possible(weight, surrogate_t)
    elbo = (weight * elbo_t).sum()
    surrogate: Any = 0.0
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        surrogate = ((weight - weight.detach()) * elbo_t.detach()).sum()
        weight = weight.detach()
    if isinstance(surrogate_t, torch.Tensor):
        surrogate = surrogate + (weight * surrogate_t).sum()
    return elbo, surrogate


class SideBySideError(ValueError):
    """The terms of a site's values evaluated side by side differ from one at a time."""


def _branch(value: torch.Tensor, picks: Mapping[int, int], event_dim: int) -> torch.Tensor:
    """``value`` at evaluation ``picks[dim]`` of each evaluation dim it has, without the
    leading singleton dims this leaves."""
    for dim, index in picks.items():
        d = dim - event_dim
        if spans(value.shape, d) > 1:
            value = value.narrow(d, index % value.shape[d], 1)
    while value.dim() > event_dim and value.shape[0] == 1:
        value = value[0]
    return value


def _combinations(sizes: Mapping[int, int]) -> list[dict[int, int]]:
    """Which evaluations to replay one at a time: all of them when they are few, else the
    first, the last and shifted diagonals, so that each dim takes several values and two
    dims never take the same index in every replay (a wrong broadcast that swaps or mixes
    evaluation dims shows)."""
    dims = list(sizes)
    if math.prod(sizes.values()) <= 8:
        return [dict(zip(dims, c)) for c in itertools.product(*(range(sizes[d]) for d in dims))]
    picks = [{d: 0 for d in dims}, {d: -1 for d in dims}]
    for shift in range(1, 3):
        picks.append({d: (shift + i) % sizes[d] for i, d in enumerate(dims)})
    return picks


def _one_at_a_time(model, guide, args, kwargs, guide_trace, subsamples, picks):
    """Guide and model traces with every latent replayed at the evaluations ``picks`` and
    the plates at the indices they drew (``subsamples``), log-densities computed."""
    branch = guide_trace.copy()
    for name, site in subsamples.nodes.items():
        branch.add_node(name, **site)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            fn, event_dim = site["fn"], site["fn"].event_dim
            shape = torch.zeros((), device=site["value"].device).expand(fn.shape())
            shape = _branch(shape, picks, event_dim).shape
            value = _branch(site["value"], picks, event_dim)
            branch.nodes[name] = {**site, "value": value.expand(shape)}
    one_guide = poutine.trace(poutine.replay(guide, trace=branch)).get_trace(*args, **kwargs)
    one_model = poutine.trace(poutine.replay(model, trace=one_guide)).get_trace(*args, **kwargs)
    one_guide.compute_log_prob()
    one_model.compute_log_prob()
    return one_guide, one_model


def side_by_side_mismatch(
    model, guide, args, kwargs, model_trace: Trace, guide_trace: Trace, dims: Mapping[str, int],
    subsamples: Optional[Trace] = None,
) -> Optional[str]:  # fmt: skip
    """Replay evaluations of the evaluated sites one at a time (:func:`_combinations`;
    ``model``, ``guide``: the plain callables, every guide latent replayed from
    ``guide_trace``, every subsampled plate at the indices in ``subsamples``) and compare
    each log-density with its side-by-side value (the traces' ``log_prob``). ``None`` if
    all agree, else which term differs."""
    sizes = {}
    for name, dim in dims.items():
        site = guide_trace.nodes[name]
        sizes[dim] = site["value"].shape[dim - site["fn"].event_dim]
    for picks in _combinations(sizes):
        try:
            one_guide, one_model = _one_at_a_time(
                model, guide, args, kwargs, guide_trace, subsamples or Trace(), picks
            )
        except Exception as e:  # noqa: BLE001 - any failure means: not independent
            return f"one value at a time fails ({type(e).__name__}: {e})"
        for role, side, one in (
            ("guide", guide_trace, one_guide),
            ("model", model_trace, one_model),
        ):
            for name, site in one.nodes.items():
                if site["type"] != "sample" or name not in side.nodes:
                    continue
                expected = _branch(side.nodes[name]["log_prob"], picks, 0)
                got = site["log_prob"]
                try:
                    same = torch.allclose(*torch.broadcast_tensors(got, expected), 1e-4, 1e-5)
                except RuntimeError:
                    same = False
                if not same:
                    return (
                        f"the log-density of {name!r} ({role}) differs between the values side "
                        "by side and one at a time"
                    )
    return None


def avoid_after_failure(plans, error: Exception):
    """After ``error`` in a particle that evaluated sites side by side (their ``plans`` have
    an evaluation dim): the estimators to avoid from now on, ``{site: {estimator: why}}``
    for the automatically routed ones; ``None`` when no such site can be the cause. A site
    whose estimator was requested (``infer["estimator"]``) and fails the side-by-side check
    is a ``ValueError`` that says how to fix it."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    problem = first_line
    if not isinstance(error, SideBySideError):
        problem = f"evaluating them side by side failed ({type(error).__name__}: {first_line})"
    dims = [name for name, plan in plans.items() if plan.dim is not None]
    routes = {name: plans[name].route for name in dims}
    sites = [name for name in dims if not routes[name].forced]
    if not sites:
        if isinstance(error, SideBySideError) or any(routes[n].markup for n in dims):
            named = ", ".join(
                f"site {n!r}: infer['enumerate']={routes[n].markup!r}" if routes[n].markup
                else f"site {n!r}: infer['estimator']={routes[n].estimator!r}" for n in dims
            )  # fmt: skip
            verb = "evaluates its values" if len(dims) == 1 else "evaluate their values"
            raise ValueError(
                f"{named} {verb} side by side, but {problem}; write the model and guide to "
                "broadcast over extra leading dims (as Pyro's parallel enumeration needs) or "
                "route the site to 'score'"
            ) from error
        return None
    return {
        name: {routes[name].estimator: f"{routes[name].estimator} needs values side by side, "
               f"and here {problem}"}
        for name in sites
    }  # fmt: skip
