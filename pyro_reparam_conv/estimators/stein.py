"""RODEO: leave-one-out REINFORCE with discrete Stein control variates, for Bernoulli sites.

Shi, Zhou, Hwang, Titsias & Mackey 2022, "Gradient Estimation with Discrete Stein Operators"
(NeurIPS). ``K = infer["evaluations"]`` independent draws ``x_1..x_K`` of a (possibly
``.to_event``) Bernoulli with probabilities ``p = sigmoid(alpha)`` over ``D`` coordinates,
their costs ``f_k`` per element of the site's plates (Rao-Blackwellized, as for
:mod:`.multisample`) and ``G_k = df/dx`` at ``x_k`` (the cost differentiated in the value;
zero where it is not differentiable).

**The Stein operator.** For the Gibbs kernel that redraws one coordinate ``i`` (uniformly
chosen) from ``q``, ``(A h)(x) = 1/D sum_i w_i(x) (h(N_i x) - h(x))`` with ``N_i x`` the
value with coordinate ``i`` flipped and ``w_i(x) = q_i(1 - x_i)`` its probability. The
kernel leaves ``q`` invariant, so ``E_q[(A h)(x)] = 0`` for every ``h``: a control variate
for free, also for vector ``h``. Draw ``k``'s control functions are built from the *other*
draws only, so that the identity holds given them:

    l_k(y) = 1/(K-1) sum_{j != k} G_j . (y - x_j)   (first-order expansions of f at x_j)
    (h0_k(y), h1_k(y)) = H(l_k(y), fbar_{-k})   (H a network; fbar_{-k}: the others' mean cost)

and the estimate of ``dE[f]/d alpha`` is

    g = 1/K sum_k [(f_k - 1/(K-1) sum_{j != k} (f_j + a (A h0_j)(x_j))) (x_k - p)
                   + b (A [h1_k(y) (y - p)])(x_k)].

``(A h0_j)(x_j)`` has mean zero in ``x_j`` whatever the other draws (``x_k`` among them) are,
so the baselines stay independent of ``x_k`` in mean; the second term has mean zero in
``x_k`` given the others. ``g`` is unbiased for any ``a``, ``b`` and ``H``, which are params
(``"<site>$rodeo.a"``, ``"<site>$rodeo.b"``, ``"<site>$rodeo.H..."``; ``a = b = 0`` at first:
plain leave-one-out) trained by the surrogate's term ``-||g||^2 / 2`` in which only they are
live (the mean of ``g`` does not depend on them, so the step lowers its variance), as in the
paper. Its neighbour sums cost ``O(K D)`` per element, not ``O(K D^2)``: ``l_k(N_i x) =
l_k(x) + Gbar_{-k,i} (1 - 2 x_i)``, and the vector term's coordinate ``m`` is
``(x_m - p_m) (A h1_k)(x) + w_m h1_k(N_m x) (1 - 2 x_m) / D``.

The control variates have to follow a model that changes: give their params a fast learning
rate, e.g. ``pyro.optim.Adam(lambda name, p: {"lr": 1e-1 if "$rodeo." in name else 1e-4})``
(``benchmarks/bernoulli_vae.py``: at 1e-1 RODEO led 3e-2, 1e-2 and the paper's 1e-3).

``H``: inputs ``(l, fbar)``, one hidden layer of :data:`HIDDEN` LeakyReLU(0.3) units (the
paper's network has 100; 16 keep its cost small beside the model's), two outputs; drawn from
a generator of its own (the user's random stream is left alone). Like ``double_cv`` it
costs one more backward pass through the model's terms of the site, and needs a model that
takes real values (where ``G = 0`` the expansions are constant and ``g`` is leave-one-out
with a learned, still unbiased, correction).
"""

from __future__ import annotations

from typing import Optional

import pyro
import torch
import torch.nn.functional as F

from .base import register
from .disarm import event_sum
from .multisample import Differentiated, _others

