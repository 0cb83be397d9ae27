"""Element-level Rao-Blackwellization for score-function sites that are maps.

A score-function term ``grad log q(z) * (c - b)`` needs in its cost ``c`` only the terms
that depend on ``z`` (Schulman et al. 2015). For a latent map ``z`` (a site whose event is
``(C, h, w)``) with a factorized guide, the score splits over elements,
``grad log q(z) = sum_e grad log q(z_e)``, and element ``e`` needs only the terms that
depend on ``z_e``: its own ``log p(z_e) - log q(z_e)`` and, for a likelihood computed from
``z`` by convolutions, the per-pixel log-densities inside ``e``'s *footprint* (the pixels
whose value depends on ``z_e``). Every other pixel adds noise and no signal. This module
finds the footprints from the model's own computation and gives the per-element costs.

Finding a footprint, on a tracked step: the sound analysis of :mod:`.sparsity` follows the
elements of ``z`` through the model's own run (no replay, no other parameter values, no
module state touched) and gives, per element of each dependent log-density, a box of the
elements of ``z`` it can depend on; :class:`BoxSum` then charges each element the terms
whose box contains it. A box is a superset of the true dependency whatever the parameter
values, activations or data (the rules are structural), so the estimator stays unbiased;
an operator the analysis does not know, an index or control flow computed from ``z``, or
an in-place write it cannot follow makes the costs site-level, with the reason in the
route. A pixel that depends on the elements of another image (batch normalization), or on
more than half of the map (a dense layer, a normalization over space), also keeps
site-level costs: element-level costs would cost more and gain nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace

from .distributions import unwrap_independent
from .kernels import compact_normal_log_prob
from .routing import CostLevel
from .sparsity import distribution_tensors, union

__all__ = [
    "Footprint",
    "RAO_BLACKWELL",
    "per_element",
    "precompute",
    "BoxSum",
    "candidates",
    "element_log_prob",
    "find_footprint",
    "footprint_from_analysis",
    "cost_level",
    "plan_footprints",
    "scaled_elements",
]

#: the values of a site's ``infer["rao_blackwell"]``: per element of its map (the default,
#: where it applies) or per element of its plates only (``"site"``)
RAO_BLACKWELL = ("element", "site")


# ----------------------------------------------------------------- per-element densities
def element_log_prob(fn, value: torch.Tensor) -> Optional[torch.Tensor]:
    """``fn.log_prob(value)`` before the sum over its event dims (shape batch + event), for an
    ``Independent`` of a distribution with one log-density per element; ``None`` otherwise."""
    base, ndims = unwrap_independent(fn)
    if not ndims or tuple(base.batch_shape)[-ndims:] != tuple(fn.event_shape):
        return None
    if base.event_shape != ():
        return None
    log_p = None if is_validation_enabled() else compact_normal_log_prob(base, value)
    if log_p is None:  # validated (or not a Normal with broadcast parameters): as it is
        log_p = base.log_prob(value)
    full = fn.batch_shape + fn.event_shape
    return log_p if log_p.shape == full else log_p.expand(torch.broadcast_shapes(log_p.shape, full))


def scaled_elements(site: dict, per_element: torch.Tensor) -> torch.Tensor:
    """A site's scale and mask (which concern its batch dims) applied to its elements."""
    event = site["fn"].event_dim
    mask = site["mask"]
    if isinstance(mask, torch.Tensor):
        mask = mask.reshape(mask.shape + (1,) * event)
    scale = site["scale"]
    if isinstance(scale, torch.Tensor) and scale.dim():
        scale = scale.reshape(scale.shape + (1,) * event)
    return scale_and_mask(per_element, scale, mask)


