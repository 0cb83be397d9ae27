"""Enumerated sites summed by variable elimination, as ``TraceEnum_ELBO`` sums them.

**Model side.** A model site marked for parallel enumeration (``infer={"enumerate":
"parallel"}``, e.g. by :func:`~pyro.infer.enum.config_enumerate`) that the guide does not
sample is marginalized: the model runs under Pyro's
:class:`~pyro.poutine.enum_messenger.EnumMessenger` (its dims left of the guide's, ``pyro.markov``
reusing them), and the log-factors of the enumerated sites and of every model site whose
log-density carries their dims are replaced by their contraction

    log sum_{z_enum} prod_f exp(f(z_enum, ...))

by Pyro's own variable elimination with plates (Obermeyer et al. 2019, "Tensor Variable
Elimination for Plated Factor Graphs": :func:`pyro.ops.contract.contract_tensor_tree` on the
factors that ``pyro.infer.traceenum_elbo._compute_model_factors`` collects): time and memory
linear in a ``pyro.markov`` chain's length, ``-inf`` factors (zero-probability values) summed
in log space without NaN. Each contracted factor becomes a ``pyro.factor``-like model site
(:class:`~pyro.distributions.Unit`) named ``"<first site> .. <last site> (summed)"``, whose
dependencies are the union of those of the sites it sums (every site at its plates or inside
them: the contraction of an ordinal absorbs only factors at that ordinal or deeper), so every
route of the guide (pathwise, score function with Rao-Blackwellization and baselines,
DisARM) composes with it unchanged: no model enumeration dim is left. The sum is exact and
differentiable, so the gradient in the model's parameters and in pathwise guide values is
``TraceEnum_ELBO``'s.

**Guide side.** A guide site routed to ``"enumerate"`` is laid out by Pyro's enumeration
too, and each term ``t`` of the ELBO that carries enumerated values ``z_S`` is averaged with
their marginal probability under the guide, ``E_q[t] = sum_{z_S} P(z_S) t(z_S)``
(:class:`GuideMarginals`, Pyro's :func:`~pyro.ops.contract.contract_to_tensor` on the
enumerated sites' ``log q``, as Pyro's ``Dice`` weighs costs), differentiable: the product rule
gives the exact gradient of the expectation. A score-function site drawn per enumerated value
gets the conditional expectation ``E_q[t | z_K]`` of its costs (``K``: the values its own
density carries). A chain of ``T`` enumerated guide sites costs ``T`` contractions of
``O(T K^2)``, not ``K^T``.

``compute_marginals`` and ``sample_posterior`` go through Pyro's own code paths
(``_compute_marginals``, ``BackwardSampleMessenger``) on the enumerated traces.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Optional

import torch
from opt_einsum import shared_intermediates
from pyro.distributions import Unit
from pyro.distributions.score_parts import ScoreParts
import pyro.poutine as poutine
from pyro.infer.util import compute_site_dice_factor
from pyro.infer.traceenum_elbo import (
    BackwardSampleMessenger,
    _compute_marginals,
    _compute_model_factors,
)
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree, contract_to_tensor
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import LogRing, MarginalRing
from pyro.poutine import Trace
from pyro.poutine.enum_messenger import EnumMessenger

from .distributions import distribution_name
from .routing import PlateNestingNeeded, Route, Summation

__all__ = [
    "EnumerateModel",
    "EnumerationRefused",
    "GuideMarginals",
    "ModelEnumerates",
    "enumerated_in_model",
    "marginals",
    "model_route",
    "posterior_sample",
    "symbolize",
    "sum_out_model_sites",
    "summations",
]


class ModelEnumerates(RuntimeError):
    """A model site marked for parallel enumeration, not in the guide, ran while the model
    ran without Pyro's enumeration: the ELBO enumerates the model from now on and runs the
    particle again from the same random state."""


class EnumerateModel:
    """Wraps the model (inside its replay on the guide trace) in Pyro's ``EnumMessenger``,
    continuing after the guide's dims, where ``max_plate_nesting`` is known and ``needed()``
    (the guide evaluates values side by side, or no step has shown the model without
    sites to sum out yet: the first step runs exactly as ``TraceEnum_ELBO``'s). A model
    found without them runs without the enumeration's bookkeeping; :meth:`check` raises
    :class:`ModelEnumerates` if a model site marked for parallel enumeration and not in the
    guide ran all the same (with the nesting unknown, :class:`~.routing.PlateNestingNeeded`:
    the ELBO guesses the nesting)."""

    def __init__(self, known: bool, needed=lambda: True) -> None:
        self.known, self.needed = known, needed
        self.wrapped = False

    def __call__(self, model):
        self.wrapped = self.known and self.needed()
        return EnumMessenger()(model) if self.wrapped else model

    def check(self, model_trace: Trace, guide_trace: Trace) -> None:
        if self.wrapped:
            return
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["infer"].get("enumerate") == "parallel" and (
                not site["is_observed"] and name not in guide_trace
            ):
                raise (ModelEnumerates if self.known else PlateNestingNeeded)(name)


def enumerated_in_model(model_trace: Trace, guide_trace: Trace) -> list[str]:
    """The model sites summed out: enumerated in the model, not sampled by the guide."""
    return [
        name for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and name not in guide_trace
        and site["infer"].get("_enumerate_dim") is not None
    ]  # fmt: skip


def _packed(model_trace: Trace, guide_trace: Trace) -> None:
    """Pyro's packed tensors (``site["packed"]``: dims named by symbols) of both traces."""
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)


