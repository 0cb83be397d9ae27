"""Multi-sample estimators: ``K`` values of a site side by side, one surrogate for all.

Each estimator here evaluates ``K = infer["evaluations"]`` values of its site (default 2)
side by side along the site's evaluation dim (as :class:`~.disarm.AntitheticPair` does),
the ELBO averages them with weights ``1/K`` (every value has the marginal ``q``), and the
site's own surrogate term ``sum stop_grad(g) * theta`` carries the gradient ``g`` in the
distribution's parameters ``theta``. ``f_k`` is the site's Rao-Blackwellized cost at value
``k`` (its ``-log q`` with the parameters held fixed, whose direct gradient has mean zero),
per element of the site's plates.

- ``"loo"``: leave-one-out REINFORCE (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE
  samples, get a baseline for free!"), any distribution. ``K`` independent draws and
  ``g = 1/K sum_k (f_k - 1/(K-1) sum_{j != k} f_j) grad log q(z_k)``: the baseline of draw
  ``k`` is independent of it, so ``g`` is unbiased.

- ``"arms"``: ARMS (Dimitriev & Zhou 2021, "ARMS: Antithetic-REINFORCE-Multi-Sample
  Gradient for Binary Variables", ICML), Bernoulli. Per element, ``K`` uniforms drawn
  jointly from the Dirichlet copula: ``D ~ Dirichlet(1, ..., 1)``, ``u_k = (1 - D_k)^(K-1)``,
  each uniform, with bivariate cdf ``C(s, t) = (s^(1/(K-1)) + t^(1/(K-1)) - 1)_+^(K-1)``;
  ``b_k = 1[u_k < p]`` where ``p < 1/2``, ``1[1 - u_k < p]`` otherwise (the rarer value is
  the one made mutually exclusive). The draws are exchangeable but correlated, so the
  leave-one-out estimator's baselines are not independent of the draw: for ``j != k``,
  ``E[f(b_j) (b_{k,i} - p_i)] = rho_i dE[f]/d alpha_i`` with ``rho_i`` the correlation of
  ``b_{j,i}`` and ``b_{k,i}`` (the other elements of ``b_j`` are independent of
  ``b_{k,i}``). Dividing by ``1 - rho_i`` removes the bias:
  ``g_i = 1/((K-1)(1-rho_i)) sum_k (f_k - mean_j f_j)(b_{k,i} - p_i)``, with
  ``1/(1 - rho) = sigma(|alpha|) / (1 - r)`` and ``r = C(q, q)/q = (2 - q^(-1/(K-1)))_+^(K-1)``,
  ``q = min(p, 1 - p)`` (stable at extreme logits). With ``K = 2`` it is DisARM.

- ``"double_cv"``: double control variates on leave-one-out (Titsias & Shi 2022, "Double
  Control Variates for Gradient Estimation in Discrete Latent Variable Models", AISTATS),
  Bernoulli. With ``G_k = d f / d b`` at ``b_k`` (the cost differentiated in the site's
  value, the model taking real inputs), ``Gbar_{-k}`` the mean of the others' and ``Gbar``
  the mean of all, draw ``k``'s second control variate is its first-order Taylor term
  ``t_k = sum_i (b_{k,i} - p_i) Gbar_{-k,i}`` (``f(b_k) ~ f(b) + (b_k - b)^T G``), and

      g = 1/K sum_k (F_k - 1/(K-1) sum_{j != k} F_j)(b_k - p) + c p (1 - p) Gbar,
      F_k = f_k - c t_k.

  ``t_j`` (``j != k``) has mean zero in ``b_j`` whatever ``b_k`` is, and
  ``E[t_k (b_k - p)] = p (1 - p) Gbar_{-k}``, which the last term adds back: ``g`` is
  unbiased for any ``c`` independent of the draws. ``c`` is the param
  ``"<site>$double_cv"`` (initialized at 0, plain leave-one-out, as in the paper's code),
  trained by the surrogate's term ``-||g||^2 / 2`` in which only ``c`` is live (``g`` is
  linear in ``c`` and its mean does not depend on ``c``, so this step lowers the variance).
  The gradient in the value costs one more backward pass through the model's terms of the
  site. Where the cost has no gradient in the value (``torch.no_grad``, or a model that
  uses the value as an index), ``G = 0``: plain leave-one-out, still unbiased. ``c`` has to
  follow a model that changes: give it a fast learning rate (``benchmarks/bernoulli_vae.py``
  uses 1e-1 for it, 1e-4 for the networks, through ``pyro.optim.Adam(callable)``).

Routing: a Bernoulli site given ``infer={"evaluations": K}`` with ``K > 2`` gets ``"arms"``
by itself, any other site given it (without ``rsample`` or a small support) ``"loo"``;
``"double_cv"`` is opt-in (it differentiates the model and costs a backward pass more).
``benchmarks/bernoulli_vae.py`` measured the choice (README, "Bernoulli VAEs"). The discrete
Stein control variates (RODEO, Shi et al. 2022), which build on the same draws and the same
gradient in the value, are :mod:`.stein`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pyro
import torch
from pyro.distributions.score_parts import ScoreParts

from ..distributions import distribution_name
from .base import Estimator, Layout, RoutingOptions, register
from .disarm import (
    _bernoulli,
    bernoulli_logits,
    evaluations_requested,
    event_sum,
    lay_out,
    uniforms,
)

__all__ = [
    "ArmsEstimator",
    "DoubleCVEstimator",
    "LeaveOneOutEstimator",
    "dirichlet_copula",
    "value_gradient",
]


class Independent(Layout):
    """``K`` independent draws side by side, weighted ``1/K`` each."""

    def evaluations(self, fn) -> int:
        return 2

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        fn, count = msg["fn"], evaluations_requested(msg["infer"])
        if _bernoulli(fn) is None:
            values = fn.sample((count,))
        else:  # as DisARM draws: uniforms below p (torch.bernoulli is slower)
            logits = bernoulli_logits(fn).detach()
            values = (uniforms(count, logits) < torch.sigmoid(logits)).to(logits.dtype)
        msg["value"] = lay_out(values, fn, dim)


def dirichlet_copula(count: int, shape, like: torch.Tensor) -> torch.Tensor:
    """``count`` exchangeable uniforms per element of ``shape`` (``(count, *shape)``), drawn
    from the Dirichlet copula: ``u_k = (1 - D_k)^(count - 1)``, ``D ~ Dirichlet(1, ...)``."""
    e = -torch.rand((count,) + tuple(shape), dtype=like.dtype, device=like.device).log()
    return (1 - e / e.sum(0, keepdim=True)).pow(count - 1)


class Copula(Layout):
    """ARMS's ``K`` correlated draws ``b_k = 1[u_k < p]`` (``1[1 - u_k < p]`` for ``p >= 1/2``)."""

    def evaluations(self, fn) -> int:
        return 2

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        fn, count = msg["fn"], evaluations_requested(msg["infer"])
        logits = bernoulli_logits(fn).detach()
        u = dirichlet_copula(count, logits.shape, logits)
        u = torch.where(logits < 0, u, 1 - u)
        msg["value"] = lay_out((u < torch.sigmoid(logits)).to(logits.dtype), fn, dim)