# -------------------------------------------------------------------------- footprints
@dataclass(frozen=True)
class BoxSum:
    """Sums a dependent term's per-element values over every element's box, per element of
    the map: ``out[e] = sum over o with e in box(o) of values[o]``, by an n-dimensional
    difference array (add ``values[o]`` at the ``2^m`` corners of ``box(o)`` with signs,
    then cumulative sums), in float64. Dims of the map that every box spans fully are
    summed once (``full``)."""

    shape: tuple  # the term's per-element shape
    map_shape: tuple  # the map's shape (all its dims)
    box: torch.Tensor  # (2n, *shape): -lo and hi per map dim, -inf where it depends on none
    select: torch.Tensor  # flat indices of the elements that depend on some element
    index: torch.Tensor  # (2^m, len(select)) flat corner indices in the padded grid
    sign: torch.Tensor  # (2^m,)
    padded: tuple  # the grid's shape (size + 1 in each kept dim, 1 in full dims)

    @staticmethod
    def build(box: torch.Tensor, map_shape: tuple) -> "BoxSum":
        n = len(map_shape)
        flat = box.reshape(2 * n, -1)
        select = (flat[n:] >= -flat[:n]).all(0).nonzero().flatten()
        lo, hi = (-flat[:n, select]).long(), flat[n:, select].long()
        full = [
            d for d in range(n) if bool((lo[d] == 0).all() and (hi[d] == map_shape[d] - 1).all())
        ]
        kept = [d for d in range(n) if d not in full]
        padded = tuple(1 if d in full else map_shape[d] + 1 for d in range(n))
        strides = torch.tensor([math.prod(padded[d + 1 :]) for d in range(n)])
        corners, signs = [], []
        for mask in range(1 << len(kept)):
            coord = torch.zeros_like(lo)
            for j, d in enumerate(kept):
                coord[d] = hi[d] + 1 if mask >> j & 1 else lo[d]
            corners.append((coord * strides.unsqueeze(1)).sum(0))
            signs.append(-1.0 if bin(mask).count("1") % 2 else 1.0)
        signs = torch.tensor(signs, dtype=torch.float64)
        shape = tuple(box.shape[1:])
        return BoxSum(shape, tuple(map_shape), box, select, torch.stack(corners), signs, padded)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """Per element of the map, the sum of ``values`` (the term's per-element shape)."""
        device = values.device
        flat = values.expand(self.shape).reshape(-1)[self.select.to(device)].double()
        grid = torch.zeros(math.prod(self.padded), dtype=torch.float64, device=device)
        added = (self.sign.to(device).unsqueeze(1) * flat.unsqueeze(0)).reshape(-1)
        grid.index_add_(0, self.index.to(device).reshape(-1), added)
        grid = grid.reshape(self.padded)
        for d, size in enumerate(self.padded):
            if size > 1:
                grid = grid.cumsum(d)
        crop = tuple(slice(0, max(1, s - 1)) for s in self.padded)
        return grid[crop].expand(self.map_shape).to(values.dtype)

    def counts(self) -> torch.Tensor:
        """Per element of the map, how many of the term's elements depend on it."""
        return self(torch.ones(self.shape, dtype=torch.float64))


@dataclass(frozen=True)
class Footprint:
    """Which elements of each dependent model term depend on which element of the site's
    map, as one :class:`BoxSum` per dependent model site (``sums``); ``sizes[t]``: the most
    pixels of ``t`` that one position of the map feeds, and ``t``'s pixels per image."""

    site: str
    map_shape: tuple
    sums: Mapping[str, BoxSum]
    sizes: Mapping[str, tuple[int, int]]

    def describe(self) -> str:
        return ", ".join(f"<= {k} of {n} pixels of {t!r}" for t, (k, n) in self.sizes.items())