__all__ = ["HIDDEN", "RodeoEstimator"]

#: hidden units of the control network ``H``
HIDDEN = 16


def _event_mean(t: torch.Tensor, event: int) -> torch.Tensor:
    """``t`` averaged over its last ``event`` dims, kept as singletons."""
    return t.mean(list(range(-event, 0)), keepdim=True) if event else t


def _control_network(site: str, like: torch.Tensor):
    """``H``: ``(l, fbar) -> (h0, h1)`` with the site's params (Glorot-uniform at first)."""

    def init(layer: int):  # drawn only when the param is created, from a generator of its own
        def draw():
            gen, shapes = torch.Generator().manual_seed(0), [(2, HIDDEN), (HIDDEN, 2)]
            for fan_in, fan_out in shapes[: layer + 1]:  # layer 1: the second draw
                w = 2 * torch.rand(fan_in, fan_out, generator=gen) - 1
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            return (w * bound).to(dtype=like.dtype, device=like.device)

        return draw

    def zeros(n: int):
        return lambda: torch.zeros(n, dtype=like.dtype, device=like.device)

    w1 = pyro.param(f"{site}$rodeo.H.w1", init(0))
    b1 = pyro.param(f"{site}$rodeo.H.b1", zeros(HIDDEN))
    w2 = pyro.param(f"{site}$rodeo.H.w2", init(1))
    b2 = pyro.param(f"{site}$rodeo.H.b2", zeros(2))

    def network(ell: torch.Tensor, fbar: torch.Tensor):
        ell, fbar = torch.broadcast_tensors(ell, fbar)
        hidden = F.leaky_relu(torch.stack([ell, fbar], -1) @ w1 + b1, 0.3)
        out = hidden @ w2 + b2
        return out[..., 0], out[..., 1]

    return network


class RodeoEstimator(Differentiated):
    """Leave-one-out with discrete Stein control variates (a learned network of the
    first-order expansions at the other draws)."""

    name = "rodeo"
    family = "independent draws, leave-one-out and discrete Stein control variates"

    def surrogate(self, site: dict, cost, dim: Optional[int]):
        x, f, grad, logits, p, d, event = self._differentiated(site, cost, dim)
        size = float(x.shape[x.dim() - event :].numel()) if event else 1.0
        others_g = _others(grad, d)  # Gbar_{-k}
        offset = _others(event_sum(grad * x, event, keepdim=True), d)  # mean_{j != k} G_j . x_j
        ell_x = event_sum(others_g * x, event, keepdim=True) - offset  # l_k(x_k)
        ell_n = ell_x + others_g * (1 - 2 * x)  # l_k(N_i x_k), per coordinate i
        fbar = _others(f, d)
        network = _control_network(site["name"], p)
        h0_x, h1_x = network(ell_x, fbar)
        h0_n, h1_n = network(ell_n, fbar)
        w = p * (1 - x) + (1 - p) * x  # q_i(1 - x_i)
        stein0 = _event_mean(w * (h0_n - h0_x), event)  # (A h0_k)(x_k)
        stein1 = _event_mean(w * (h1_n - h1_x), event)
        cv = (x - p) * stein1 + w * h1_n * (1 - 2 * x) / size  # (A [h1_k (y - p)])(x_k)
        a = pyro.param(f"{site['name']}$rodeo.a", lambda: torch.zeros((), dtype=p.dtype))
        b = pyro.param(f"{site['name']}$rodeo.b", lambda: torch.zeros((), dtype=p.dtype))
        advantage = f - _others(f + a * stein0, d)  # f_k - mean_{j != k} (f_j + a A h0_j)
        g = (advantage * (x - p) + b * cv).mean(d, keepdim=True)
        fit = -0.5 * g**2  # only a, b and H are live: their variance-lowering step
        return event_sum(g.detach() * logits + fit, event)


register(RodeoEstimator())
