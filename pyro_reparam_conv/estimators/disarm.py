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

With ``infer={"evaluations": 2K}`` the site draws ``K`` independent pairs (``2K``
evaluations: ``b_1..b_K`` then ``b~_1..b~_K`` along the evaluation dim, each weighted
``1/(2K)``) and ``g`` is the mean of the ``K`` pairs' estimates: the "DisARM with K pairs"
(local-DisARM) of the multi-sample comparisons (Dong, Mnih & Tucker 2020, section 5;
Dimitriev & Zhou 2021 compare ARMS with it at equal evaluations).
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.distributions import Bernoulli
from pyro.distributions.score_parts import ScoreParts

from ..distributions import distribution_name, unwrap_independent
from .base import Estimator, Layout, RoutingOptions, register

__all__ = [
    "DisarmEstimator",
    "bernoulli_logits",
    "evaluations_requested",
    "event_sum",
    "lay_out",
    "uniforms",
]


def _bernoulli(fn) -> Optional[Bernoulli]:
    base, _ = unwrap_independent(fn)
    return base if isinstance(base, Bernoulli) else None


def bernoulli_logits(fn) -> torch.Tensor:
    """The logits of a (possibly ``Independent``) Bernoulli, expanded to its full shape."""
    return _bernoulli(fn).logits.expand(fn.batch_shape + fn.event_shape)


def uniforms(count: int, logits: torch.Tensor) -> torch.Tensor:
    """``count`` uniforms per element of ``logits`` (``(count, *logits.shape)``), the draws
    ``1[u < p]`` of the Bernoulli estimators are made from."""
    return torch.rand((count,) + logits.shape, dtype=logits.dtype, device=logits.device)


def event_sum(t: torch.Tensor, event: int, keepdim: bool = False) -> torch.Tensor:
    """``t`` summed over its last ``event`` dims (kept as singletons where ``keepdim``)."""
    return t.sum(list(range(-event, 0)), keepdim=keepdim) if event else t


def evaluations_requested(infer: dict, even: bool = False, default: int = 2) -> int:
    """``infer["evaluations"]``: how many values a multi-sample estimator evaluates side by
    side (an int >= 2, even where ``even``); ``ValueError`` saying what is allowed."""
    count = infer.get("evaluations", default)
    if isinstance(count, bool) or not isinstance(count, int) or count < 2 or (even and count % 2):
        what = "an even int >= 2" if even else "an int >= 2"
        raise ValueError(f"infer['evaluations'] must be {what}, got {count!r}")
    return count


def lay_out(values: torch.Tensor, fn, dim: int) -> torch.Tensor:
    """``values`` (K, *batch, *event) with the K values along the evaluation dim ``dim``
    (counted from the right of the batch shape), singleton dims between it and the plates."""
    shape = values.shape[:1] + (1,) * (-1 - dim - len(fn.batch_shape)) + values.shape[1:]
    return values.reshape(shape)


class AntitheticPair(Layout):
    """``K`` pairs ``b = 1[u < p]`` and ``b~ = 1[1 - u < p]`` side by side (``b_1..b_K``
    then ``b~_1..b~_K``), weighted ``1/(2K)`` each; ``K = infer["evaluations"] / 2``."""

    def evaluations(self, fn) -> int:
        return 2

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        fn = msg["fn"]
        pairs = evaluations_requested(msg["infer"], even=True) // 2
        logits = bernoulli_logits(fn)
        u = uniforms(pairs, logits)
        p = torch.sigmoid(logits.detach())
        values = torch.cat([(u < p), (1 - u < p)]).to(logits.dtype)
        msg["value"] = lay_out(values, fn, dim)


class DisarmEstimator(Estimator):
    """An antithetic pair of values, two evaluations, no baseline needed."""

    name = "disarm"
    priority = 20
    layout = AntitheticPair()

    def why_not(self, fn) -> Optional[str]:
        if _bernoulli(fn) is None:
            return f"{distribution_name(fn)} is not a Bernoulli"
        return None

    def auto_why_not(self, fn, options: RoutingOptions) -> Optional[str]:
        why_not = self.why_not(fn)
        if why_not is None and options.evaluations not in (None, 2):
            return f"infer['evaluations']={options.evaluations!r}, not DisARM's 2"
        return why_not

    def because(self, fn) -> str:
        return (
            "Bernoulli: an antithetic pair (at 2 evaluations the best training ELBO of the "
            "estimators that do not differentiate the model on both Bernoulli VAEs of "
            "benchmarks/bernoulli_vae.py)"
        )

    def note(self, fn, infer: dict) -> str:
        count = evaluations_requested(infer, even=True)
        if count == 2:
            return "2 evaluations (b and its antithetic b~), unbiased"
        return f"{count} evaluations ({count // 2} antithetic pairs b, b~), unbiased"

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], 0.0, 0.0)  # all of its gradient: the surrogate

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        fn, value = site["fn"], site["value"]
        event = fn.event_dim
        logits = bernoulli_logits(fn)
        d, pairs = dim - event, value.shape[dim - event] // 2
        b, b_anti = value.narrow(d, 0, pairs), value.narrow(d, pairs, pairs)
        cost = cost.reshape(cost.shape + (1,) * event)
        diff = cost.narrow(d, 0, pairs) - cost.narrow(d, pairs, pairs)  # f(b) - f(b~)
        g = 0.5 * diff * (1 - 2 * b_anti) * (b != b_anti) * torch.sigmoid(logits.abs())
        g = g.mean(d, keepdim=True)  # the mean of the K pairs' estimates
        return event_sum(g.detach() * logits, event)


register(DisarmEstimator())