def _absorbed(model_trace: Trace, guide_trace: Trace, sum_dims: set) -> list[str]:
    """The model sites whose factor enters the contraction: the enumerated ones and those
    whose packed log-density has a summed dim (``_compute_model_factors``' rule)."""
    names = set(enumerated_in_model(model_trace, guide_trace))
    return [
        name for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and "packed" in site and (
            name in names or not sum_dims.isdisjoint(site["packed"]["log_prob"]._pyro_dims))
    ]  # fmt: skip


def _frames(model_trace: Trace, names) -> dict[str, object]:
    """Plate symbol -> plate frame, over the sites ``names``."""
    found = {}
    for name in names:
        for frame in model_trace.nodes[name]["cond_indep_stack"]:
            if frame.vectorized:
                found[model_trace.plate_to_symbol[frame.name]] = frame
    return found


def _factor_site(name: str, log_factor: torch.Tensor, stack: tuple, to_symbol: dict) -> dict:
    """A ``pyro.factor``-like model site holding a contracted log-factor (scaled, masked;
    ``to_symbol``: the symbols of its dims, those of the guide's enumerated values)."""
    return {
        "type": "sample", "name": name, "fn": Unit(log_factor), "is_observed": True,
        "args": (), "kwargs": {}, "value": log_factor.new_empty(log_factor.shape + (0,)),
        "infer": {"_dim_to_symbol": to_symbol}, "scale": 1.0, "mask": None,
        "cond_indep_stack": stack,
        "done": True, "stop": False, "continuation": None, "log_prob": log_factor,
        "unscaled_log_prob": log_factor, "log_prob_sum": log_factor.sum(),
    }  # fmt: skip


def summations(factors: Mapping[str, torch.Tensor], sum_dims, side: str, report) -> dict:
    """Per site in ``report``: its :class:`~.routing.Summation`, from the packed ``factors``
    (per site) that share summed symbols (``sum_dims``) with it, directly or through others."""
    by_symbol: dict = {}
    for name, factor in factors.items():
        for symbol in set(factor._pyro_dims) & sum_dims:
            by_symbol.setdefault(symbol, []).append(name)
    found: dict = {}
    for start in report:
        if start in found:
            continue
        group, todo = {start}, [start]
        while todo:  # the connected component of ``start``
            for symbol in set(factors[todo.pop()]._pyro_dims) & sum_dims:
                new = set(by_symbol[symbol]) - group
                group |= new
                todo += new
        largest = max(factors[n].numel() for n in group)
        members = [n for n in report if n in group]
        for name in members:
            others = tuple(n for n in members if n != name)
            found[name] = Summation(side, others, largest)
    return found


