"""Pathwise (reparameterization) terms of the surrogate ELBO.

For ``z = g(eps, phi)`` drawn by ``rsample``, ``grad_phi E_q[f(z)] = E_eps[grad_phi f(g(eps, phi))]``
(Kingma & Welling 2014; Rezende, Mohamed & Wierstra 2014), so these terms are differentiated
as they are: every model log-density and, for pathwise guide sites, ``-log q(z)`` through
its ``rsample``-ed value. Score-routed guide sites contribute no ``-log q`` here: with the
value held fixed its gradient has zero mean (``E_q[grad log q] = 0``), and the score term
carries the site's own ``-log q`` in its cost instead.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from pyro.distributions.util import is_identically_zero
from pyro.poutine import Trace

from ..routing import Route


def pathwise_surrogate_elbo(
    model_trace: Trace,
    guide_trace: Trace,
    routes: Mapping[str, Route],
    kl: Optional[Mapping[str, torch.Tensor]] = None,
) -> torch.Tensor | float:
    """``sum_model log p + sum_{pathwise guide sites} (-log q)`` with gradients kept.

    Sites in ``kl`` (analytic-KL sites of the fast path) enter as ``-KL(q || p)`` instead of
    their ``log p - log q`` pair.
    """
    kl = kl or {}
    total: torch.Tensor | float = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and name not in kl:
            total = total + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or name in kl or routes.get(name) is None:
            continue
        if routes[name].estimator == "pathwise":
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                total = total - entropy_term.sum()
    for value in kl.values():
        total = total - value
    return total