class Differentiable(Independent):
    """``K`` independent Bernoulli draws, as leaves that require grad (so that the cost can be
    differentiated in the value)."""

    def draw(self, msg: dict, dim: Optional[int] = None) -> None:
        super().draw(msg, dim)
        msg["value"] = msg["value"].detach().requires_grad_(True)


def value_gradient(cost: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``d sum(cost) / d value`` (one more backward pass through the cost's graph); zeros
    where the cost is not differentiable in the value (``torch.no_grad``, an index). Entry
    ``k`` along the evaluation dim is a function of value ``k``'s branch alone (the values
    side by side are evaluated independently), which is what the control variates built
    from it need to stay unbiased."""
    grad = None
    if cost.requires_grad and value.requires_grad:
        (grad,) = torch.autograd.grad(cost.sum(), value, retain_graph=True, allow_unused=True)
    return torch.zeros_like(value) if grad is None else grad


def _others(t: torch.Tensor, d: int) -> torch.Tensor:
    """Entry ``k``: the mean of the other entries along ``d``."""
    return (t.sum(d, keepdim=True) - t) / (t.shape[d] - 1)


def _leave_one_out(f: torch.Tensor, d: int) -> torch.Tensor:
    """``f_k`` less the mean of the other values along ``d``."""
    return f - _others(f, d)


class _MultiSample(Estimator):
    """What the multi-sample estimators share: ``infer["evaluations"]`` values, unbiased, all
    of the gradient in the surrogate term; opt-in unless a subclass says otherwise (``loo``
    and ``arms`` are chosen automatically for sites given ``infer["evaluations"]``)."""

    automatic = False
    priority = 30
    family = ""

    def why_not(self, fn) -> Optional[str]:
        if _bernoulli(fn) is None:
            return f"{distribution_name(fn)} is not a Bernoulli"
        return None

    def note(self, fn, infer: dict) -> str:
        return f"{evaluations_requested(infer)} evaluations ({self.family}), unbiased"

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], 0.0, 0.0)  # all of its gradient: the surrogate

    def _parts(self, site: dict, cost: torch.Tensor, dim: int):
        """``(value, cost with event dims, d, event)``: the eval dim ``d`` counted on both."""
        event = site["fn"].event_dim
        return site["value"], cost.reshape(cost.shape + (1,) * event), dim - event, event


class LeaveOneOutEstimator(_MultiSample):
    """``K`` independent draws, each with the mean of the others as its baseline."""

    name = "loo"
    layout = Independent()
    family = "independent draws, leave-one-out baselines"
    automatic = True
    priority = 90  # before the score function, where the site may use several evaluations

    def why_not(self, fn) -> Optional[str]:
        return None

    def auto_why_not(self, fn, options: RoutingOptions) -> Optional[str]:
        return "" if options.evaluations is None else None  # silent: one draw by default

    def because(self, fn) -> str:
        return "the site may use several evaluations: leave-one-out baselines"

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        k = cost.shape[dim]
        advantage = _leave_one_out(cost, dim) / k
        return (advantage.detach() * site["unscaled_log_prob"]).sum(dim, keepdim=True)


class ArmsEstimator(_MultiSample):
    """``K`` draws from the Dirichlet copula, leave-one-out with ARMS's debiasing."""

    name = "arms"
    layout = Copula()
    family = "Dirichlet-copula draws, ARMS"
    automatic = True
    priority = 25  # after DisARM, which it is with 2 evaluations

    def auto_why_not(self, fn, options: RoutingOptions) -> Optional[str]:
        if self.why_not(fn) is not None or options.evaluations in (None, 2):
            return ""  # silent: DisARM's reason covers it (ARMS with 2 draws is DisARM)
        return None

    def because(self, fn) -> str:
        return (
            "Bernoulli with several evaluations: ARMS (at 4 evaluations the best test bound "
            "on both Bernoulli VAEs of benchmarks/bernoulli_vae.py among the estimators that "
            "do not differentiate the model)"
        )

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        value, cost, d, event = self._parts(site, cost, dim)
        k = value.shape[d]
        logits = bernoulli_logits(site["fn"])
        a = logits.detach().abs()
        q = torch.sigmoid(-a)  # min(p, 1 - p)
        r = (2 - q.pow(-1.0 / (k - 1))).clamp(min=0).pow(k - 1)  # C(q, q) / q
        debias = torch.sigmoid(a) / (1 - r)  # 1 / (1 - rho)
        centred = cost - cost.mean(d, keepdim=True)
        p = torch.sigmoid(logits.detach())
        g = (centred * (value - p)).sum(d, keepdim=True) * debias / (k - 1)
        return event_sum(g.detach() * logits, event)


class Differentiated(_MultiSample):
    """What the estimators that differentiate the cost in the value share: ``K``
    independent draws as leaves, and ``G = df/db`` taken in the surrogate."""

    layout = Differentiable()
    cost_graph = True

    def _differentiated(self, site: dict, cost, dim: int) -> "Differentiation":
        """The draws, their costs and ``G``, detached, with the logits (live) and ``p``."""
        value, cost, d, event = self._parts(site, cost, dim)
        grad = value_gradient(cost, value)
        logits = bernoulli_logits(site["fn"])
        p = torch.sigmoid(logits.detach())
        return Differentiation(value.detach(), cost.detach(), grad, logits, p, d, event)


class Differentiation(NamedTuple):
    """What :meth:`Differentiated._differentiated` hands the estimator."""

    values: torch.Tensor  # K draws along ``dim``
    costs: torch.Tensor  # with singleton event dims
    grads: torch.Tensor  # G = df/db at each draw
    logits: torch.Tensor  # live: the surrogate's term multiplies them
    probs: torch.Tensor  # sigmoid(logits), detached
    dim: int  # the evaluation dim, counted with the event dims
    event: int  # the site's event dims


class DoubleCVEstimator(Differentiated):
    """Leave-one-out with a second, Taylor-expansion control variate (its coefficient trained
    to minimize the variance)."""

    name = "double_cv"
    family = "independent draws, leave-one-out and Taylor control variates"

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        value, cost, grad, logits, p, d, event = self._differentiated(site, cost, dim)
        others = _others(grad, d)  # Gbar_{-k}
        t = event_sum((value - p) * others, event, keepdim=True)  # the Taylor terms t_k
        a = (_leave_one_out(cost, d) * (value - p)).mean(d, keepdim=True)  # leave-one-out
        b = p * (1 - p) * grad.mean(d, keepdim=True)
        b = b - (_leave_one_out(t, d) * (value - p)).mean(d, keepdim=True)  # g = a + c b
        c = pyro.param(f"{site['name']}$double_cv", lambda: torch.zeros((), dtype=p.dtype))
        g = a + c.detach() * b
        fit = -0.5 * (a + c * b) ** 2  # only c is live: its variance-minimizing step
        return event_sum(g * logits + fit, event)


for _estimator in (LeaveOneOutEstimator(), ArmsEstimator(), DoubleCVEstimator()):
    register(_estimator)