def model_route(name: str, fn, summed: Summation) -> Route:
    """The route of a site enumerated in the model (it has no guide site)."""
    return Route(
        site=name, estimator="enumerate", distribution=distribution_name(fn), forced=True,
        because="infer['enumerate']='parallel' in the model and no guide site: summed out of "
        "the likelihood, as TraceEnum_ELBO does", summed=summed,
    )  # fmt: skip


def sum_out_model_sites(
    model_trace: Trace,
    guide_trace: Trace,
    dependencies: Optional[Mapping[tuple, frozenset]],
) -> tuple[Optional[Mapping[tuple, frozenset]], dict[str, tuple]]:
    """Replace, in ``model_trace`` (in place), the enumerated model sites and the sites whose
    log-density depends on them by their contracted log-factors (see the module docstring).
    Returns the dependencies with each new factor site's entry (``None`` stays ``None``) and
    each enumerated site's :class:`~.routing.Summation`. Nothing changes without enumerated
    model sites."""
    enumerated = enumerated_in_model(model_trace, guide_trace)
    if not enumerated:
        return dependencies, {}
    _packed(model_trace, guide_trace)
    _, log_factors, _, sum_dims, scale = _compute_model_factors(model_trace, guide_trace)
    absorbed = _absorbed(model_trace, guide_trace, sum_dims)
    factors = {n: model_trace.nodes[n]["packed"]["unscaled_log_prob"] for n in absorbed}
    summed = summations(factors, sum_dims, "model", enumerated)
    ordinal = {n: frozenset(f.dim for f in model_trace.nodes[n]["cond_indep_stack"]
                            if f.vectorized) for n in absorbed}  # fmt: skip
    frames = _frames(model_trace, absorbed)
    with shared_intermediates():
        contracted = contract_tensor_tree(log_factors, sum_dims)
    found = None if dependencies is None else dict(dependencies)
    new_sites, taken = [], set(model_trace.nodes)
    for t, terms in contracted.items():
        stack = tuple(frames[s] for s in sorted(t, key=lambda s: frames[s].dim))
        dims = frozenset(f.dim for f in stack)
        names = tuple(n for n in absorbed if dims <= ordinal[n])
        for term in terms:
            term = packed.scale_and_mask(term, scale=scale)
            to_symbol = {model_trace.symbol_to_dim[s]: s for s in term._pyro_dims}
            factor = packed.unpack(term, model_trace.symbol_to_dim)
            label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            name, count = f"{label} (summed)", 1
            while name in taken:  # another plate's factor over the same sites
                count += 1
                name = f"{label} (summed {count})"
            taken.add(name)
            new_sites.append(_factor_site(name, factor, stack, to_symbol))
            if found is not None:
                found[("model", name)] = frozenset().union(
                    *(found.get(("model", n), frozenset()) for n in names)
                )
    for name in absorbed:
        model_trace.remove_node(name)
    for site in new_sites:
        model_trace.add_node(site["name"], **site)
    return found, summed


class EnumerationRefused(NotImplementedError):
    """A combination that ``TraceEnum_ELBO`` refuses too, refused with the same exception
    type so that code (and Pyro's own tests) catching Pyro's error catch this one:
    ``compute_marginals`` / ``sample_posterior`` with several particles or with an
    enumerating guide, and model sites marked for enumeration under an effect-based guide
    (``GuideMessenger``), which runs the model itself. The message says which and how to
    avoid it."""


