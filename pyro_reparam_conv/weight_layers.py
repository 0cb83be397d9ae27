"""The layers of weight sites routed to flipout or local reparameterization, computed per
example while the model runs (the math: :mod:`.estimators.flipout`).

:class:`WeightLayers` is a messenger around the model run that also installs a
``TorchFunctionMode``. For every latent site whose plan's estimator rewrites layers, it
takes the value the model receives (after :class:`~.dependencies.TagLatents`, so it wraps
the model inside it) and watches every torch operator the model applies to that tensor,
matched by identity:

- the tensor as the ``weight`` of one call of a layer in
  :data:`~.estimators.flipout.LAYERS`, with the shape that layer takes: the call is the
  estimator's (:meth:`~.estimators.flipout._WeightEstimator.layer`), with the guide's ``loc``
  and ``scale`` (recorded by :meth:`WeightLayers.guide`);
- any other operator on it but those of :data:`METADATA` (its shape, dtype, ...: they read
  no value), or a second layer call: the per-example weights would no longer be one
  draw of ``q`` seen by all of the model. The step cannot be trusted, so :class:`WeightUse`
  is raised (naming the site and the operator) and the ELBO recomputes the particle with the
  plain weight draw for that site, from then on.

A site the ELBO has not yet seen runs *watched* (``check=True``): the plain draw, every use
recorded (:attr:`WeightLayers.other`, :attr:`WeightLayers.layer_calls`), and the ELBO decides
from those uses (:func:`verdict`) whether later steps may rewrite its layer.
"""

from __future__ import annotations

import functools
from typing import Callable, Collection, Mapping, Optional

import torch
from pyro.poutine.messenger import Messenger
from torch.distributions import Normal
from torch.overrides import TorchFunctionMode

from .distributions import expands, slice_offset, unwrap_independent
from .estimators import base as estimators
from .estimators.flipout import LAYERS, batched_layer
from .per_example import ExampleBoxes
from .routing import SitePlan, is_latent
from .sparsity import NO_VALUES, op_name

__all__ = [
    "BatchedLayers", "NOT_A_WEIGHT", "WeightLayers", "WeightUse", "rewrites_layers", "verdict",
]

#: what :meth:`WeightLayers.layer` returns where the value is not the call's weight
NOT_A_WEIGHT = object()

#: operators that neither read the values nor copy them out of the graph: the analysis's
#: list less copies, pickling, storage access and printing (a copy would carry the weight's
#: values where identity can no longer follow them)
METADATA = NO_VALUES - {
    "__deepcopy__", "__reduce_ex__", "untyped_storage", "data_ptr", "__dlpack_device__",
    "__repr__", "__str__", "__format__",
}  # fmt: skip


class WeightUse(Exception):
    """A weight site routed to a layer estimator was used otherwise in the model (not a
    ``RuntimeError``: Pyro's trace re-raises those as a new exception of the same type)."""

    def __init__(self, site: str, how: str, reason: Optional[str] = None) -> None:
        self.site, self.how = site, how
        self.reason = reason or f"plain weight draw: its value is used {how}"
        super().__init__(f"site {site!r}: {self.reason}")


def rewrites_layers(plan: SitePlan) -> bool:
    return hasattr(plan.estimator, "layer")


def verdict(
    other: Optional[str], calls: int, mixed: Optional[str] = None, parts: tuple = ()
) -> Optional[str]:
    """Why a watched site must stay a plain draw (``None``: its layer may be rewritten):
    ``other`` a use besides one layer's weight, ``calls`` its layer calls, ``mixed`` why its
    layer's examples are not shown to reach the terms separately (:mod:`.per_example`),
    ``parts`` the guide sites that pass slices of its value on."""
    if other is not None:
        return f"plain weight draw: its value is used {other}"
    if calls == 0 and parts:
        return (f"its value reaches the model in slices ({', '.join(parts)}), each a weight site"
                " of its own: their routes say how")  # fmt: skip
    if calls == 0:
        return "plain weight draw: its value is used as no layer's weight"
    if mixed is not None:
        return ("plain weight draw: its layer's examples are not shown to reach the model's "
                f"terms separately ({mixed})")  # fmt: skip
    return None


