"""Control variates (baselines) for score-function terms.

A baseline ``b`` independent of the sample ``z`` keeps ``E[grad log q(z) (c - b)]`` equal to
``E[grad log q(z) c]`` while shrinking its variance when ``b`` tracks the cost ``c``
(Williams 1992; Mnih & Gregor 2014, "Neural Variational Inference and Learning in Belief
Networks"). Kinds:

- ``"decaying_avg"``: ``b_t = beta b_{t-1} + (1 - beta) mean_particles(c_{t-1})``, per plate
  element; uses only past steps, so it is independent of the current draw. It starts at
  the first step's cost (``b_1 = 0``, ``b_2 = c_1``), where Pyro's ``TraceGraph_ELBO``
  starts its average at 0 (``b_2 = (1 - beta) c_1``): the same fixed point, reached sooner.
- ``"leave_one_out"``: with ``K > 1`` particles, ``b_k = (sum_j c_j - c_k) / (K - 1)``, per
  plate element (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline
  for free!"); independent of particle ``k`` because particles are independent.
- ``"nn"``: ``b = nn_baseline(nn_baseline_input)``, trained by ``(b - c)^2`` (Mnih & Gregor).
- ``"value"``: a user-given tensor ``baseline_value`` (trained the same way if it needs grad).

Site options use Pyro's keys in ``infer["baseline"]`` (``use_decaying_avg_baseline``,
``baseline_beta``, ``nn_baseline``, ``nn_baseline_input``, ``baseline_value``) plus
``use_leave_one_out``; ``infer={"baseline": None}`` or Pyro's own switch
``{"use_decaying_avg_baseline": False}`` (with no other baseline key) turns the baseline off
for the site. A ``nn_baseline``'s output or a ``baseline_value`` must have the shape of the
site's cost, its batch shape with its plates (Pyro's rule), or ``ValueError`` names both.

:func:`score_surrogate` turns the score-function rows of the particles' site-term tables
(:mod:`pyro_reparam_conv.terms`) into ``sum score * stop_grad(cost - b)`` and the
baseline-fitting loss; the decaying averages are the only state, kept in
:class:`DecayingAverages` across steps.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

KINDS: tuple[str, ...] = ("decaying_avg", "leave_one_out", "nn", "value")
_ALIASES = {"avg": "decaying_avg", "loo": "leave_one_out", "auto": "auto", None: None}
_PYRO_KEYS = (
    "use_decaying_avg_baseline",
    "baseline_beta",
    "nn_baseline",
    "nn_baseline_input",
    "baseline_value",
    "use_leave_one_out",
)

__all__ = [
    "BaselineSpec",
    "DecayingAverages",
    "KINDS",
    "leave_one_out",
    "normalize_kind",
    "parse_baseline",
    "score_surrogate",
]


def normalize_kind(kind: Optional[str]) -> Optional[str]:
    """Canonical baseline kind for ``kind`` (accepts ``"avg"``, ``"loo"``, ``"auto"``, ``None``)."""
    kind = _ALIASES.get(kind, kind)
    if kind is not None and kind != "auto" and kind not in KINDS:
        raise ValueError(
            f"unknown baseline {kind!r}; valid baselines are 'auto', None, "
            + ", ".join(map(repr, KINDS + ("avg", "loo")))
        )
    return kind


@dataclass(frozen=True)
class BaselineSpec:
    """The baseline one score-routed site uses (``kind=None``: none)."""

    kind: Optional[str]
    beta: float = 0.9
    nn: Any = None
    nn_input: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None

    def describe(self) -> str:
        if self.kind is None:
            return "none"
        if self.kind == "decaying_avg":
            return f"decaying_avg(beta={self.beta:g})"
        return self.kind


def parse_baseline(site: str, infer: dict, default: Optional[str]) -> BaselineSpec:
    """Read ``infer["baseline"]`` of ``site``; unset keys fall back to the ELBO's ``default``."""
    if "baseline" in infer and infer["baseline"] is None:
        return BaselineSpec(None)
    options = dict(infer.get("baseline") or {})
    unknown = set(options) - set(_PYRO_KEYS)
    if unknown:
        raise ValueError(
            f"site {site!r}: unknown baseline options {sorted(unknown)}; valid keys are "
            f"{list(_PYRO_KEYS)}"
        )
    beta = float(options.get("baseline_beta", 0.9))
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"site {site!r}: baseline_beta must be in [0, 1), got {beta}")
    nn, value = options.get("nn_baseline"), options.get("baseline_value")
    if nn is not None and value is not None:
        raise ValueError(f"site {site!r}: give either nn_baseline or baseline_value, not both")
    if nn is not None:
        if options.get("nn_baseline_input") is None:
            raise ValueError(f"site {site!r}: nn_baseline needs nn_baseline_input")
        return BaselineSpec("nn", beta, nn=nn, nn_input=options["nn_baseline_input"])
    if value is not None:
        return BaselineSpec("value", beta, value=torch.as_tensor(value))
    if options.get("use_leave_one_out"):
        return BaselineSpec("leave_one_out", beta)
    if options.get("use_decaying_avg_baseline"):
        return BaselineSpec("decaying_avg", beta)
    if "use_decaying_avg_baseline" in options:  # Pyro's switch, set to False: no baseline
        return BaselineSpec(None, beta)
    return BaselineSpec(default, beta)