def _no_guide_enumeration(guide_trace: Trace, what: str) -> None:
    names = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
             and ("_enumerate_dim" in site["infer"] or site["infer"].get("enumerate"))]  # fmt: skip
    if names:
        raise EnumerationRefused(
            f"RoutedELBO.{what}() is not compatible with guide enumeration (as "
            f"TraceEnum_ELBO.{what}()): the guide enumerates {names}"
        )


def marginals(model_trace: Trace, guide_trace: Trace) -> OrderedDict:
    """The marginal distribution of each enumerated model site given the guide's draws
    (log-densities computed; the guide enumerating nothing), by Pyro's own
    ``TraceEnum_ELBO.compute_marginals`` code path."""
    _no_guide_enumeration(guide_trace, "compute_marginals")
    _packed(model_trace, guide_trace)
    return _compute_marginals(model_trace, guide_trace)


def posterior_sample(model, args, kwargs, model_trace: Trace, guide_trace: Trace):
    """The model run once with its enumerated sites drawn jointly from their posterior given
    the guide's draws (forward filtering, backward sampling: Pyro's
    ``BackwardSampleMessenger``, as ``TraceEnum_ELBO.sample_posterior``)."""
    _no_guide_enumeration(guide_trace, "sample_posterior")
    _packed(model_trace, guide_trace)
    with BackwardSampleMessenger(model_trace, guide_trace):
        return poutine.replay(model, trace=guide_trace)(*args, **kwargs)


def symbolize(model_trace: Trace, guide_trace: Trace) -> None:
    """Name every plate and enumeration dim of both traces by a symbol (Pyro's
    ``Trace.symbolize_dims``: ``site["infer"]["_dim_to_symbol"]``; a dim that
    ``pyro.markov`` reuses has one symbol per site that allocated it)."""
    guide_trace.symbolize_dims()
    model_trace.symbolize_dims(guide_trace.plate_to_symbol)


def _dice_factor(site: dict) -> torch.Tensor:
    """The packed factor of an enumerated guide site: ``log q`` (unscaled), or, for a site
    drawn ``num_samples`` times side by side (Pyro's multiple sampling), Pyro's Dice factor
    ``log q - stop(log q) - log num_samples`` (each draw weighs ``1 / num_samples``; its
    gradient is the score function's)."""
    to_symbol = site["infer"]["_dim_to_symbol"]
    log_q = packed.pack(site["score_parts"].score_function, to_symbol)
    if site["infer"].get("num_samples") is None:
        return log_q
    view = {"infer": site["infer"], "value": site["value"], "packed": {
        "score_parts": ScoreParts(log_q, log_q, log_q), "log_prob": log_q}}  # fmt: skip
    return compute_site_dice_factor(view)[0]


