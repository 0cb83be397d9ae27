"""Straight-through Gumbel-softmax: a biased, low-variance gradient for discrete sites.

For ``y ~ OneHotCategorical(logits)`` (or ``Bernoulli``), draw the relaxed value
``s = softmax((logits + g) / tau)`` with Gumbel noise ``g`` (a logistic one for Bernoulli),
hand the model the hard value ``h = one_hot(argmax s)`` and differentiate as if it were
``s``: the forward pass is exact, the backward pass is the relaxation's (Jang, Gu & Poole
2017, "Categorical Reparameterization with Gumbel-Softmax"; Bengio et al. 2013 for
straight-through). The gradient is *biased* (it is the gradient of the relaxed objective,
evaluated at a hard sample), more so at high temperature ``tau``; it is never chosen
automatically, and the route's reason says so. The temperature is the site's
``infer={"temperature": tau}`` (default 1). ``-log q`` is differentiated through the value
only (its direct gradient in the parameters has mean zero: Roeder et al. 2017). A
``Categorical`` site has integer values, which carry no gradient: use ``OneHotCategorical``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pyro.distributions import Bernoulli, OneHotCategorical
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask

from ..distributions import distribution_name, unwrap_independent
from .base import Estimator, Layout, register

__all__ = ["GumbelStraightThrough"]


class _StraightThrough(torch.autograd.Function):
    """The hard value forward (bit-exact, so validation sees a valid one-hot or 0/1), the
    relaxed value's gradient backward."""

    @staticmethod
    def forward(ctx, hard, soft):
        return hard.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _temperature(infer: dict) -> float:
    tau = infer.get("temperature", 1.0)
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"infer['temperature'] must be a number > 0, got {tau!r}")
    return float(tau)


class StraightThrough(Layout):
    """One hard draw whose gradient is the relaxed (Gumbel-softmax) sample's."""

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        fn = msg["fn"]
        tau = _temperature(msg["infer"])  # checked (naming the site) when routed
        base, _ = unwrap_independent(fn)
        logits = base.logits.expand(fn.batch_shape + fn.event_shape)
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        if isinstance(base, Bernoulli):  # logistic noise: the difference of two Gumbels
            soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)
            hard = (soft > 0.5).to(soft.dtype)
        else:
            soft = torch.softmax((logits - (-u.log()).log()) / tau, -1)
            hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        msg["value"] = _StraightThrough.apply(hard, soft)


class GumbelStraightThrough(Estimator):
    """Hard sample forward, relaxed gradient backward; biased, opt-in only."""

    name = "gumbel_st"
    automatic = False
    layout = StraightThrough()

    def why_not(self, fn) -> Optional[str]:
        base, _ = unwrap_independent(fn)
        if isinstance(base, (OneHotCategorical, Bernoulli)):
            return None
        return (
            f"{distribution_name(fn)} is not OneHotCategorical or Bernoulli (a Categorical's "
            "integer values carry no gradient: use OneHotCategorical)"
        )

    def note(self, fn, infer: dict) -> str:
        tau = _temperature(infer)
        return f"biased: straight-through Gumbel-softmax at temperature {tau:g}"

    def has_score_function(self, fn) -> bool:
        return False

    def score_parts(self, site: dict) -> ScoreParts:
        # -log q differentiated through the (straight-through) value only: its direct
        # gradient in the parameters has mean zero, so it would add variance, no signal
        fn = site["fn"]
        base, ndims = unwrap_independent(fn)
        fixed = type(base)(logits=base.logits.detach())
        if ndims:
            fixed = fixed.to_event(ndims)
        log_q = fixed.log_prob(site["value"]).expand(fn.batch_shape)
        return ScoreParts(site["log_prob"], 0.0, scale_and_mask(log_q, site["scale"], site["mask"]))


register(GumbelStraightThrough())
