"""What a :class:`~.elbo.RoutedELBO` learns about a model across steps, in one object.

- ``dependencies``: the :class:`~.dependencies.DependencyCache` (what tracked steps found
  per structure key);
- ``verified``: the structure keys whose values side by side were checked one at a time;
- ``avoid``: per site, the estimators found not to work for it, with why (its values side
  by side fail), which routing then skips;
- ``fold``: whether values side by side pass the model's convolutions folded
  (:mod:`.folding`);
- ``kl_measured``: per structure key, the analytic-KL sites measured to give the ELBO more
  variance than their Monte Carlo terms (:func:`~.analytic_kl.measure_kl`);
- ``model_plain``: whether a step found the model without sites to sum out
  (:mod:`.enumeration`): later steps run it without Pyro's enumeration;
- ``layers``: per weight site routed to flipout or local reparameterization and seen by a
  step, ``None`` when its value was used only as one layer call's weight whose examples
  reach the model's terms separately (:mod:`.per_example`) and no other guide site depends
  on it (its layers are rewritten from then on), else why it stays a plain draw
  (:mod:`.weight_layers`); ``proven``: the argument fingerprints under which that was
  shown (a new one checks the examples again);
- ``auto``, ``dropped``: the plain Normal sites routed to a layer estimator automatically
  (``layer_estimators="auto"``), and those that fell back, with why;
- ``units``, ``parents``: the slice sites (``AutoDiagonalNormal``'s reshaped slices of one
  latent vector) checked to be a layer's weight, with their estimator, and the latents
  sliced so.

Only ``avoid`` changes what a later step computes in a way the next tracked step cannot find
again by itself, so :meth:`Learned.state_dict` saves it (checkpoints); the rest is derived
again. :meth:`Learned.remedy` makes, for a failed particle, the next change to retry with
(each at most once per particle and estimator, all undone when the retries fail too).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from . import estimators
from .dependencies import DependencyCache
from .estimators.flipout import LAYERS
from .estimators.base import RoutingOptions
from .evaluations import avoid_after_failure
from .weight_layers import WeightUse, verdict

__all__ = ["Learned"]


class Learned:
    """What the ELBO knows about the model's structure (see the module docstring)."""

    def __init__(self, dependency_tracking: str = "cached", auto_layers: bool = True) -> None:
        self.dependencies = DependencyCache(dependency_tracking)
        self.verified: set[tuple] = set()
        self.avoid: dict[str, dict[str, str]] = {}  # site -> {estimator: why not}
        self.fold = False
        self.kl_measured: dict[tuple, dict[str, str]] = {}  # structure -> {site: why no KL}
        self.layers: dict[str, Optional[str]] = {}
        #: per plain Normal site a first step watched: the layer estimator routing picks
        #: for it and why (``None``: not a weight), and the sites that fell back from one
        self.auto: dict[str, Optional[tuple[str, str]]] = {}
        self.dropped: dict[str, str] = {}
        #: per slice site checked to be a layer's weight its estimator, and the sites whose
        #: draws are sliced into such sites (:meth:`~.weight_layers.WeightLayers.guide`)
        self.units: dict[str, str] = {}
        self.parents: set[str] = set()
        #: per weight site, the argument fingerprints (:func:`~.dependencies.fingerprint`)
        #: of the steps that showed its layer may be rewritten: a new one checks it again
        self.proven: dict[str, list] = {}
        #: whether plain Normal weights are routed to the layer estimators automatically
        #: (``RoutedELBO(layer_estimators="auto")``, once their first step shows them used
        #: as one layer's weight whose examples reach the terms separately)
        self.auto_layers = auto_layers
        #: whether a step found the model without sites to sum out: later steps run it
        #: without Pyro's enumeration (a step that then meets one runs again with it)
        self.model_plain = False

    def to_check(self, name: str, arguments) -> bool:
        """Whether weight site ``name``'s examples are to be followed again on a step with
        argument fingerprint ``arguments``: on every step under ``dependency_tracking=
        "always"`` (as dependencies are), else under a fingerprint not yet shown."""
        return self.dependencies.mode == "always" or arguments not in self.proven.get(name, ())

    def shown(self, weights, arguments) -> None:
        """Record the fingerprint under which ``weights``' checked sites were shown to keep
        their examples apart (the last ``DependencyCache.SIZE``, as the cache keeps)."""
        for name in weights.watched | weights.verifying:
            if self.layers.get(name, "") is None:
                fingerprints = self.proven.setdefault(name, [])
                if arguments not in fingerprints:
                    size = self.dependencies.SIZE
                    fingerprints[:] = [*fingerprints, arguments][-size:]

    def candidate(self, name: str, fn, plan) -> bool:
        """Whether a plain draw's site is to be watched: a factorized Normal routed to
        ``pathwise`` automatically, not watched before."""
        return (
            self.auto_layers and name not in self.auto and not plan.route.forced
            and plan.estimator.name == "pathwise"
            and {"flipout", "local_reparam"} <= set(estimators.ESTIMATORS)
            and estimators.get("flipout").why_not(fn) is None
        )  # fmt: skip

    def weight_used(self, error, plans) -> None:
        """A weight site's value was used otherwise on a step that rewrote its layer: it
        stays a plain draw from now on (routed automatically: back to ``pathwise``)."""
        plan = plans.get(error.site)
        if plan is not None and not plan.route.forced and self.auto.get(error.site):
            self.auto[error.site] = None
            self.dropped[error.site] = error.reason
        self.layers[error.site] = error.reason

    def guide_uses(self, weights, terms, plans) -> None:
        """After a step that watched weight sites: one whose draw another guide site depends
        on (``terms``: the step's term dependencies, ``None`` where unknown) stays a plain
        draw, as for another use in the model: that site and the model's per-example
        weights would no longer have the guide's joint law."""
        for name in weights.watched:
            if name not in self.layers or self.layers[name] is not None:
                continue  # not proven on this step: nothing to withdraw
            roots = {name, weights.unit_parent.get(name, name)}  # a slice: its whole draw
            passing = roots | {d for d, site in weights.alias.items() if site in roots}
            passing |= {d for root in roots for d in weights.parts.get(root, ())}
            if terms is None:
                how = "in the guide, where its dependents are not tracked on this step"
            else:
                users = sorted(
                    n for (role, n), deps in terms.items()
                    if role == "guide" and deps & roots and n not in passing
                )  # fmt: skip
                if not users:
                    continue
                how = f"by guide site {users[0]!r} (the guide's joint law would change)"
            self.weight_used(WeightUse(name, how), plans)

    def layer_decisions(self, plans, weights) -> dict:
        """``plans`` with each weight site's layer decision of this step
        (:class:`~.weight_layers.WeightLayers` ``weights``); what the watched sites showed is
        learned."""
        if not weights.fns and not self.dropped:
            return plans
        decided = dict(plans)
        for name, why in self.dropped.items():
            if name in plans and plans[name].estimator.name == "pathwise":
                decided[name] = plans[name].decided(layers=f"not a layer estimator: {why}")
        for name in weights.fns:
            if name in weights.candidates:
                decided[name] = self._watched_candidate(plans[name], weights)
                continue
            if name in weights.watched:
                found = verdict(weights.other.get(name), weights.layer_calls.get(name, 0),
                                weights.mixed.get(name), weights.parts.get(name, ()))
                self.layers[name] = found
                text = found or "plain weight draw on its first step, while its uses are checked"
                if name in weights.unit_parent and not found:
                    text = self._unit_checked(name, weights)
            elif self.layers.get(name) is not None:
                text = self.layers[name]
            else:
                text = weights.rewritten.get(name) or verdict(None, 0)
            decided[name] = plans[name].decided(layers=text)
        return decided

    def _unit_checked(self, name: str, weights) -> str:
        """A slice site (:meth:`~.weight_layers.WeightLayers.guide`) found to be one layer's
        weight: its estimator from the next step, as for an automatic route."""
        func = weights.layer_funcs[name]
        self.units[name] = "local_reparam" if LAYERS[func] == 0 else "flipout"
        return (f"plain weight draw on its first step: a slice of "
                f"{weights.unit_parent[name]!r}'s factorized Normal used only as the weight of "
                f"{func.__name__}, so {self.units[name]} from the next step")  # fmt: skip

    def _watched_candidate(self, plan, weights):
        name = plan.route.site
        func = weights.layer_funcs.get(name)
        calls, parts = weights.layer_calls.get(name, 0), weights.parts.get(name, ())
        why = verdict(weights.other.get(name), calls, weights.mixed.get(name), parts)
        if func is None or why:
            self.auto[name] = None
            if func is None and not parts:  # no weight
                return plan
            if parts:  # its slices are weight sites: their draws are recorded from now on
                self.parents.add(name)
            self.dropped[name] = why
            return plan.decided(layers=f"not a layer estimator: {why}")
        chosen = "local_reparam" if LAYERS[func] == 0 else "flipout"  # exact / unbiased
        self.auto[name] = (
            chosen,
            f"{plan.route.distribution} weight used only by one {func.__name__} call (checked on "
            "its first step)",
        )
        self.layers[name] = None  # checked: the next step rewrites its layer
        return plan.decided(
            layers=f"plain weight draw on its first step: used only as the weight of "
            f"{func.__name__}, so {chosen} from the next step"
        )

    def routing_options(self, max_enumerate: int) -> RoutingOptions:
        layers = {name: chosen for name, chosen in self.auto.items() if chosen}
        return RoutingOptions(max_enumerate, self.avoid, layers)

    def remedy(self, error: Exception, plans, tried: dict) -> bool:
        """Apply the next change to retry a particle with after ``error`` (its routes were
        ``plans``), recording how to undo it in ``tried``: ``"fold"`` (values side by side
        through convolutions folded), then ``"avoid"`` (the automatically routed side-by-side
        sites routed elsewhere, :func:`avoid_after_failure`; again while that avoids an
        estimator not avoided yet, so at most once per estimator). ``False`` when none is left. A
        requested side-by-side estimator whose values fail the check raises the error that
        says how to fix it."""
        if not any(plan.dim is not None for plan in plans.values()):
            return False
        if "fold" not in tried and not self.fold:
            tried["fold"] = (self.avoid, self.fold)
            self.fold = True
            return True
        avoid = avoid_after_failure(plans, error)
        if not avoid or all(e in self.avoid.get(s, {}) for s, es in avoid.items() for e in es):
            return False  # nothing new to avoid
        tried.setdefault("avoid", (self.avoid, self.fold))
        self.avoid = {site: {**self.avoid.get(site, {}), **avoid.get(site, {})}
                      for site in {*self.avoid, *avoid}}  # fmt: skip
        self.fold = False  # the sites leave their values side by side
        self.dependencies.clear()  # the routes change: track the retried particle
        return True

    def undo(self, tried: dict) -> None:
        """Forget the changes of a particle whose retries failed too."""
        for state in [tried[k] for k in ("fold", "avoid") if k in tried][:1]:
            self.avoid, self.fold = state

    def state_dict(self) -> dict[str, Any]:
        return {"avoid": {site: dict(reasons) for site, reasons in self.avoid.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.avoid = {site: dict(reasons) for site, reasons in state.get("avoid", {}).items()}
