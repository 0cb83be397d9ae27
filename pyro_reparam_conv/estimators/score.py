"""Score-function (REINFORCE) terms with Rao-Blackwellized, plate-local costs.

For a site ``z ~ q_phi`` without a usable ``rsample``,
``grad_phi E_q[c] = E_q[grad_phi log q_phi(z) * c]`` (Williams 1992). The cost ``c`` of a
site only needs the terms that depend on ``z``: upstream and independent terms have zero
expected product with the score and only add variance (Schulman et al. 2015, "Gradient
Estimation Using Stochastic Computation Graphs"). Dependence is found by provenance
tracking (Wingate et al. 2011): every score-routed value carries its site name, and so does
every log-density computed from it. Within a ``pyro.plate`` a site's element ``i`` is
charged only with element ``i`` of the plate's terms; terms outside its plates are summed.
The score ``log q(z)`` is neither scaled nor masked; the cost terms are (subsampling scale
and masks enter exactly once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.ops.provenance import extract_provenance
from pyro.poutine import Trace

from ..routing import Route


@dataclass
class ScoreTerm:
    """One score-routed site of one particle: its score ``log q(z)`` and downstream cost."""

    site: str
    score: torch.Tensor
    cost: torch.Tensor


def _frames_by_dim(frames: Iterable) -> dict[int, object]:
    return {f.dim: f for f in frames if f.vectorized and f.dim is not None}


def sum_to_plates(value: torch.Tensor, value_frames, target_frames) -> torch.Tensor:
    """Sum ``value`` over every dim that is not one of ``target_frames``' plates (keepdim).

    A dim is kept only where the target site sits in the very same plate (same frame), so
    a different plate reusing that dim is summed out too.
    """
    target = _frames_by_dim(target_frames)
    own = _frames_by_dim(value_frames)
    dims = [
        d
        for d in range(-value.dim(), 0)
        if value.shape[d] != 1 and (d not in target or own.get(d) != target[d])
    ]
    return value.sum(dims, keepdim=True) if dims else value


def _fit_to(cost: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Drop leading singleton dims beyond ``shape``'s rank and broadcast to ``shape``."""
    while cost.dim() > len(shape) and cost.shape[0] == 1:
        cost = cost[0]
    return cost.expand(shape)


SiteKey = tuple  # ("model" | "guide", site name)
Dependencies = Mapping[SiteKey, frozenset]


def strip_provenance(model_trace: Trace, guide_trace: Trace) -> dict[SiteKey, frozenset]:
    """Replace provenance-tracking log-densities by plain tensors in place.

    Returns, per ``(role, name)`` sample site, the score sites its log-density depends on.
    """
    dependencies: dict[SiteKey, frozenset] = {}
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or "log_prob" not in site:
                continue
            site["log_prob"], prov = extract_provenance(site["log_prob"])
            site["log_prob_sum"], _ = extract_provenance(site["log_prob_sum"])
            site["unscaled_log_prob"], _ = extract_provenance(site["unscaled_log_prob"])
            if "score_parts" in site:
                parts, _ = extract_provenance(tuple(site["score_parts"]))
                site["score_parts"] = ScoreParts(*parts)
            dependencies[(role, name)] = frozenset(prov)
    return dependencies


def ordered_dependencies(
    model_trace: Trace, guide_trace: Trace, score_sites: Iterable[str]
) -> dict[SiteKey, frozenset]:
    """A conservative dependency map from sampling order alone.

    Every model term and every guide term sampled at or after a score site is charged to it.
    The extra (independent) terms add variance but no bias.
    """
    score_sites = set(score_sites)
    dependencies: dict[SiteKey, frozenset] = {}
    seen: set[str] = set()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            if name in score_sites:
                seen.add(name)
            dependencies[("guide", name)] = frozenset(seen)
    everything = frozenset(seen)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            dependencies[("model", name)] = everything
    return dependencies


def score_terms(
    model_trace: Trace,
    guide_trace: Trace,
    routes: Mapping[str, Route],
    dependencies: Dependencies,
) -> list[ScoreTerm]:
    """Score and Rao-Blackwellized cost (``log p - log q`` terms downstream) per score site."""
    score_sites = {n: guide_trace.nodes[n] for n, r in routes.items() if r.estimator == "score"}
    if not score_sites:
        return []
    costs: dict[str, torch.Tensor | float] = {name: 0.0 for name in score_sites}
    for role, sign, trace in (("model", 1.0, model_trace), ("guide", -1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            for target in dependencies.get((role, name), ()):
                if target in score_sites:
                    term = sum_to_plates(
                        site["log_prob"],
                        site["cond_indep_stack"],
                        score_sites[target]["cond_indep_stack"],
                    )
                    costs[target] = costs[target] + sign * term
    terms = []
    for name, site in score_sites.items():
        score = site["unscaled_log_prob"]
        cost = torch.as_tensor(costs[name], dtype=score.dtype, device=score.device)
        terms.append(ScoreTerm(name, score, _fit_to(cost.detach(), score.shape)))
    return terms