def _tensors(value, found: list) -> list:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, found)
    return found


class _Mode(TorchFunctionMode):
    def __init__(self, owner: "WeightLayers") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if not owner.values:
            return func(*args, **kwargs)
        tensors = _tensors((args, kwargs), [])
        found = [(t, owner.values[id(t)]) for t in tensors if id(t) in owner.values]
        after = set().union(*(owner.outputs[id(t)] for t in tensors if id(t) in owner.outputs))
        if not found and not after:
            return func(*args, **kwargs)
        name, _ = op_name(func)
        if after and name == "batch_norm" and _mixes_batch(args, kwargs):
            for site in after:
                owner.used(site, "through batch_norm over its layer's examples (mixes them)")
        result = self._call(func, name, found, args, kwargs)
        after = frozenset(after | {site for _, site in found})  # what depends on a weight
        for t in _tensors(result, []):
            owner.outputs[id(t)] = owner.outputs.get(id(t), frozenset()) | after
            owner._alive.append(t)
        return result

    def _call(self, func, name, found, args, kwargs):
        owner = self.owner
        spatial = LAYERS.get(func)
        weight = None
        if spatial is not None:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
        others = [site for t, site in found if t is not weight]  # a bias, an input, ...
        if name not in METADATA:
            how = "besides as a layer's weight" if spatial is None else "not as its weight"
            for site in dict.fromkeys(others):
                owner.used(site, f"by {name} ({how})")
        site = owner.values.get(id(weight)) if weight is not None else None
        if site is not None and site not in others:
            result = owner.layer(func, spatial, site, args, kwargs)
            if result is not NOT_A_WEIGHT:
                return result
            owner.used(site, f"by {name} (as a weight of another shape)")
        return func(*args, **kwargs)


class BatchedLayers(TorchFunctionMode):
    """Applies a layer of :data:`~.estimators.flipout.LAYERS` whose weight has leading dims
    (vectorized particles, a plate of weights) per index of those dims
    (:func:`~.estimators.flipout.batched_layer`), where torch would raise: the plain weight
    draws of a vectorized model, which plain Pyro cannot run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spatial = LAYERS.get(func)
        weight = None if spatial is None else (args[1] if len(args) > 1 else kwargs.get("weight"))
        if not isinstance(weight, torch.Tensor) or weight.dim() <= spatial + 2:
            return func(*args, **kwargs)
        rest = dict(kwargs)
        x = args[0] if args else rest.pop("input")
        rest.pop("weight", None)
        return batched_layer(func, spatial, x, weight, *args[2:], **rest)


def _mixes_batch(args, kwargs) -> bool:
    """Whether an ``F.batch_norm`` call normalizes with the batch's own statistics."""
    running = args[1] if len(args) > 1 else kwargs.get("running_mean")
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    return bool(training) or running is None