def _term_box(analysis, site: dict, source: str, k: int) -> Union[torch.Tensor, str]:
    """The box of each element of model site ``site``'s per-element log-density: the union
    of the boxes of its distribution's tensors, its value, mask and scale."""
    fn = site["fn"]
    name = site["name"]
    elementwise = element_log_prob(fn, site["value"]) is not None
    shape = tuple(fn.batch_shape + fn.event_shape) if elementwise else tuple(fn.batch_shape)
    event = fn.event_dim if elementwise else 0
    boxes = []
    for t in distribution_tensors(fn) + [site["value"]]:
        box = analysis.box(t, source)
        if box is None:
            continue
        if not elementwise:  # no per-element density: every element of the term counts
            box = box.reshape(k, -1).amax(1).reshape((k,) + (1,) * len(shape))
        boxes.append(box)
    for key in ("mask", "scale"):
        t = site.get(key)
        box = analysis.box(t, source) if isinstance(t, torch.Tensor) else None
        if box is not None:
            boxes.append(box.reshape(tuple(box.shape) + (1,) * event))
    try:
        return union(boxes, shape, k, site["value"].device) if boxes else None
    except RuntimeError:
        return f"a tensor of {name!r}'s distribution does not broadcast to its elements"


def _locality(term: str, sums: BoxSum, map_shape, batch: int, channels: int):
    """Why a footprint is not worth element-level costs (a string), or its size."""
    n = len(map_shape)
    box = sums.box.reshape(2 * n, -1)[:, sums.select]
    span = box[n:] + box[:n] + 1  # hi - lo + 1 per dim
    if bool((span[:batch] > 1).any()):
        return f"a pixel of {term!r} depends on other elements of the plate (batch norm?)"
    positions = math.prod(map_shape[-2:])
    largest = int(span[-2:].prod(0).max()) if span.numel() else 0
    if largest * 2 > positions:
        return (f"not local: a pixel of {term!r} depends on {largest} of {positions} positions "
                "(a dense layer or a normalization over the map?)")  # fmt: skip
    per_image = math.prod(sums.shape[-2:]) if len(sums.shape) >= 2 else 1
    most = int(sums.counts().max()) if sums.select.numel() else 0
    return math.ceil(most / channels), per_image


def footprint_from_analysis(analysis, model_trace: Trace, guide_trace: Trace, name: str,
                            dependents, traced=frozenset()) -> Union[Footprint, str]:  # fmt: skip
    """The footprints of latent map ``name`` in the model sites ``dependents`` from a tracked
    step's :class:`~.sparsity.Analysis`, or why its costs stay site-level. A dependent in
    ``traced`` (its log-density's provenance holds ``name``) whose terms no box reaches
    depends on it in a way the analysis did not see: site-level costs."""
    node = guide_trace.nodes[name]
    if node["fn"].event_dim < 2:
        return "not a map (fewer than 2 event dims)"
    if element_log_prob(node["fn"], node["value"]) is None:
        return "its guide distribution has no per-element log-density"
    own = model_trace.nodes.get(name)
    if own is None or element_log_prob(own["fn"], own["value"]) is None:
        return "its prior has no per-element log-density"
    if name in analysis.unknown:
        return analysis.unknown[name]
    if name not in analysis.ndim:
        return "the model does not use its value"
    map_shape = tuple(node["value"].shape)
    k, batch = 2 * len(map_shape), len(map_shape) - node["fn"].event_dim
    sums, sizes = {}, {}
    for term in dependents:
        box = _term_box(analysis, model_trace.nodes[term], name, k)
        if isinstance(box, str):
            return box
        if box is None:
            if term in traced:
                return f"the analysis does not see how {term!r} depends on it"
            continue
        found = BoxSum.build(box, map_shape)
        site = model_trace.nodes[term]
        event = site["fn"].event_dim
        channels = math.prod(box.shape[box.dim() - event : -2]) if event > 2 else 1
        size = _locality(term, found, map_shape, batch, channels)
        if isinstance(size, str):
            return size
        sums[term], sizes[term] = found, size
    return Footprint(name, map_shape, sums, sizes)


