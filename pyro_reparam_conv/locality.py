"""Element-level Rao-Blackwellization for score-function sites that are maps.

A score-function term ``grad log q(z) * (c - b)`` needs in its cost ``c`` only the terms
that depend on ``z`` (Schulman et al. 2015). For a latent map ``z`` (a site whose event is
``(C, h, w)``) with a factorized guide, the score splits over elements,
``grad log q(z) = sum_e grad log q(z_e)``, and element ``e`` needs only the terms that
depend on ``z_e``: its own ``log p(z_e) - log q(z_e)`` and, for a likelihood computed from
``z`` by convolutions, the per-pixel log-densities inside ``e``'s *footprint* (the pixels
whose value depends on ``z_e``). Every other pixel adds noise and no signal. This module
finds the footprints from the model's own computation and gives the per-element costs.

Finding a footprint (:func:`find_footprint`), once per trace structure: the model is
replayed with ``z`` as a leaf, and for a lattice of output pixels spaced wider than a
pixel's receptive field, three backward passes with independent random weights on the
lattice pixels give, for every element of ``z``, a vector of three gradients that is a
multiple of the weights of the one lattice pixel it feeds (or of none). Shifting the
lattice over every offset covers every pixel, so the table pixel -> elements is complete;
elements that feed two lattice pixels make the spacing grow. The probe is *structural*:
the networks' activation functions (ReLU, SiLU, GELU, ...) are replaced by the identity and
max-pools by average pools while probing (a dead ReLU would otherwise hide a dependency for
this draw only), and the parameters the model's terms are computed from (every leaf of
their autograd graph: modules, the param store, closures) are replaced by random values (a
weight that happens to be zero now may not be later), then restored. A footprint
that is a superset of the true one keeps the estimator unbiased; a pixel that depends on
the elements of another image (batch normalization), or on more than half of the map
(a dense layer, a normalization over space), makes the site fall back to site-level costs,
and the route says why.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Union

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .estimators import base
from .kernels import compact_normal_log_prob, unwrap_independent

__all__ = [
    "Footprint",
    "RAO_BLACKWELL",
    "per_element",
    "precompute",
    "element_log_prob",
    "find_footprint",
    "footprint_sum",
    "describe",
    "plan_footprints",
    "scaled_elements",
]

#: the values of a site's ``infer["rao_blackwell"]``: per element of its map (the default,
#: where it applies) or per element of its plates only (``"site"``)
RAO_BLACKWELL = ("element", "site")

#: the most (element, pixel) pairs a footprint table may hold before the site falls back
MAX_TABLE = 1 << 26


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


# ------------------------------------------------------------------ structural probing
# the activation functions of networks (not sigmoid, tanh, softplus or clamp, which also
# compute distributions' parameters and must keep their ranges)
_IDENTITY = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softsign, F.tanhshrink, F.threshold,
    torch.relu, torch.Tensor.relu,
}  # fmt: skip
_POOLS = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, F.max_pool3d: F.avg_pool3d}


def _to_double(value):
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float16,
                                                           torch.bfloat16):  # fmt: skip
        return value.double()
    return value


class _Structural(TorchFunctionMode):
    """Activation functions become the identity and max-pools average pools: the same
    dependency structure, without derivatives that vanish for some inputs only. Every op
    computes in float64, so that no sum that nearly cancels blurs which pixel a gradient
    comes from (the gradient reaching the float32 leaf is rounded once, at the end)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args, kwargs = tree_map(_to_double, (args, kwargs))
        if func in _IDENTITY:
            return args[0]
        if func in _POOLS and not kwargs.get("dilation", 1) not in (1, (1, 1), (1, 1, 1)):
            names = ("kernel_size", "stride", "padding")
            options = {n: kwargs[n] for n in names if n in kwargs}
            options.update(zip(names, args[1:4]))
            return _POOLS[func](args[0], **options)
        return func(*args, **kwargs)