class WeightLayers(Messenger):
    """Rewrites (or, for sites in ``check``, watches) the layers of the weight sites whose
    plans ``plans()`` (after the guide ran) route to a layer estimator; ``skip`` names the
    sites to leave alone (those that fell back to the plain draw). Sites for which
    ``candidate(name, fn, plan)`` holds (plain draws that routing might send to a layer
    estimator) are watched too."""

    def __init__(
        self, plans: Callable[[], Mapping[str, SitePlan]], check: Callable[[str], bool],
        skip: Mapping[str, str], candidate: Callable[[str, object, SitePlan], bool] = None,
        batched: bool = False, units: Mapping[str, str] = {}, parents: Collection[str] = (),
        verify: Callable[[str], bool] = lambda name: False,
    ) -> None:  # fmt: skip
        super().__init__()
        #: rewritten sites whose layer's examples are followed again on this step (new
        #: arguments): where they mix, :meth:`prove_examples` raises :class:`WeightUse`
        self.verify, self.verifying = verify, set()
        #: per slice site (see :meth:`guide`) checked to be a layer's weight: its estimator;
        #: the sites whose draws are sliced so (their draws recorded on every step)
        self.units, self.parents = units, parents
        self.unit_parent: dict[str, str] = {}  # a slice site -> the site it slices
        self.batched = BatchedLayers() if batched else None  # any weight with leading dims
        self.plans, self.check, self.skip = plans, check, skip
        self.candidate = candidate or (lambda name, fn, plan: False)
        self.candidates: set[str] = set()
        self.layer_funcs: dict[str, object] = {}  # site -> the layer that took it first
        self.outputs: dict[int, frozenset] = {}  # id of a tensor computed from weights -> sites
        self.fns: dict[str, object] = {}  # the guide's distribution per routed site
        self.alias: dict[str, str] = {}  # a guide Delta site -> the routed site it passes on
        self.parts: dict[str, list] = {}  # a routed site -> the Delta sites passing slices
        self._draws: list = []  # (a routed site's value in the guide, the site, its fn)
        self.values: dict[int, str] = {}  # id of the value the model got -> site
        self._alive: list = []  # keeps those values (and their ids) alive for the run
        self.watched: set[str] = set()
        self.other: dict[str, str] = {}  # site -> its first use that is no layer's weight
        self.layer_calls: dict[str, int] = {}
        self.rewritten: dict[str, str] = {}  # site -> the layer rewritten
        #: the example indices of watched sites' layer outputs (:mod:`.per_example`), and
        #: per watched site why its examples are not shown to reach the terms separately
        self.examples: Optional[ExampleBoxes] = None
        self.mixed: dict[str, str] = {}
        self._mode = _Mode(self)

    # --------------------------------------------------------------- the guide
    def guide(self) -> Messenger:
        """A messenger for the guide that records the distribution of each such site, and
        the sites that only pass such a site's value on: a ``Delta`` whose value is that
        very tensor (Pyro's ``AutoNormal`` samples ``name + "_unconstrained"`` and then
        ``name`` as a ``Delta`` at its value, through the identity for a real support), or a
        reshaped slice of its last dim (Pyro's ``AutoDiagonalNormal``: one latent vector, a
        slice per site). A slice site is a weight site of its own (a *unit*): its law is the
        matching slice of the factorized Normal, independent of the other slices."""
        owner = self

        class _Record(Messenger):
            def _pyro_post_sample(self, msg: dict) -> None:
                if not is_latent(msg):
                    return
                plan, name = owner.plans().get(msg["name"]), msg["name"]
                routed = plan is not None and rewrites_layers(plan)
                if routed or (plan is not None and owner.candidate(name, msg["fn"], plan)):
                    if not routed:
                        owner.candidates.add(name)
                    owner.fns[name] = msg["fn"]
                if name in owner.fns or name in owner.parents:
                    owner._draws.append((msg["value"], name, msg["fn"]))
                    owner._alive.append(msg["value"])
                    return
                base = msg["fn"]
                while hasattr(base, "base_dist"):
                    base = base.base_dist
                passed = getattr(base, "v", None)
                for drawn, site, fn in owner._draws:
                    if expands(passed, drawn):
                        owner.alias[name] = site
                    elif slice_offset(passed, drawn) is not None:
                        owner._unit(name, site, fn, drawn, passed)

        return _Record()

    def _unit(self, name: str, parent: str, fn, drawn, value) -> None:
        """Guide site ``name`` passes ``value``, a reshaped slice of ``parent``'s draw: a
        weight site with that slice of ``parent``'s factorized Normal (when it is one)."""
        self.parts.setdefault(parent, []).append(name)
        base, _ = unwrap_independent(fn)
        if not isinstance(base, Normal):
            return
        start, size = slice_offset(value, drawn), value[(0,) * (drawn.dim() - 1)].numel()

        def part(t):
            return t.expand(drawn.shape)[..., start : start + size].reshape(value.shape)

        self.fns[name] = Normal(part(base.loc), part(base.scale), validate_args=False)
        self.unit_parent[name] = parent

    # --------------------------------------------------------------- the model
    def __enter__(self):  # the model starts: the guide has run
        sites = self.fns.keys() - self.skip.keys()
        self._active = bool(sites)
        if any(name in self.candidates or self.check(name) or self.verify(name)
               for name in sites):  # fmt: skip
            self.examples = ExampleBoxes()  # below the mode: it sees the layers' outputs
            self.examples.__enter__()
        if self.batched is not None:  # between: the analysis sees what it computes
            self.batched.__enter__()
        if self._active:  # no mode (no cost per operator) when no site rewrites layers
            self._mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._active:
                self._mode.__exit__(*exc)
            if self.batched is not None:
                self.batched.__exit__(*exc)
            if self.examples is not None:
                self.examples.__exit__(*exc)

    def prove_examples(self, model_trace) -> None:
        """After the run: why each watched site's layer examples are not shown to reach the
        model's terms separately (:attr:`mixed`; :mod:`.per_example`)."""
        if self.examples is not None:
            self.mixed = self.examples.mixing(model_trace)
        for site in sorted(self.verifying & self.mixed.keys()):
            raise WeightUse(site, "", verdict(None, 1, self.mixed[site]))

    def _pyro_post_sample(self, msg: dict) -> None:
        name = self.alias.get(msg["name"], msg["name"])
        if name not in self.fns or name in self.skip or not is_latent(msg):
            return
        if name in self.candidates or self.check(name):
            self.watched.add(name)
        elif self.verify(name):
            self.verifying.add(name)
        self.values[id(msg["value"])] = name
        self._alive.append(msg["value"])
        self.layer_calls[name] = 0

    def used(self, site: str, how: str) -> None:
        self.other.setdefault(site, how)
        if site not in self.watched:
            raise WeightUse(site, how)

    def layer(self, func, spatial: int, site: str, args: tuple, kwargs: dict):
        """The layer call with ``site``'s value as its weight: rewritten, or plain for a
        watched site; :data:`NOT_A_WEIGHT` where the value is not the call's weight (or not
        of a shape the layer takes). A weight with leading dims (vectorized particles,
        plates) is applied per index of those dims, broadcast against the input's batch
        dims (:func:`~.estimators.flipout.batched_layer`), where the plain call would fail."""
        rest = dict(kwargs)
        x = args[0] if args else rest.pop("input", None)
        weight = args[1] if len(args) > 1 else rest.pop("weight", None)
        base = self.fns[site]
        while hasattr(base, "base_dist"):
            base = base.base_dist
        if (
            weight is None or weight is x or self.values.get(id(weight)) != site
            or not isinstance(x, torch.Tensor) or weight.dim() < spatial + 2
            or base.loc.dim() > weight.dim()
        ):  # fmt: skip
            return NOT_A_WEIGHT
        self.layer_calls[site] += 1
        self.layer_funcs.setdefault(site, func)
        name = func.__name__
        if self.layer_calls[site] > 1:
            self.used(site, f"as the weight of a second layer call ({name})")
        apply = func
        if weight.dim() > spatial + 2:
            apply = functools.partial(batched_layer, func, spatial)
        if site in self.watched or self.layer_calls[site] > 1:
            out = apply(x, weight, *args[2:], **rest)
            if site in self.watched and self.examples is not None:
                self.examples.add_layer(site, name, out, spatial)
            return out
        loc = base.loc.expand(weight.shape)
        scale = base.scale.expand(weight.shape)
        estimator = (
            estimators.get(self.units[site]) if site in self.unit_parent
            else self.plans()[site].estimator
        )  # fmt: skip
        self.rewritten[site] = f"{estimator.name} in {name}"
        out = estimator.layer(apply, spatial, x, weight, loc, scale, tuple(args[2:]), rest)
        if site in self.verifying and self.examples is not None:
            self.examples.add_layer(site, name, out, spatial)
        return out
