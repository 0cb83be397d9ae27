"""DisARM: an antithetic, unbiased gradient for Bernoulli sites of any event shape.

For ``b ~ Bernoulli(sigmoid(alpha))`` (elementwise, any event shape) and one uniform draw
``u``, the pair ``b = 1[u < sigmoid(alpha)]``, ``b~ = 1[1 - u < sigmoid(alpha)]`` has equal
marginals, and

    g_i = 1/2 (f(b) - f(b~)) (-1)^(b~_i) 1[b_i != b~_i] sigmoid(|alpha_i|)

is an unbiased estimate of ``d E[f(b)] / d alpha_i`` (Dong, Mnih & Tucker 2020, "DisARM:
An Antithetic Gradient Estimator for Binary Latent Variables"; ARM, Yin & Zhou 2019, is the
same pair without the Rao-Blackwellization over ``u``). The two values are evaluated side by
side along an evaluation dim (two model evaluations); the ELBO averages them (weights 1/2);
``f`` is the site's Rao-Blackwellized cost, per element of its plates (the terms of other
elements have equal means under ``b`` and ``b~`` and drop out), and its own ``-log q(b)``
enters ``f`` with ``alpha`` held fixed (its gradient at fixed ``b`` has mean zero). The
surrogate term is ``sum_i stop_grad(g_i) * alpha_i``. Terms outside the site's plates that
depend on it are fine: the pair is drawn jointly for all elements, which is the multivariate
estimator of the paper.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.distributions import Bernoulli
from pyro.distributions.score_parts import ScoreParts

from ..distributions import distribution_name, unwrap_independent
from .base import Estimator, Layout, register

__all__ = ["DisarmEstimator"]


def _bernoulli(fn) -> Optional[Bernoulli]:
    base, _ = unwrap_independent(fn)
    return base if isinstance(base, Bernoulli) else None


class AntitheticPair(Layout):
    """``b = 1[u < p]`` and ``b~ = 1[1 - u < p]`` side by side, weighted 1/2 each."""

    def evaluations(self, fn) -> int:
        return 2

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        fn = msg["fn"]
        logits = _bernoulli(fn).logits.expand(fn.batch_shape + fn.event_shape)
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
        p = torch.sigmoid(logits.detach())
        pair = torch.stack([(u < p), (1 - u < p)]).to(logits.dtype)
        shape = (2,) + (1,) * (-1 - dim - len(fn.batch_shape)) + tuple(pair.shape[1:])
        msg["value"] = pair.reshape(shape)

    def weights(self, site: dict, dim: int) -> float:
        return 0.5


class DisarmEstimator(Estimator):
    """An antithetic pair of values, two evaluations, no baseline needed."""

    name = "disarm"
    priority = 20
    layout = AntitheticPair()

    def why_not(self, fn) -> Optional[str]:
        if _bernoulli(fn) is None:
            return f"{distribution_name(fn)} is not a Bernoulli"
        return None

    def because(self, fn) -> str:
        return "Bernoulli: an antithetic pair"

    def note(self, fn, infer: dict) -> str:
        return "2 evaluations (b and its antithetic b~), unbiased"

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], 0.0, 0.0)  # all of its gradient: the surrogate

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        fn, value = site["fn"], site["value"]
        event = fn.event_dim
        logits = _bernoulli(fn).logits.expand(fn.batch_shape + fn.event_shape)
        b, b_anti = value.narrow(dim - event, 0, 1), value.narrow(dim - event, 1, 1)
        diff = cost.narrow(dim, 0, 1) - cost.narrow(dim, 1, 1)  # f(b) - f(b~), per element
        diff = diff.reshape(diff.shape + (1,) * event)
        g = 0.5 * diff * (1 - 2 * b_anti) * (b != b_anti) * torch.sigmoid(logits.abs())
        term = g.detach() * logits
        return term.sum(list(range(-event, 0))) if event else term


register(DisarmEstimator())
