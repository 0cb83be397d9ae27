"""Fast kernels of the ELBO's fast path, each beside the plain reference it must equal.

The fast path (``RoutedELBO(fast_path=True)``, the default) computes the same values and
gradients as Pyro's own functions, with fewer passes over large tensors:

- :func:`fast_log_densities` (reference :func:`reference_log_densities`, which is Pyro's
  ``compute_log_prob`` and ``compute_score_parts``): no log-densities for analytic-KL sites
  that nothing reads, and, without validation, Normal likelihoods with one broadcast scale
  summed in one pass (:func:`compact_normal_log_prob`, :func:`squared_distance_sum`);
- :func:`analytic_kl` (reference :func:`reference_kl`, torch's ``kl_divergence``):
  ``Normal || Normal`` on the compact parameters, so a broadcast prior such as
  ``Normal(0, 1).expand(shape)`` is never materialized;
- :func:`normal_kl_sum` (reference: ``kl_divergence(q, p).sum()``): the summed
  ``Normal || Normal`` KL against a one-value prior in few passes, with a three-pass
  backward.

:data:`FAST` and :data:`REFERENCE` bundle them (:class:`Kernels`); ``RoutedELBO.kernels``
selects the set its fast path uses, and ``benchmarks/seed_workload.py`` times both side by
side. The tests check each kernel against its reference: values, gradients and second
derivatives (the custom backward passes fall back to the plain expression under
``create_graph``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.ops.provenance import extract_provenance
from pyro.poutine import Trace
from pyro.util import check_site_shape
from torch.distributions import Distribution

from .distributions import is_plain_normal, unwrap_independent

__all__ = [
    "FAST",
    "REFERENCE",
    "Kernels",
    "analytic_kl",
    "compact_normal_log_prob",
    "fast_log_densities",
    "normal_kl_sum",
    "reference_kl",
    "reference_log_densities",
    "squared_distance_sum",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """The smallest view of ``t`` that broadcasts back to it (drops stride-0 expanded dims)."""
    strides = t.stride()
    if strides and not any(strides) and not t.requires_grad:
        return t.as_strided((1,) * len(strides), strides)  # one value, e.g. Normal(0, 1).expand
    for dim, (stride, size) in enumerate(zip(t.stride(), t.shape)):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


def normal_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """``KL(Normal(q_loc, q_scale) || Normal(p_loc, p_scale))`` elementwise, broadcasting."""
    p_loc, p_scale = _compact(p_loc), _compact(p_scale)
    var_ratio = (q_scale / p_scale).pow(2)
    t1 = ((q_loc - p_loc) / p_scale).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def _plain(*tensors) -> bool:
    """No tensor subclass (e.g. a provenance-tracking one) among ``tensors``."""
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


class _SquaredDistanceSum(torch.autograd.Function):
    """``((a - b) ** 2).sum(last ndims)`` with a one-pass backward, ``2 (a - b) g``
    (autograd's square backward takes three passes over the full tensor). Under
    ``create_graph`` the backward is differentiated through the plain expression."""

    @staticmethod
    def forward(ctx, a, b, ndims):
        diff = a - b
        ctx.ndims = ndims
        ctx.save_for_backward(a, b)
        ctx.diff = diff
        return diff.square().sum(list(range(-ndims, 0)))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = grad.reshape(grad.shape + (1,) * ctx.ndims)
        if torch.is_grad_enabled():  # create_graph: keep the backward differentiable
            grad_a = 2 * (a - b) * g
        else:
            grad_a = ctx.diff * (2 * g)
        grad_b = -grad_a if ctx.needs_input_grad[1] else None
        return (grad_a if ctx.needs_input_grad[0] else None), grad_b, None


def squared_distance_sum(a: torch.Tensor, b: torch.Tensor, ndims: int) -> torch.Tensor:
    """``((a - b) ** 2).sum(dims)`` over the last ``ndims`` dims (``a``, ``b`` of one shape)."""
    if _plain(a, b) and (a.requires_grad or b.requires_grad):
        return _SquaredDistanceSum.apply(a, b, ndims)
    return (a - b).square().sum(list(range(-ndims, 0)))


def compact_normal_log_prob(fn: Distribution, value: torch.Tensor) -> Optional[torch.Tensor]:
    """``fn.log_prob(value)`` for an (``Independent``) ``Normal`` whose loc or scale is an
    expanded view (e.g. ``Normal(out, 1.0)``), computed on the compact parameters so the
    scale's log and square are not taken elementwise over the full shape. ``None`` for any
    other distribution (the caller then uses ``fn.log_prob``). No argument validation.
    """
    base, ndims = unwrap_independent(fn)
    if not is_plain_normal(base):
        return None
    if isinstance(base.loc, (int, float)) or isinstance(base.scale, (int, float)):
        return None
    loc, scale = _compact(base.loc), _compact(base.scale)
    if loc.numel() == base.loc.numel() and scale.numel() == base.scale.numel():
        return None  # nothing to save
    full = fn.batch_shape + fn.event_shape
    if ndims and scale.numel() == 1 and loc.shape == full and value.shape == full:
        # one scale for every element (e.g. Normal(out, 1.0).to_event(3)): sum the squared
        # residuals over the event dims first and scale the (batch-shaped) sum, so the full
        # tensor sees one subtraction, one square and one reduction, as hand-written code
        # does ((loc - value)^2 is bitwise (value - loc)^2, and its gradient reaches loc
        # without a negation).
        scale = scale.reshape(())
        n = math.prod(full[-ndims:])
        sq = squared_distance_sum(loc, value, ndims)
        return sq * (-0.5 / scale.square()) - n * (scale.log() + _HALF_LOG_2PI)
    log_p = -((value - loc) ** 2) / (2 * scale**2) - scale.log() - _HALF_LOG_2PI
    if log_p.shape != full:
        log_p = log_p.expand(torch.broadcast_shapes(log_p.shape, full))
    return log_p.sum(list(range(-ndims, 0))) if ndims else log_p


def _check_kl_shapes(q: Distribution, p: Distribution) -> None:
    """``ValueError`` when the event shapes differ or ``p``'s batch shape does not broadcast
    to ``q``'s (the KL of a site then has no meaning as the site's term)."""
    if q.event_shape != p.event_shape:
        raise ValueError(f"event shapes differ: {tuple(q.event_shape)} vs {tuple(p.event_shape)}")
    try:
        shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    except RuntimeError:
        shape = None
    if shape != q.batch_shape:
        raise ValueError(
            f"prior batch shape {tuple(p.batch_shape)} does not broadcast to the guide's "
            f"{tuple(q.batch_shape)}"
        )


def reference_kl(q: Distribution, p: Distribution) -> torch.Tensor:
    """``kl_divergence(q, p)`` (Pyro's registrations) with shape ``q.batch_shape``.

    Raises ``NotImplementedError`` when no closed form is registered, and ``ValueError``
    when the event shapes differ or ``p``'s batch shape does not broadcast to ``q``'s.
    """
    _check_kl_shapes(q, p)
    kl = kl_divergence(q, p)
    return kl if kl.shape == q.batch_shape else kl.expand(q.batch_shape)


def analytic_kl(q: Distribution, p: Distribution) -> torch.Tensor:
    """:func:`reference_kl`, with ``Normal || Normal`` (under ``Independent``) computed on the
    compact parameters: a broadcast prior is never materialized."""
    _check_kl_shapes(q, p)
    q_base, q_nd = unwrap_independent(q)
    p_base, p_nd = unwrap_independent(p)
    if is_plain_normal(q_base) and is_plain_normal(p_base) and q_nd == p_nd:
        kl = normal_kl(q_base.loc, q_base.scale, p_base.loc, p_base.scale)
        full = q.batch_shape + q.event_shape
        if kl.shape != full:
            kl = kl.expand(full)
        return kl.sum(list(range(-q_nd, 0))) if q_nd else kl
    return reference_kl(q, p)


def _is_constant(t: torch.Tensor, value: float) -> bool:
    """Whether the one-element ``t`` is the constant ``value`` (checked on CPU only, where
    reading it costs no device synchronization)."""
    return t.device.type == "cpu" and not t.requires_grad and t.item() == value


def normal_kl_sum(q: Distribution, p: Distribution) -> Optional[torch.Tensor]:
    """``analytic_kl(q, p).sum()`` for (``Independent``) ``Normal`` ``q`` and a ``p`` whose
    loc and scale are each one value broadcast (e.g. ``Normal(0, 1).expand(shape)``), in few
    passes over ``q``'s parameters:

        sum KL = 1/2 sum (r^2 - 1) - sum log r + 1/(2 p_scale^2) sum (q_loc - p_loc)^2,

    ``r = q_scale / p_scale`` (the division and subtraction are skipped for a standard
    normal prior). ``None`` where this does not apply (the caller then sums :func:`analytic_kl`).
    """
    q_base, q_nd = unwrap_independent(q)
    p_base, p_nd = unwrap_independent(p)
    if q_nd != p_nd or not (is_plain_normal(q_base) and is_plain_normal(p_base)):
        return None
    if q.event_shape != p.event_shape:
        return None  # analytic_kl raises the error
    q_shape, p_shape = q.batch_shape, p.batch_shape
    if len(p_shape) > len(q_shape) or any(
        n != m and n != 1 for n, m in zip(reversed(p_shape), reversed(q_shape))
    ):
        return None  # p's batch shape does not broadcast to q's: analytic_kl raises
    p_loc = extract_provenance(_compact(p_base.loc))[0]
    p_scale = extract_provenance(_compact(p_base.scale))[0]
    if p_loc.numel() != 1 or p_scale.numel() != 1:
        return None
    q_loc = extract_provenance(q_base.loc)[0]
    q_scale = extract_provenance(q_base.scale)[0]
    if q_loc.shape != q.batch_shape + q.event_shape or q_scale.shape != q_loc.shape:
        return None
    p_loc, p_scale = p_loc.reshape(()), p_scale.reshape(())
    zero_loc, unit_scale = _is_constant(p_loc, 0.0), _is_constant(p_scale, 1.0)
    if _plain(q_loc, q_scale) and not (p_loc.requires_grad or p_scale.requires_grad):
        return _ScalarPriorNormalKLSum.apply(q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale)
    return _scalar_prior_kl_sum(q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale)


def _scalar_prior_kl_parts(q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale):
    """The KL sum and the intermediates its backward reuses: ``(sum, d, r, r^2 - 1)``."""
    r = q_scale if unit_scale else q_scale / p_scale
    d = q_loc if zero_loc else q_loc - p_loc
    a = torch.addcmul(r.new_full((), -1.0), r, r)  # r^2 - 1
    loc_term = d.square().sum()
    if not unit_scale:
        loc_term = loc_term / p_scale.square()
    return 0.5 * (a.sum() + loc_term) - r.log().sum(), d, r, a


def _scalar_prior_kl_sum(q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale):
    return _scalar_prior_kl_parts(q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale)[0]


class _ScalarPriorNormalKLSum(torch.autograd.Function):
    """:func:`_scalar_prior_kl_sum` (constant prior parameters) with a three-pass backward:
    ``d/d q_loc = (q_loc - p_loc) / p_scale^2``, ``d/d q_scale = (r^2 - 1) / (r p_scale)``
    (``r^2 - 1`` kept from the forward). Under ``create_graph`` the backward is
    differentiated through the plain expression."""

    @staticmethod
    def forward(ctx, q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale):
        value, *intermediates = _scalar_prior_kl_parts(
            q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale
        )
        ctx.save_for_backward(q_loc, q_scale, p_loc, p_scale)
        ctx.flags = zero_loc, unit_scale
        ctx.intermediates = tuple(intermediates)
        return value

    @staticmethod
    def backward(ctx, grad):
        q_loc, q_scale, p_loc, p_scale = ctx.saved_tensors
        zero_loc, unit_scale = ctx.flags
        d, r, a = ctx.intermediates
        grad_loc = grad_scale = None
        if torch.is_grad_enabled():  # create_graph: keep the backward differentiable
            with torch.enable_grad():
                value = _scalar_prior_kl_sum(q_loc, q_scale, p_loc, p_scale, zero_loc, unit_scale)
            inputs = [t for t, need in zip((q_loc, q_scale), ctx.needs_input_grad) if need]
            grads = iter(torch.autograd.grad(value, inputs, grad, create_graph=True))
            grad_loc = next(grads) if ctx.needs_input_grad[0] else None
            grad_scale = next(grads) if ctx.needs_input_grad[1] else None
            return grad_loc, grad_scale, None, None, None, None
        if ctx.needs_input_grad[0]:
            grad_loc = d * (grad if unit_scale else grad / p_scale.square())
        if ctx.needs_input_grad[1]:
            grad_scale = (a / r).mul_(grad if unit_scale else grad / p_scale)
        return grad_loc, grad_scale, None, None, None, None


# ------------------------------------------------------------------- log-densities
def _compact_normal_log_probs(trace: Trace, skip: frozenset) -> None:
    """Memoize Normal log-densities with broadcast (expanded) parameters, computed on the
    compact parameters (``Trace.compute_log_prob`` then leaves those sites alone)."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in skip or "log_prob" in site:
            continue
        if site["args"] or site["kwargs"]:
            continue
        log_p = compact_normal_log_prob(site["fn"], site["value"])
        if log_p is None:
            continue
        site["unscaled_log_prob"] = log_p
        log_p = scale_and_mask(log_p, site["scale"], site["mask"])
        site["log_prob"] = log_p
        site["log_prob_sum"] = log_p.sum()


def _check_shapes(traces, max_plate_nesting: float) -> None:
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "sample" and "log_prob" in site:
                check_site_shape(site, max_plate_nesting)


def reference_log_densities(
    model_trace: Trace, guide_trace: Trace, skip: frozenset, max_plate_nesting: float
) -> None:
    """What :func:`pyro.infer.enum.get_importance_trace` computes once it has the traces:
    every model log-density, every guide site's score parts, site shapes checked under
    validation (``skip`` is ignored: everything is computed)."""
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    if is_validation_enabled():
        _check_shapes((model_trace, guide_trace), max_plate_nesting)


def fast_log_densities(
    model_trace: Trace, guide_trace: Trace, skip: frozenset, max_plate_nesting: float
) -> None:
    """:func:`reference_log_densities` without the sites in ``skip`` (analytic-KL sites whose
    log-densities nothing reads), and, without validation, Normal likelihoods with broadcast
    parameters summed on their compact parameters (:func:`compact_normal_log_prob`, which
    does not validate its arguments)."""
    validate = is_validation_enabled()
    if not validate:
        _compact_normal_log_probs(model_trace, skip)
    model_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
    if skip:  # Pyro's compute_score_parts on a view of the trace without those sites
        view = Trace(graph_type=guide_trace.graph_type)
        view.nodes = OrderedDict((n, s) for n, s in guide_trace.nodes.items() if n not in skip)
        view.compute_score_parts()
    else:
        guide_trace.compute_score_parts()
    if validate:
        _check_shapes((model_trace, guide_trace), max_plate_nesting)


# ------------------------------------------------------------------------- bundles
@dataclass(frozen=True)
class Kernels:
    """The functions the ELBO computes log-densities and KL terms with.

    ``log_densities(model_trace, guide_trace, skip, max_plate_nesting)`` fills in the
    traces' log-densities and score parts; ``kl(q, p)`` is ``KL(q || p)`` with shape
    ``q.batch_shape``; ``kl_sum(q, p)`` its sum, or ``None`` where it has no shortcut.
    """

    log_densities: Callable[[Trace, Trace, frozenset, float], None]
    kl: Callable[[Distribution, Distribution], torch.Tensor]
    kl_sum: Callable[[Distribution, Distribution], Optional[torch.Tensor]]


#: the fast kernels (the default of ``RoutedELBO(fast_path=True)``)
FAST = Kernels(fast_log_densities, analytic_kl, normal_kl_sum)
#: Pyro's and torch's own functions, which the fast kernels must equal
REFERENCE = Kernels(reference_log_densities, reference_kl, lambda q, p: None)