def _leaves(outputs, exclude: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors that require grad in the autograd graph of ``outputs`` (the
    parameters a computation used: of modules, the param store or closures), but ``exclude``."""
    found: dict[int, torch.Tensor] = {}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor) and variable is not exclude:
            found[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


@contextmanager
def _random_parameters(tensors) -> Iterator[None]:
    """Random values in ``tensors`` (leaf parameters) for the block, through ``.data``: the
    version counters that autograd checks stay as they are, and the values come back after."""
    saved = [(p, p.data) for p in tensors]
    generator = torch.Generator().manual_seed(0)
    try:
        for p, data in saved:
            p.data = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
        yield
    finally:
        for p, data in saved:
            p.data = data


# -------------------------------------------------------------------------- footprints
@dataclass(frozen=True)
class Footprint:
    """Which pixels of each dependent map depend on which position of the site's map.

    ``tables[t]``: a sparse ``(h * w, H_t * W_t)`` 0/1 matrix for model site ``t``
    (positions of ``z``; pixels of ``t``, channels summed); ``sizes[t]``: the largest number
    of pixels one position feeds, and ``H_t * W_t``.
    """

    site: str
    map_shape: tuple[int, int]
    tables: Mapping[str, torch.Tensor]
    sizes: Mapping[str, tuple[int, int]]

    def describe(self) -> str:
        return ", ".join(f"<= {k} of {n} pixels of {t!r}" for t, (k, n) in self.sizes.items())


def _grids(trace: Trace, dependents) -> Union[dict[str, torch.Tensor], str]:
    """Per dependent model site, its per-element log-density summed over channels: shape
    (batch..., H, W)."""
    grids = {}
    for name in dependents:
        site = trace.nodes[name]
        per = element_log_prob(site["fn"], site["value"])
        event = site["fn"].event_dim
        if per is None or event < 2:
            return f"{name!r} has no per-pixel log-density over a map (event dims >= 2)"
        grids[name] = per.sum(list(range(-event, -2))) if event > 2 else per
    return grids


class _NotFinite(ValueError):
    """A probe's gradient was NaN or infinite: nothing can be read from it."""


def _probe(grid, z, weights) -> torch.Tensor:
    grad = torch.autograd.grad((grid * weights).sum(), z, retain_graph=True)[0]
    if not bool(torch.isfinite(grad).all()):
        raise _NotFinite
    return grad


def _footprint_of(grid: torch.Tensor, z: torch.Tensor, name: str):
    """The sparse position -> pixel table of one dependent map (or why there is none)."""
    n = grid[..., 0, 0].numel()
    grid = grid.reshape(n, *grid.shape[-2:])
    big_h, big_w = grid.shape[-2:]
    h, w = z.shape[-2:]
    zs = z.reshape(n, -1, h, w) if z[..., 0, 0, 0].numel() == n else None
    if zs is None:
        return f"{name!r} has other batch dims than the site"
    # one pixel in the middle of the first image: its receptive field
    center = torch.zeros_like(grid)
    center[0, big_h // 2, big_w // 2] = 1.0
    field = _probe(grid, z, center).reshape(n, -1, h, w) != 0
    if field[1:].any():
        return f"a pixel of {name!r} depends on other elements of the plate (batch norm?)"
    positions = field[0].any(0)
    if positions.sum() * 2 > h * w:
        return (
            f"not local: a pixel of {name!r} depends on {int(positions.sum())} of {h * w} "
            "positions (a dense layer or a normalization over the map?)"
        )
    rows, cols = positions.nonzero(as_tuple=True)
    spacing = [
        max(1, math.ceil((int(extent.max() - extent.min()) + 2) * big / small))
        for extent, big, small in ((rows, big_h, h), (cols, big_w, w))
    ]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # grow the spacing until every element feeds one lattice pixel
        found = _attribute(grid, z, n, h, w, spacing, generator)
        if found is not None:
            break
        spacing = [2 * s for s in spacing]
    else:
        return f"could not attribute the pixels of {name!r} to positions of the site"
    if found.shape[0] * found.shape[1] > MAX_TABLE:
        return f"footprint table of {found.numel()} entries is too large"
    sizes = (int(found.sum(1).max()), big_h * big_w)
    return found.to(grid.dtype).to_sparse(), sizes


def _attribute(grid, z, n, h, w, spacing, generator) -> Optional[torch.Tensor]:
    """Dense (h * w, H * W) bool table from lattice probes; ``None`` when some element
    feeds two pixels of one lattice (the spacing is too small)."""
    big_h, big_w = grid.shape[-2:]
    table = torch.zeros(h * w, big_h * big_w, dtype=torch.bool)
    for a in range(min(spacing[0], big_h)):
        for b in range(min(spacing[1], big_w)):
            lattice = torch.zeros(big_h, big_w, dtype=torch.bool)
            lattice[a :: spacing[0], b :: spacing[1]] = True
            pixels = lattice.nonzero().T  # (2, L)
            weights = torch.rand((3, n, pixels.shape[1]), generator=generator) + 0.5
            grads = []
            for k in range(3):
                u = torch.zeros(n, big_h, big_w, dtype=grid.dtype)
                u[:, pixels[0], pixels[1]] = weights[k].to(grid.dtype)
                grads.append(_probe(grid, z, u.to(grid.device)).reshape(n, -1, h * w).cpu())
            g = torch.stack(grads, -1).double()  # (n, C, h * w, 3)
            norm = g.norm(dim=-1)
            hit = norm > 0
            if not hit.any():
                continue
            unit = g / norm.clamp_min(1e-300).unsqueeze(-1)
            sig = weights.double().permute(1, 2, 0)  # (n, L, 3)
            sig = sig / sig.norm(dim=-1, keepdim=True)
            # |cosine| of each element's gradient vector with each lattice pixel's weights:
            # 1 for the one pixel it feeds (the sign is that of the derivative)
            cosine = torch.einsum("ncpk,nlk->ncpl", unit, sig).abs()
            best, which = cosine.max(-1)
            if bool((best[hit] < 1 - 1e-6).any()):
                return None  # a mixture of several lattice pixels
            _, _, position = hit.nonzero(as_tuple=True)
            pixel = which[hit]
            flat = pixels[0][pixel] * big_w + pixels[1][pixel]
            table[position, flat] = True
    return table


def find_footprint(
    model, args, kwargs, guide_trace: Trace, site: str, dependents
) -> Union[Footprint, str]:
    """The footprints of latent map ``site`` in the model sites ``dependents``, or why they
    cannot be used (the caller then keeps site-level costs)."""
    node = guide_trace.nodes[site]
    if node["fn"].event_dim < 2:
        return "not a map (fewer than 2 event dims)"
    if element_log_prob(node["fn"], node["value"]) is None:
        return "its guide distribution has no per-element log-density"
    z = node["value"].detach().clone().requires_grad_()
    branch = guide_trace.copy()
    branch.nodes[site] = {**node, "value": z}

    def replayed_grids():
        replay = poutine.replay(model, trace=branch)
        return _grids(poutine.trace(replay).get_trace(*args, **kwargs), dependents)

    tables, sizes = {}, {}
    with torch.enable_grad(), pyro.validation_enabled(False):
        with _Structural():
            grids = replayed_grids()  # a first pass finds the parameters the map's terms use
        if isinstance(grids, str):
            return grids
        with _random_parameters(_leaves(list(grids.values()), z)):
            with _Structural():
                grids = replayed_grids()
            for name, grid in grids.items():  # probed outside the mode, on the same graph
                try:
                    found = _footprint_of(grid, z, name)
                except _NotFinite:
                    return f"the probe of {name!r} was not finite"
                if isinstance(found, str):
                    return found
                tables[name], sizes[name] = found
    return Footprint(site, tuple(z.shape[-2:]), tables, sizes)


# ------------------------------------------------------------------------ element costs
def footprint_sum(table: torch.Tensor, grid: torch.Tensor, map_shape) -> torch.Tensor:
    """Per position of the site's ``(h, w)`` map, the sum of ``grid`` (lead..., H, W) over
    the position's footprint (``table``: positions x pixels): shape (lead..., 1, h, w)."""
    lead, (big_h, big_w) = grid.shape[:-2], grid.shape[-2:]
    pixels = grid.reshape(-1, big_h * big_w).T.to(table.dtype)  # (H * W, n)
    summed = (table @ pixels).T  # (n, h * w)
    return summed.reshape(*lead, 1, *map_shape).to(grid.dtype)


def plan_footprints(
    model, args, kwargs, guide_trace: Trace, routes, dependencies, unknown: str = ""
) -> dict[str, Union[Footprint, str]]:
    """Per guide map site whose estimator splits its score per element: its
    :class:`Footprint`, or why its costs stay site-level. ``dependencies``: which latents each
    ``(role, name)`` term depends on (``None``: unknown, for the reason ``unknown``)."""
    planned: dict[str, Union[Footprint, str]] = {}
    for name, route in routes.items():
        site = guide_trace.nodes[name]
        if not base.get(route.estimator).element_costs or site["fn"].event_dim < 2:
            continue
        option = site["infer"].get("rao_blackwell", "element")
        if option not in RAO_BLACKWELL:
            raise ValueError(
                f"site {name!r}: infer['rao_blackwell'] must be one of {RAO_BLACKWELL}, "
                f"got {option!r}"
            )
        if option == "site":
            planned[name] = "infer['rao_blackwell']='site' set on the site"
            continue
        if dependencies is None:
            planned[name] = unknown or "its dependencies are unknown"
            continue
        dependent = [key for key, deps in dependencies.items() if name in deps]
        others = [n for role, n in dependent if role == "guide" and n != name]
        if others:
            planned[name] = f"guide site {others[0]!r} depends on it"
            continue
        model_sites = [n for role, n in dependent if role == "model" and n != name]
        planned[name] = find_footprint(model, args, kwargs, guide_trace, name, model_sites)
    return planned


def describe(planned: Union[Footprint, str]) -> str:
    """The part of a route's reason that says which costs the site's score function gets."""
    if isinstance(planned, Footprint):
        return f"element-level costs: footprint {planned.describe()}"
    return f"site-level costs: {planned}"


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
        for trace, names in ((model_trace, [footprint.site, *footprint.tables]),
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