class GuideMarginals:
    """The marginal probability, under the guide, of the values of its enumerated sites that
    a term carries: ``P(z_S) = sum_{z not in S} prod_i q(z_i | pa_i)``, by Pyro's variable
    elimination with plates (:func:`pyro.ops.contract.contract_to_tensor`, Dice's factors
    of enumerated sites: ``log q`` unscaled), differentiable (its gradient is the exact
    gradient of the expectation), computed once per set of values and plates.

    A term ``t`` with those values is averaged as ``E_q[t] = sum_{z_S} P(z_S) t(z_S)``: only
    the values ``t`` itself carries, so a chain of ``T`` enumerated sites costs ``T``
    contractions of ``O(T K^2)`` each, not ``K^T``. ``sites``: the enumerated guide sites
    (their traces symbolized, :func:`symbolize`, log-densities computed)."""

    def __init__(self, model_trace: Trace, guide_trace: Trace, sites) -> None:
        self.plate_to_symbol = model_trace.plate_to_symbol
        self.symbol_to_dim = {**guide_trace.symbol_to_dim, **model_trace.symbol_to_dim}
        self.sum_dims: set = set()
        self.factors: OrderedDict = OrderedDict()
        by_site = {}
        self.owner: dict = {}  # symbol -> (its site, the site's ordinal)
        self.enum_sizes: dict = {}  # symbol -> number of values
        for name in sites:
            site = guide_trace.nodes[name]
            self.sum_dims.add(site["infer"]["_enumerate_symbol"])
            self.owner[site["infer"]["_enumerate_symbol"]] = (name, self.ordinal(site))
            log_q = _dice_factor(site)
            symbol = site["infer"]["_enumerate_symbol"]
            self.enum_sizes[symbol] = log_q.shape[log_q._pyro_dims.index(symbol)]
            self.factors.setdefault(self.ordinal(site), []).append(log_q)
            by_site[name] = log_q
        #: the dims of the enumerated values (a cost per value keeps them)
        self.dims = {self.symbol_to_dim[s] for s in self.sum_dims}
        #: per enumerated site, how it is summed (:class:`~.routing.Summation`)
        self.summations = summations(by_site, self.sum_dims, "guide", list(sites))
        #: symbol -> size, for the plates a marginal is broadcast to
        self.sizes = {self.plate_to_symbol[f.name]: f.size
                      for trace in (model_trace, guide_trace) for site in trace.nodes.values()
                      if site["type"] == "sample"
                      for f in site["cond_indep_stack"] if f.vectorized}  # fmt: skip
        self._found: dict = {}
        self._shared: dict = {}

    def ordinal(self, site: dict) -> frozenset:
        return frozenset(self.plate_to_symbol[f.name] for f in site["cond_indep_stack"]
                         if f.vectorized)  # fmt: skip

    def symbols(self, t, site: dict) -> frozenset:
        """The enumerated values tensor ``t`` of ``site`` carries (its symbols)."""
        if not isinstance(t, torch.Tensor):
            return frozenset()
        to_symbol = site["infer"].get("_dim_to_symbol", {})
        return frozenset(
            to_symbol[d] for d in range(-t.dim(), 0)
            if t.shape[d] > 1 and to_symbol.get(d) in self.sum_dims
        )  # fmt: skip

    def prepare(self, *traces: Trace) -> None:
        """Compute at once the marginals of the values every sample site's log-density in
        ``traces`` carries: per plate context one sum-product with every such query and one
        backward pass (Pyro's ``MarginalRing``, as its ``Dice`` computes expectations), so a
        ``pyro.markov`` chain costs ``O(T K^2)``, not a contraction per term."""
        wanted: dict = {}
        for trace in traces:
            for site in trace.nodes.values():
                if site["type"] == "sample" and isinstance(site.get("log_prob"), torch.Tensor):
                    symbols = self.symbols(site["log_prob"], site)
                    if symbols:
                        key = (symbols, self.ordinal(site))
                        wanted.setdefault(key[1], set()).add(key[0])
        for ordinal, queries in wanted.items():  # (a term outside a site's plates: an error
            local = [q for q in queries  # when it is weighed, :meth:`_check_local`)
                     if (q, ordinal) not in self._found
                     and all(self.owner[s][1] <= ordinal for s in q)]  # fmt: skip
            self._marginals_at(ordinal, local)

    def dependencies(self, found, model_trace: Trace, guide_trace: Trace):
        """``found`` (per ``(role, name)`` term, the latents it depends on; ``None`` stays
        ``None``) with, for every term that carries enumerated values, what their marginal
        depends on: the latents that the densities of the enumerated sites in the same
        group depend on (a sampled site upstream of them, whose score's cost must count
        the term's expectation)."""
        if found is None:
            return None
        groups = {}
        for symbol, (name, _) in self.owner.items():
            members = (name, *self.summations[name].jointly)
            groups[symbol] = frozenset().union(*(found.get(("guide", m), ()) for m in members))
        found = dict(found)
        for role, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and isinstance(site.get("log_prob"), torch.Tensor):
                    symbols = self.symbols(site["log_prob"], site)
                    if symbols:
                        extra = frozenset().union(*(groups[s] for s in symbols))
                        found[(role, name)] = found.get((role, name), frozenset()) | extra
        return found

    def _marginals_at(self, ordinal: frozenset, queries) -> None:
        if not queries:
            return
        factors = [f for t, fs in self.factors.items() if t <= ordinal for f in fs]
        adjoints = {}
        for symbols in queries:  # a zero log-factor over the query's values and plates
            dims = "".join(sorted(symbols | (ordinal & set(self.sizes))))
            query = factors[0].new_zeros(tuple(self.sizes.get(d) or self.enum_sizes[d]
                                               for d in dims))  # fmt: skip
            query._pyro_dims = dims
            require_backward(query)
            adjoints[symbols] = query
        ring = MarginalRing(cache=self._shared)
        sum_dims = set().union(*(f._pyro_dims for f in factors)) - ordinal
        root = ring.sumproduct([*factors, *adjoints.values()], sum_dims)
        root._pyro_backward()
        for symbols, query in adjoints.items():
            result = query._pyro_backward_result
            result._pyro_dims = query._pyro_dims
            self._found[(symbols, ordinal)] = result

    def _log_marginal(self, symbols: frozenset, ordinal: frozenset) -> torch.Tensor:
        key = (symbols, ordinal)
        if key not in self._found:
            tree = OrderedDict((t, f) for t, f in self.factors.items() if t <= ordinal)
            ring = LogRing(cache=self._shared, dim_to_size=self.sizes)
            self._found[key] = contract_to_tensor(
                tree, self.sum_dims, ordinal, set(symbols), ring=ring
            )
        return self._found[key]

    def _check_local(self, symbols, ordinal: frozenset, label: str) -> None:
        """A term outside an enumerated site's plates that depends on it: per-element values
        side by side cannot be summed there (Pyro's plate restriction)."""
        for symbol in symbols:
            name, inside = self.owner[symbol]
            if not inside <= ordinal:
                raise ValueError(
                    f"site {name!r} is evaluated per element of its plates, but the term of "
                    f"{label} depends on it outside its plate; route {name!r} to 'disarm' "
                    "(Bernoulli) or 'score' instead"
                )

    def weight(self, t, site: dict, given=frozenset(), detach: bool = False, label: str = ""):
        """``P(z_S | z_given)`` for the values ``S`` that ``t`` carries (``given``: values
        kept, a cost per value of a site), unpacked to broadcast with ``t``; ``1.0`` when
        ``t`` carries none but ``given``. Its gradient flows unless ``detach``. ``label``
        names the term in errors."""
        symbols = self.symbols(t, site) | given
        if not symbols - given:
            return 1.0
        ordinal = self.ordinal(site)
        self._check_local(symbols, ordinal, label or repr(site["name"]))
        log_p = self._log_marginal(symbols, ordinal)
        if given:
            log_given = self._log_marginal(given, ordinal)
            log_p, log_given = packed.broadcast_all(log_p, log_given)
            dims = log_p._pyro_dims
            log_p = torch.where(log_given > -math.inf, log_p - log_given, log_given)
            log_p._pyro_dims = dims
        weight = log_p.exp()
        weight._pyro_dims = log_p._pyro_dims
        weight = packed.unpack(weight, self.symbol_to_dim)
        return weight.detach() if detach else weight

    def expect(self, t, site: dict, given=frozenset(), detach: bool = True, label: str = ""):
        """``E_q[t | z_given]``: ``t`` times :meth:`weight`, summed over the values it
        carries but ``given`` (keepdim)."""
        weight = self.weight(t, site, given, detach, label)
        if isinstance(weight, float):
            return t
        dims = [d for d in range(-t.dim(), 0) if t.shape[d] > 1 and
                site["infer"]["_dim_to_symbol"].get(d) in self.symbols(t, site) - given]
        t = torch.where(weight == 0, t.new_zeros(()), t)  # impossible values: nothing
        return (t * weight).sum(dims, keepdim=True) if dims else t * weight
