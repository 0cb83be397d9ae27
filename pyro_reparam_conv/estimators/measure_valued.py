"""The measure-valued gradient of Gaussian sites: unbiased for any integrable cost.

For ``z ~ N(mu, sigma^2)`` elementwise and a cost ``f`` that need not be differentiable (a
step, a threshold, a rounding, an ``argmax``), the derivative of the Gaussian density in
each parameter is a difference of two probability densities times a constant, so the
derivative of ``E[f(z)]`` is a difference of two expectations (Mohamed, Rosca, Figurnov &
Mnih 2020, "Monte Carlo Gradient Estimation in Machine Learning", JMLR 21, section 6 and
table 1; Pflug 1989 for weak derivatives). Per element ``i``, the other elements held at
the draw ``z`` (``z[i := v]``: ``z`` with element ``i`` set to ``v``):

    d/d mu_i    E[f] = E[f(z[i := mu_i + sigma_i W]) - f(z[i := mu_i - sigma_i W'])]
                       / (sigma_i sqrt(2 pi))
    d/d sigma_i E[f] = E[f(z[i := mu_i + sigma_i M]) - f(z[i := mu_i + sigma_i X])] / sigma_i

with ``W, W'`` Weibull with scale ``sqrt 2`` and concentration 2 (a Rayleigh(1) variable:
``d N(x | mu, sigma) / d mu = (x - mu) / sigma^2 N(x | mu, sigma)`` is ``1 / (sigma sqrt(2
pi))`` times the difference of the Rayleigh densities on either side of ``mu``; the
paper's code draws ``weibull_min(scale=sqrt 2, concentration=2)``), ``M`` standard
double-sided Maxwell (density ``m^2 phi(m)``: ``d N / d sigma = (1 / sigma) (((x - mu) /
sigma)^2 - 1) N``) and ``X`` standard normal. ``tests/test_measure_valued.py`` checks every
constant against quadrature.

Coupling (common random numbers: the paper's variance-reduction section and the
measure-valued code of its ``mc_gradients`` repository; ``infer={"coupled": True}``, the
default): ``W' = W``, and ``X = U M`` with ``U`` uniform on
``(0, 1)`` (Khintchine: a symmetric unimodal density is a scale mixture of uniforms, and
``U M ~ N(0, 1)``). Here ``X`` is the draw's own noise ``eps`` (``z_i = mu_i + sigma_i
eps_i``), and ``M`` is drawn from its law given ``U M = eps``, ``M = sign(eps)
sqrt(eps^2 + 2 E)`` with ``E ~ Exp(1)``: the pair ``(M, eps)`` has the paper's joint law,
and ``f(z)`` itself is the minus term, so no evaluation is spent on it. Uncoupled
(``"coupled": False``): ``W, W'`` independent, and ``M`` independent of ``eps`` (the same
formula with a fresh normal in place of ``eps``; ``eps`` is still an independent normal).

Evaluations, side by side along the site's evaluation dim (as enumeration and DisARM lay
out theirs): 0 is the draw ``z`` (the ELBO's value and every other site's gradient use it
alone: weights one-hot on it), then for each of the ``n`` elements of the event ``mu +
sigma W``, ``mu - sigma W'``, ``mu + sigma M`` in that element, all elements at once (a
batch dim, no loop): ``1 + 3 n`` evaluations of everything that depends on the site. The
elements of the site's plates are perturbed side by side in each evaluation, so a plate
costs nothing extra; this needs each term that depends on the site to lie inside its
plates (the local weights check it, as for enumeration) and every batch dim of the site to
be a plate (a batch dim no plate declares is summed in the cost: it is refused, pointing to
``.to_event``). ``f`` is the site's Rao-Blackwellized cost per evaluation and plate
element, its own ``log p - log q`` included with the parameters held fixed (the direct
gradient of ``-log q`` at a fixed value has mean zero, as for the score function and
DisARM). The surrogate term is ``stop_grad(g_mu) mu + stop_grad(g_sigma) sigma``.

Never chosen automatically (it costs ``1 + 3 n`` evaluations); the route's reason says how
many and whether coupled. Sites of more than ``max_evaluations`` evaluations (default
:data:`MAX_EVALUATIONS`, about 333 elements) are refused with the count, unless the site
passes a larger ``infer={"max_evaluations": N}``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pyro.distributions import Independent
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import ExpandedDistribution

from ..distributions import distribution_name, is_plain_normal
from .base import Estimator, Layout, register

__all__ = [
    "MAX_EVALUATIONS",
    "MeasureValuedEstimator",
    "maxwell_given_normal",
    "rayleigh",
]

#: the most evaluations side by side a site gets without passing its own limit
MAX_EVALUATIONS = 1000

_SQRT_2PI = math.sqrt(2 * math.pi)


def _normal(fn):
    """The Normal inside ``fn`` (through ``Independent`` and ``.expand``), or ``None``."""
    while isinstance(fn, (Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return fn if is_plain_normal(fn) else None


def rayleigh(shape, like: torch.Tensor) -> torch.Tensor:
    """Draws of ``Weibull(scale=sqrt 2, concentration=2)``, the Rayleigh(1) law:
    ``sqrt(2 E)`` with ``E ~ Exp(1)``."""
    return (2 * torch.empty(shape, dtype=like.dtype, device=like.device).exponential_()).sqrt()


def maxwell_given_normal(eps: torch.Tensor) -> torch.Tensor:
    """``M`` given ``U M = eps`` for ``M`` standard double-sided Maxwell and ``U ~ U(0, 1)``
    independent: ``sign(eps) sqrt(eps^2 + 2 E)``, ``E ~ Exp(1)`` (``P(|M| > t | eps) =
    exp(-(t^2 - eps^2) / 2)`` for ``t > |eps|``). For ``eps ~ N(0, 1)``, ``M`` is double-sided
    Maxwell and ``(M, eps)`` has the law of ``(M, U M)``."""
    e = torch.empty_like(eps).exponential_()
    sign = torch.where(eps < 0, -1.0, 1.0).to(eps.dtype)
    return sign * (eps.square() + 2 * e).sqrt()


def _coupled(infer: dict) -> bool:
    coupled = infer.get("coupled", True)
    if not isinstance(coupled, bool):
        raise ValueError(f"infer['coupled'] must be True or False, got {coupled!r}")
    return coupled


def _limit(infer: dict) -> int:
    limit = infer.get("max_evaluations", MAX_EVALUATIONS)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 4:
        raise ValueError(f"infer['max_evaluations'] must be an int >= 4, got {limit!r}")
    return limit


class Perturbations(Layout):
    """The draw, then per element of the event its mean +, mean - and scale perturbations:
    ``1 + 3 n`` values side by side, the ELBO's value the draw's alone."""

    local_weights = True  # plate elements are perturbed side by side: terms must be local

    def evaluations(self, fn) -> int:
        return 1 + 3 * fn.event_shape.numel()

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        fn, name = msg["fn"], msg["name"]
        _check_batch_dims(name, fn, msg["cond_indep_stack"], dim)
        normal, shape, event = _normal(fn), fn.shape(), fn.event_shape
        loc = normal.loc.detach().expand(shape)
        scale = normal.scale.detach().expand(shape)
        eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
        w_plus = rayleigh(shape, loc)
        if _coupled(msg["infer"]):
            w_minus, maxwell = w_plus, maxwell_given_normal(eps)
        else:
            w_minus = rayleigh(shape, loc)
            maxwell = maxwell_given_normal(torch.randn_like(eps))
        z = loc + scale * eps
        n = event.numel()
        one = torch.eye(n, dtype=torch.bool, device=loc.device)
        one = one.reshape((n,) + (1,) * len(fn.batch_shape) + tuple(event))
        values = [z.unsqueeze(0)]
        values += [torch.where(one, loc + scale * x, z) for x in (w_plus, -w_minus, maxwell)]
        values = torch.cat(values)
        pad = (1,) * (-1 - dim - len(fn.batch_shape))
        msg["value"] = values.reshape((values.shape[0],) + pad + tuple(shape))

    def weights(self, site: dict, dim: int) -> torch.Tensor:
        value, event_dim = site["value"], site["fn"].event_dim
        size = value.shape[dim - event_dim]
        shape = [1] * (-dim)
        shape[0] = size
        for frame in site["cond_indep_stack"]:  # per plate element: the local check sees it
            if frame.vectorized:
                shape[frame.dim] = value.shape[frame.dim - event_dim]
        weight = torch.zeros(size, dtype=value.dtype, device=value.device)
        weight[0] = 1.0  # the ELBO's value is the draw's alone
        return weight.reshape((size,) + (1,) * (-dim - 1)).expand(shape)


class MeasureValuedEstimator(Estimator):
    """Weibull and double-sided Maxwell perturbations per element, ``1 + 3 n`` evaluations."""

    name = "measure_valued"
    automatic = False  # it costs 1 + 3 n evaluations: only where asked
    layout = Perturbations()

    def why_not(self, fn) -> Optional[str]:
        if _normal(fn) is None:
            return f"{distribution_name(fn)} is not a Normal"
        return None

    def too_many(self, fn, infer: dict) -> Optional[str]:
        """Why a site of distribution ``fn`` with ``infer`` is refused (too many evaluations
        for its ``max_evaluations``), or ``None``."""
        count, limit = self.layout.evaluations(fn), _limit(infer)
        if count <= limit:
            return None
        n = fn.event_shape.numel()
        return (
            f"measure_valued would evaluate everything that depends on it {count} times side by "
            f"side (1 + 3 per element x {n} elements of its event {tuple(fn.event_shape)}), more "
            f"than max_evaluations={limit}; pass infer={{'estimator': 'measure_valued', "
            f"'max_evaluations': {count}}} to allow it, or route the site to 'score'"
        )

    def note(self, fn, infer: dict) -> str:
        coupled = _coupled(infer)
        refused = self.too_many(fn, infer)
        if refused:
            raise ValueError(refused)
        n = fn.event_shape.numel()
        how = "coupled (common random numbers)" if coupled else "uncoupled"
        elements = f"{n} element" + ("s" if n != 1 else "")
        count = self.layout.evaluations(fn)
        return (
            f"{count} evaluations side by side (the draw, then 3 per element x "
            f"{elements}: mean +, mean -, scale), {how}, unbiased for any cost"
        )

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], 0.0, 0.0)  # all of its gradient: the surrogate

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        fn = site["fn"]
        normal, shape, event = _normal(fn), fn.shape(), fn.event_shape
        n = event.numel()
        cost = cost.movedim(dim, 0)
        if cost.shape[0] != 1 + 3 * n:
            raise ValueError(
                f"site {site['name']!r}: measure_valued expected {1 + 3 * n} evaluations, the "
                f"cost has {cost.shape[0]}"
            )
        rest = cost.shape[1:]

        def per_element(block):  # (n, *rest) -> (*rest, *event): entry i of the event
            return block.movedim(0, -1).reshape(rest + event)

        base = cost[0].reshape(rest + (1,) * len(event))
        plus, minus, maxwell = (per_element(cost[1 + k * n : 1 + (k + 1) * n]) for k in range(3))
        loc, scale = normal.loc.expand(shape), normal.scale.expand(shape)
        sigma = scale.detach()
        g_loc = (plus - minus) / (sigma * _SQRT_2PI)  # d E[cost] / d loc, per element
        g_scale = (maxwell - base) / sigma  # d E[cost] / d scale
        term = g_loc.detach() * loc + g_scale.detach() * scale
        return term.sum(list(range(-len(event), 0))) if len(event) else term


def _check_batch_dims(name: str, fn, stack, dim: int) -> None:
    """Every batch dim of the site must be one of its plates, or lie left of all of them
    (another site's evaluation dim, as Pyro's shape check requires under enumeration)."""
    batch = fn.batch_shape
    if len(batch) >= -dim:
        raise ValueError(
            f"site {name!r}: its batch shape {tuple(batch)} reaches its evaluation dim {dim}; "
            "declare its batch dims with pyro.plate (and max_plate_nesting) or move them into "
            "the event with .to_event(...)"
        )
    plates = {f.dim for f in stack if f.vectorized}
    leftmost = min(plates, default=0)
    for d in range(-len(batch), 0):
        if leftmost <= d and d not in plates and batch[d] > 1:
            raise ValueError(
                f"site {name!r}: batch dim {d} (size {batch[d]}) is declared by no plate, so the "
                "cost sums over it and measure_valued cannot perturb its entries side by side; "
                "declare it with pyro.plate or move it into the event with .to_event(...)"
            )


register(MeasureValuedEstimator())