def plan_footprints(
    analysis, model_trace: Trace, guide_trace: Trace, plans, dependencies, unknown: str = "",
    provenance=None,
) -> dict[str, Union[Footprint, str]]:
    """Per guide map site whose estimator splits its score per element: its
    :class:`Footprint`, or why its costs stay site-level. ``analysis``: the tracked step's
    :class:`~.sparsity.Analysis` (``None`` on an untracked step); ``dependencies``: which
    latents each ``(role, name)`` term depends on (``None``: unknown, for the reason
    ``unknown``); ``provenance``: the same from provenance alone (no escapes), which the
    boxes must explain."""
    planned: dict[str, Union[Footprint, str]] = {}
    for name in candidates(guide_trace, plans):
        option = guide_trace.nodes[name]["infer"].get("rao_blackwell", "element")
        if option == "site":
            planned[name] = "infer['rao_blackwell']='site' set on the site"
            continue
        if dependencies is None or analysis is None:
            planned[name] = unknown or "its dependencies are unknown"
            continue
        dependent = [key for key, deps in dependencies.items() if name in deps]
        others = [n for role, n in dependent if role == "guide" and n != name]
        if others:
            planned[name] = f"guide site {others[0]!r} depends on it"
            continue
        model_sites = [n for role, n in dependent if role == "model" and n != name]
        traced = {n for (role, n), deps in (provenance or {}).items()
                  if role == "model" and name in deps}  # fmt: skip
        planned[name] = footprint_from_analysis(
            analysis, model_trace, guide_trace, name, model_sites, traced
        )
    return planned


def candidates(guide_trace: Trace, plans) -> list[str]:
    """The guide map sites whose estimator splits its score per element (their
    ``infer['rao_blackwell']`` checked)."""
    found = []
    for name, plan in plans.items():
        site = guide_trace.nodes.get(name)
        if site is None or not plan.estimator.element_costs or site["fn"].event_dim < 2:
            continue
        option = site["infer"].get("rao_blackwell", "element")
        if option not in RAO_BLACKWELL:
            raise ValueError(
                f"site {name!r}: infer['rao_blackwell'] must be one of {RAO_BLACKWELL}, "
                f"got {option!r}"
            )
        found.append(name)
    return found


def cost_level(planned: Union[Footprint, str]) -> CostLevel:
    """The decision a route reports: element-level costs with the footprint, or site-level
    costs and why."""
    if isinstance(planned, Footprint):
        return CostLevel(True, f"footprint {planned.describe()}")
    return CostLevel(False, planned)


def per_element(site: dict) -> Optional[torch.Tensor]:
    """A traced site's unscaled per-element log-density: the one :func:`precompute` stored,
    else computed now (``None`` for a distribution without one)."""
    found = site.get("per_element")
    return found if found is not None else element_log_prob(site["fn"], site["value"])


def precompute(model_trace: Trace, guide_trace: Trace, footprints) -> None:
    """Compute once the per-element log-densities that element-level costs need (each
    footprint's site in the model and the guide, and its dependent maps) and fill in the
    traces' log-densities from them: Pyro's ``compute_log_prob`` / ``compute_score_parts``
    skip sites that have them, so nothing is computed twice."""
    for footprint in footprints.values():
        for trace, names in ((model_trace, [footprint.site, *footprint.sums]),
                             (guide_trace, [footprint.site])):  # fmt: skip
            for name in names:
                site = trace.nodes[name]
                if "log_prob" in site:
                    continue
                per = element_log_prob(site["fn"], site["value"])
                if per is None:
                    continue
                event = site["fn"].event_dim
                unscaled = per.sum(list(range(-event, 0)))
                log_prob = scale_and_mask(unscaled, site["scale"], site["mask"])
                site.update(per_element=per, unscaled_log_prob=unscaled, log_prob=log_prob,
                            log_prob_sum=log_prob.sum())  # fmt: skip
                if trace is guide_trace:
                    site["score_parts"] = ScoreParts(log_prob, 0.0, log_prob)


def find_footprint(model, guide, site: str, *args, **kwargs) -> Union[Footprint, str]:
    """The footprint of guide map ``site`` in ``model`` (or why its costs stay site-level),
    as a tracked step of :class:`~.elbo.RoutedELBO` finds it."""
    from .elbo import RoutedELBO  # the ELBO builds on this module

    elbo = RoutedELBO(dependency_tracking="always")
    elbo.site_terms(model, guide, *args, **kwargs)
    return elbo.last_footprints.get(site, "not a map site on a per-element estimator")