def leave_one_out(costs: torch.Tensor, dim: int) -> torch.Tensor:
    """Per particle along ``dim``: the mean of the other particles' costs."""
    k = costs.shape[dim]
    if k < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 particles")
    return (costs.sum(dim, keepdim=True) - costs) / (k - 1)


class DecayingAverages:
    """Exponential moving averages of each site's cost, kept across steps (ELBO state)."""

    def __init__(self) -> None:
        self.averages: dict[str, torch.Tensor] = {}

    def baseline(self, site: str, like: torch.Tensor) -> torch.Tensor:
        """The current average for ``site`` broadcast to ``like`` (zeros before the first step)."""
        avg = self.averages.get(site)
        if avg is None:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        if avg.device != like.device or avg.dtype != like.dtype:
            avg = avg.to(like)
        try:
            torch.broadcast_shapes(avg.shape, like.shape)
        except RuntimeError:  # plate sizes changed (e.g. a different batch): fall back to a scalar
            avg = avg.mean()
        return avg

    def update(self, site: str, cost: torch.Tensor, beta: float) -> None:
        cost = cost.detach()
        old = self.averages.get(site)
        if old is not None and old.shape != cost.shape:
            old = old.mean().to(cost)
        self.averages[site] = cost.clone() if old is None else beta * old + (1 - beta) * cost

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.averages.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averages = {k: v.clone() for k, v in state.items()}


def _checked_value(
    site: str, value: torch.Tensor, cost: torch.Tensor, particle_dim
) -> torch.Tensor:
    """A learned or given baseline, which must have the cost's shape (with vectorized
    particles, or the shape of one particle's cost)."""
    value = value.to(cost)
    shapes = [tuple(cost.shape)]
    if particle_dim is not None and cost.dim() >= -particle_dim:
        shapes.append(tuple(s for d, s in enumerate(cost.shape) if d != cost.dim() + particle_dim))
    if tuple(value.shape) not in shapes:
        raise ValueError(
            f"site {site!r}: baseline of shape {tuple(value.shape)} does not match the site's "
            f"cost shape {shapes[-1]} (its batch shape, plates included); a baseline must "
            "have exactly that shape"
        )
    return value


def _baselines(
    site: str,
    spec: Optional[BaselineSpec],
    costs: list[torch.Tensor],
    averages: DecayingAverages,
    particle_dim: Optional[int],
) -> tuple[list[Any], Any]:
    """Baselines for one site's costs (one per particle) and the baseline-fitting loss."""
    kind = spec.kind if spec is not None else None
    if kind is None:
        return [0.0] * len(costs), 0.0
    if kind == "leave_one_out":
        if particle_dim is not None:
            return [leave_one_out(costs[0], particle_dim)], 0.0
        if len(costs) < 2:
            raise ValueError(f"site {site!r}: a leave-one-out baseline needs num_particles >= 2")
        if all(c.shape == costs[0].shape for c in costs):
            return list(leave_one_out(torch.stack(costs), 0).unbind(0)), 0.0
        means = torch.stack([c.mean() for c in costs])
        return list(leave_one_out(means, 0).unbind(0)), 0.0
    if kind == "decaying_avg":
        baselines = [averages.baseline(site, c) for c in costs]
        mean_cost = costs[0]
        if particle_dim is not None:
            mean_cost = mean_cost.mean(particle_dim, keepdim=True)
        elif len(costs) > 1 and all(c.shape == mean_cost.shape for c in costs):
            mean_cost = torch.stack(costs).mean(0)
        averages.update(site, mean_cost, spec.beta)
        return baselines, 0.0
    # learned baselines: an nn of a (detached) input, or a user tensor
    value = spec.nn(spec.nn_input.detach()) if kind == "nn" else spec.value
    value = _checked_value(site, value, costs[0], particle_dim)
    fit_loss = sum(((value - c) ** 2).sum() for c in costs) if value.requires_grad else 0.0
    return [value] * len(costs), fit_loss


def score_surrogate(
    scored: Iterable, averages: DecayingAverages
) -> tuple[Any, Any]:
    """``(sum score * stop_grad(cost - b), baseline-fitting loss)`` over score-function rows.

    ``scored``: the rows with a score of every particle (:class:`~pyro_reparam_conv.terms.SiteTerm`,
    with ``site``, ``score``, ``cost``, ``baseline``, ``score_weight``, the weights of the
    evaluations the score has, and ``particle_dim``), in particle order; a site's rows
    share its baseline (leave-one-out across particles; with vectorized particles along the
    row's ``particle_dim``, the dim its plate declares). Decaying averages are read and
    then updated in ``averages``.
    """
    grouped: dict[str, list] = defaultdict(list)
    for row in scored:
        grouped[row.site].append(row)
    surrogate: Any = 0.0
    fit_loss: Any = 0.0
    for site, rows in grouped.items():
        costs = [row.cost for row in rows]
        dim = rows[0].particle_dim
        dim = dim if dim is not None or len(rows) > 1 else None
        baselines, site_fit = _baselines(site, rows[0].baseline, costs, averages, dim)
        fit_loss = fit_loss + site_fit
        for row, b in zip(rows, baselines):
            advantage = row.cost if isinstance(b, float) and b == 0 else (row.cost - b).detach()
            if not (isinstance(row.score_weight, float) and row.score_weight == 1.0):
                advantage = advantage * row.score_weight  # expectation over evaluations
            surrogate = surrogate + (row.score * advantage).sum()
    return surrogate, fit_loss
