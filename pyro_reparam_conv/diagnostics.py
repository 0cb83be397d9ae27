"""Gradient diagnostics: a gradient-flow audit and a per-estimator variance comparison.

- :func:`audit_gradients`: one ELBO gradient evaluation; which estimator each guide site
  gets, and which parameters receive a gradient, how large, and from which sites' terms.
  Parameters that receive none (a ``.detach()``, a layer run under ``torch.no_grad()``) are
  flagged loudly, and so are sample sites that exist in the guide or the model only.
  With ``check_bias=True`` it also compares, per pathwise site, the mean pathwise gradient
  with an unbiased reference (measure-valued or score function, that site alone rerouted):
  a cost that is not differentiable in the site (a step, a threshold, an ``argmax``)
  biases the pathwise gradient silently, and the difference in standard errors shows it
  (``docs/biased_pathwise.md``).
- :func:`compare_estimators`: many independent single-estimate gradients per estimator
  (pathwise, score function with and without baselines, measure-valued, ...); per parameter
  the mean, variance, signal-to-noise ratio, cost, and whether the mean agrees with the
  unbiased estimators' within the standard errors.

Neither function changes parameter values, their ``.grad``, the param store (beyond creating
parameters that a first call of the model/guide creates, as :class:`~pyro.infer.SVI` would)
or the global random state: gradients are taken with :func:`torch.autograd.grad`, never
accumulated into ``.grad``, and values and grads are snapshotted and restored anyway.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.util import get_rng_state, set_rng_state

from .elbo import RoutedELBO
from .estimators import base
from .introspect import display_name, modules_behind, probe_traces, unmatched_sites
from .routing import ESTIMATORS, ForceEstimatorMessenger, Route

__all__ = [
    "COMPARE_ESTIMATORS",
    "UNBIASED_ESTIMATORS",
    "BiasCheck",
    "GradientAudit",
    "ParamRecord",
    "audit_gradients",
    "compare_estimators",
    "z_threshold",
]

#: Estimator names :func:`compare_estimators` accepts (plus any in ``routing.ESTIMATORS``).
COMPARE_ESTIMATORS: tuple[str, ...] = (
    "auto", "pathwise", "pathwise+kl", "score", "score+avg", "score+loo",
)  # fmt: skip

#: Estimators unbiased for any integrable cost (the pathwise gradient needs a cost that is
#: differentiable in the site; straight-through Gumbel-softmax is biased): the references
#: of the bias check and of :func:`compare_estimators`' ``agrees`` column.
UNBIASED_ESTIMATORS: tuple[str, ...] = (
    "score", "score+avg", "score+loo", "measure_valued", "enumerate", "disarm", "loo", "arms",
    "double_cv", "rodeo",
)  # fmt: skip


def z_threshold(numel: int, num_draws: Optional[int] = None, false_alarm: float = 1e-3) -> float:
    """Standard errors beyond which a difference of means over ``numel`` elements is flagged:
    ``max(4, z)`` with ``z`` the two-sided quantile at ``false_alarm / numel`` (Bonferroni:
    with every element unbiased, the chance that any one of them exceeds it is at most
    ``false_alarm``) of Student's t with ``num_draws - 1`` degrees of freedom (the standard
    errors are estimated from ``num_draws`` draws per estimator; conservative for two
    estimators), or of the normal law without ``num_draws``. With 200 draws: 4.0 up to 11
    elements, 5.05 for 1000 (4.89 for normal means), 5.57 for 12000."""
    tail = false_alarm / (2 * max(int(numel), 1))
    if num_draws is None:
        z = NormalDist().inv_cdf(1 - tail)
    else:
        from scipy.stats import t

        z = float(t.isf(tail, max(int(num_draws) - 1, 1)))
    return max(4.0, z)


def _z_scores(mean_a, se_a, mean_b, se_b) -> torch.Tensor:
    """``|mean_a - mean_b| / sqrt(se_a^2 + se_b^2)`` elementwise; 0 where the means agree to
    float precision, ``inf`` where they differ without any standard error."""
    diff = (mean_a - mean_b).abs()
    se = (se_a.square() + se_b.square()).sqrt()
    same = diff <= 1e-6 * (1 + mean_a.abs() + mean_b.abs())
    z = torch.where(se > 0, diff / se.clamp_min(1e-300), torch.full_like(diff, math.inf))
    return torch.where(same, torch.zeros_like(z), z)


# ------------------------------------------------------------------ parameter discovery
@dataclass
class _Param:
    name: str
    tensor: torch.Tensor  # the leaf that gradients are taken with respect to
    source: str


def _collect_params(param_trace, model, guide) -> list[_Param]:
    """Params seen in the trace (as SVI collects them; unconstrained leaves), then parameters
    of modules behind ``model``/``guide`` not already among them (matched by identity)."""
    params: list[_Param] = []
    seen: set[int] = set()
    store = pyro.get_param_store()
    for name, site in param_trace.nodes.items():
        if site["type"] != "param":
            continue
        value = site["value"]
        leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
        if name in store:
            leaf = store._params[name] if hasattr(store, "_params") else leaf
        if id(leaf) not in seen:
            seen.add(id(leaf))
            params.append(_Param(display_name(name), leaf, "param store"))
    for role, fn in (("model", model), ("guide", guide)):
        for module in modules_behind(fn):
            label = type(module).__name__
            for pname, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(_Param(f"{role}:{label}.{pname}", p, f"{role} module {label}"))
    return params


class _Snapshot:
    """Values and ``.grad`` of tensors, and the global RNG state, restored on exit."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.tensors = list({id(t): t for t in tensors}.values())

    def __enter__(self) -> "_Snapshot":
        self.rng = get_rng_state()
        self.values = [t.detach().clone() for t in self.tensors]
        self.grads = [None if t.grad is None else t.grad.detach().clone() for t in self.tensors]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for t, v, g in zip(self.tensors, self.values, self.grads):
                if not torch.equal(t, v):
                    t.copy_(v)
                t.grad = g
        set_rng_state(self.rng)


def _existing_tensors(model, guide) -> list[torch.Tensor]:
    store = pyro.get_param_store()
    tensors = [store._params[n] for n in store.keys()] if hasattr(store, "_params") else []
    for fn in (model, guide):
        for module in modules_behind(fn):
            tensors += list(module.parameters())
    return tensors


# ------------------------------------------------------------------------------ audit
@dataclass
class ParamRecord:
    """One parameter in a :class:`GradientAudit`.

    ``sites``: the sample sites whose surrogate-loss terms reach the parameter in the autograd
    graph (see :func:`audit_gradients`). ``frozen``: ``requires_grad=False`` on purpose.
    """

    name: str
    shape: tuple
    receives_gradient: bool
    grad_norm: float
    sites: tuple
    source: str
    frozen: bool = False


@dataclass(frozen=True)
class BiasCheck:
    """The bias check of one pathwise site (``audit_gradients(..., check_bias=True)``).

    ``z_score``: the largest ``|mean pathwise - mean reference| / standard error`` over the
    ``numel`` elements of the parameters the site's draw depends on (``param`` is the one
    where it is largest, with both means there), from ``num_draws`` gradient estimates per
    estimator. ``reference``: the unbiased estimator the site was rerouted to
    (``"measure_valued"``, or ``"score"`` with a leave-one-out baseline over 2 particles),
    ``note`` why not the measure-valued one where it is not. ``biased``: ``z_score`` above
    ``threshold`` (:func:`z_threshold` of ``numel`` and ``num_draws`` unless one was given).
    """

    site: str
    reference: str
    z_score: float
    threshold: float
    param: str
    pathwise_mean: float
    reference_mean: float
    num_draws: int
    numel: int
    note: str = ""

    @property
    def biased(self) -> bool:
        return self.z_score > self.threshold


@dataclass
class GradientAudit:
    """Result of :func:`audit_gradients`; ``str(audit)`` is a readable report."""

    routes: dict[str, Route]
    params: list[ParamRecord]
    loss: float
    notes: list[str] = field(default_factory=list)
    #: sample sites on one side only: ``{name: "guide"}`` or ``{name: "model"}``
    #: (see :func:`~pyro_reparam_conv.introspect.unmatched_sites`)
    unmatched_sites: dict[str, str] = field(default_factory=dict)
    #: per pathwise site, its bias check (only with ``check_bias=True``)
    bias_checks: dict[str, BiasCheck] = field(default_factory=dict)

    @property
    def no_gradient(self) -> list[str]:
        """Names of parameters that require a gradient but receive none."""
        return [p.name for p in self.params if not p.receives_gradient and not p.frozen]

    @property
    def pathwise_bias(self) -> dict[str, float]:
        """Pathwise sites whose mean gradient differs from the unbiased reference by more
        than the threshold: ``{site: z_score}`` (empty without ``check_bias=True``)."""
        return {name: c.z_score for name, c in self.bias_checks.items() if c.biased}

    def param(self, name: str) -> ParamRecord:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no parameter {name!r}; audited: {[p.name for p in self.params]}")

    def __str__(self) -> str:
        lines = [f"Gradient audit (loss {self.loss:.6g})", "", "Sites:"]
        if not self.routes:
            lines.append("  (no guide latent sites)")
        for route in self.routes.values():
            lines.append(f"  {route}")
        lines += ["", "Parameters:"]
        width = max([len(p.name) for p in self.params] + [9])
        lines.append(f"  {'parameter':<{width}}  {'shape':<14} {'grad norm':>11}  from sites")
        for p in self.params:
            if p.frozen:
                norm = "frozen"
            elif p.receives_gradient:
                norm = f"{p.grad_norm:.4g}"
            else:
                norm = "NONE"
            sites = ", ".join(p.sites) if p.sites else "-"
            shape = str(tuple(p.shape))
            lines.append(f"  {p.name:<{width}}  {shape:<14} {norm:>11}  {sites}")
        missing = self.no_gradient
        if missing:
            lines.append("")
            for name in missing:
                lines.append(
                    f"!! NO GRADIENT: {name} -- used only under torch.no_grad() or through a "
                    "detached tensor (.detach(), .item(), numpy), or not used at all?"
                )
        else:
            lines += ["", "Every parameter receives a gradient."]
        if self.unmatched_sites:
            lines.append("")
        lines += [_UNMATCHED[side].format(name=name) for name, side in self.unmatched_sites.items()]
        lines += _bias_lines(self.bias_checks)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bias_lines(checks: Mapping[str, BiasCheck]) -> list[str]:
    if not checks:
        return []
    draws = next(iter(checks.values())).num_draws
    lines = ["", f"Pathwise bias check ({draws} gradient draws per estimator):"]
    for c in checks.values():
        verdict = "BIASED" if c.biased else "consistent"
        lines.append(
            f"  {c.site}: {c.z_score:.3g} standard errors from {c.reference} "
            f"(threshold {c.threshold:.3g} over {c.numel} parameter element"
            f"{'s' if c.numel != 1 else ''}; largest at "
            f"{c.param}: pathwise {c.pathwise_mean:.4g}, {c.reference} {c.reference_mean:.4g}) "
            f"-- {verdict}" + (f"; {c.note}" if c.note else "")
        )
    for c in checks.values():
        if c.biased:
            lines.append(
                f"!! BIASED PATHWISE GRADIENT: site {c.site!r} -- its mean pathwise gradient "
                f"differs from the unbiased {c.reference} estimate by {c.z_score:.3g} standard "
                "errors: the cost is not differentiable in it (a step, threshold, rounding or "
                "argmax?); route the site to an unbiased estimator: "
                f"infer={{'estimator': 'measure_valued'}} (Normal sites) or "
                f"infer={{'estimator': 'score'}} (see docs/biased_pathwise.md)"
            )
    return lines


_UNMATCHED = {
    "guide": "!! SITE IN THE GUIDE ONLY: {name!r} -- the model has no latent site of that name, "
    "so q({name}) is fitted to nothing; rename it to the model's site (typo?) or mark it "
    "infer={{'is_auxiliary': True}}",
    "model": "!! SITE IN THE MODEL ONLY: {name!r} -- the guide does not sample it, so it is "
    "drawn from the prior at every step; add it to the guide",
}


def _site_terms(particles, scale: float) -> dict[str, torch.Tensor]:
    """The routed surrogate loss split by sample site (summed over particles), from the
    particles' site-term tables: site ``n``'s term is the sum of its rows' surrogate terms
    (``-log p``, a guide site's ``+entropy_term`` through ``rsample``, or its ``KL``) and
    of its score-function part times its fixed cost."""
    terms: dict[str, Any] = {}
    for p in particles:
        for row in p.rows:
            value = -row.surrogate
            if row.score is not None:
                value = value - (row.score * row.cost).sum()
            if isinstance(value, torch.Tensor) and value.requires_grad:
                terms[row.site] = terms.get(row.site, 0.0) + value * scale
    return terms


def audit_gradients(
    model: Callable,
    guide: Callable,
    *args,
    elbo=None,
    check_bias: bool = False,
    num_draws: int = 200,
    bias_threshold: Optional[float] = None,
    **kwargs,
) -> GradientAudit:
    """Which estimator each guide site gets, and which parameters the ELBO gradient reaches;
    with ``check_bias=True``, which pathwise sites get a biased gradient.

    Runs one draw of ``elbo`` (default :class:`~.elbo.RoutedELBO`) and differentiates its
    surrogate loss with :func:`torch.autograd.grad` with respect to every parameter: those the
    model and guide touch through ``pyro.param``/``pyro.module``/``PyroModule`` (as ``SVI``
    collects them; the unconstrained tensors) plus every parameter of an ``nn.Module`` behind
    ``model``/``guide`` (the callable itself, a bound method's object, or wrapped by a Pyro
    handler), so a layer run under ``torch.no_grad()`` is caught too. ``receives_gradient``
    is whether the gradient exists (the parameter is in the autograd graph of the loss).

    "From which sites": the surrogate loss is a sum of per-site terms, the rows of the
    ELBO's site-term table (:meth:`~.elbo.RoutedELBO.site_terms`: the model's ``-log p`` at
    each sample site, a pathwise guide site's ``+log q`` through ``rsample``, a score guide
    site's ``-log q(z)`` times its fixed cost, guide factors and observed guide sites too);
    each site's term is differentiated on its own, and a parameter lists site ``n`` when
    ``n``'s term reaches it in the autograd graph. An observed site listed means the
    likelihood's gradient (for a guide parameter: through a pathwise sample). Attribution
    needs a :class:`RoutedELBO`; for another ELBO only the total gradient is reported.

    Bias check (``check_bias=True``): the pathwise gradient is unbiased only for a cost that
    is differentiable in the site; through a step, a threshold, a rounding or an ``argmax``
    autograd sees a zero (or wrong) derivative and the gradient is biased without any sign in
    the loss. Per pathwise site, ``num_draws`` gradient estimates with every site on its route
    are compared with ``num_draws`` estimates with that site alone rerouted to an unbiased
    reference: ``"measure_valued"`` where it applies (a Normal site of at most its
    ``max_evaluations``, code that broadcasts over extra leading dims), else ``"score"`` with
    a leave-one-out baseline over 2 particles. The compared gradients are those of the
    parameters the site's draw depends on (its distribution's parameters, upstream of it); a
    site whose largest elementwise ``|difference of means| / standard error`` exceeds
    ``bias_threshold`` (default :func:`z_threshold` of the elements compared and the draws) is in
    ``audit.pathwise_bias`` (site -> z-score), and the report says what to do. The ELBO of
    the check is a :class:`RoutedELBO` with ``elbo``'s routing options (one particle).
    Costs ``num_draws`` times (1 + the number of pathwise sites) gradient estimates, the
    measure-valued ones ``1 + 3 n`` evaluations each for a site of ``n`` elements per plate
    element.

    Parameter values, ``.grad`` and the global RNG state are left as they were (decaying
    baseline state of a given ``elbo`` too); parameters first created by this call stay in
    the param store.
    """
    if check_bias:
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
            raise ValueError(f"num_draws must be an int >= 2, got {num_draws!r}")
        if bias_threshold is not None and not (
            isinstance(bias_threshold, (int, float)) and bias_threshold > 0
        ):
            raise ValueError(f"bias_threshold must be a number > 0, got {bias_threshold!r}")
    elbo = RoutedELBO() if elbo is None else elbo
    state = elbo.state_dict() if isinstance(elbo, RoutedELBO) else None
    with _Snapshot(_existing_tensors(model, guide)):
        with poutine.trace(param_only=True) as capture:
            if isinstance(elbo, RoutedELBO):
                particles = elbo.site_terms(model, guide, *args, **kwargs)
                loss, surrogate = elbo.loss_and_surrogate(particles)
                routes = dict(elbo.routes)
            else:
                surrogate = elbo.differentiable_loss(model, guide, *args, **kwargs)
                loss, particles, routes = surrogate, None, dict(getattr(elbo, "routes", {}))
        params = _collect_params(capture.trace, model, guide)
        trainable = [p for p in params if p.tensor.requires_grad]
        grads = _grads(surrogate, [p.tensor for p in trainable])
        by_param = {id(p.tensor): g for p, g in zip(trainable, grads)}
        reached: dict[int, list[str]] = {id(p.tensor): [] for p in trainable}
        notes = []
        if particles is not None:
            for site, term in _site_terms(particles, 1.0 / elbo.num_particles).items():
                for p, g in zip(trainable, _grads(term, [p.tensor for p in trainable])):
                    if g is not None:
                        reached[id(p.tensor)].append(site)
        else:
            notes.append(f"{type(elbo).__name__} is not a RoutedELBO: no per-site attribution")
        if state is not None:
            elbo.load_state_dict(state)
        unmatched = unmatched_sites(*probe_traces(model, guide, args, kwargs)[1:])
        checks: dict[str, BiasCheck] = {}
        if check_bias:
            check = _BiasCheckRun(model, guide, args, kwargs, _routing_options(elbo), num_draws)
            checks = check.run(trainable, bias_threshold)
            notes += check.notes
    records = []
    for p in params:
        g = by_param.get(id(p.tensor))
        records.append(
            ParamRecord(
                name=p.name,
                shape=tuple(p.tensor.shape),
                receives_gradient=g is not None,
                grad_norm=float(g.norm()) if g is not None else float("nan"),
                sites=tuple(reached.get(id(p.tensor), ())),
                source=p.source,
                frozen=not p.tensor.requires_grad,
            )
        )
    return GradientAudit(
        routes=routes,
        params=records,
        loss=_item(loss),
        notes=notes,
        unmatched_sites=unmatched,
        bias_checks=checks,
    )


def _routing_options(elbo) -> dict:
    """The keyword arguments of a one-particle :class:`RoutedELBO` routing as ``elbo`` does."""
    if not isinstance(elbo, RoutedELBO):
        return {"max_plate_nesting": getattr(elbo, "max_plate_nesting", float("inf"))}
    return dict(
        max_plate_nesting=elbo.max_plate_nesting,
        fast_path=elbo.fast_path,
        max_enumerate=elbo.options.max_enumerate,
        dependency_tracking=elbo.dependency_tracking,
    )


class _BiasCheckRun:
    """The bias check of :func:`audit_gradients`: pathwise draws once, then per pathwise
    site the draws with that site rerouted to its reference."""

    def __init__(self, model, guide, args, kwargs, options: dict, num_draws: int) -> None:
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.options, self.num_draws = options, num_draws
        self.notes: list[str] = []

    def moments(self, guide, tensors, **options) -> list:
        elbo = RoutedELBO(**{**self.options, **options})
        draws = _gradient_moments(
            elbo, self.model, guide, self.args, self.kwargs, tensors, self.num_draws
        )
        return draws[0]

    def run(self, trainable: list[_Param], threshold: Optional[float]) -> dict[str, BiasCheck]:
        probe = RoutedELBO(**self.options).site_terms(
            self.model, self.guide, *self.args, **self.kwargs
        )
        probe = probe[-1]
        sites = [
            name for name, route in probe.routes.items()
            if base.get(route.estimator).through_the_cost
        ]  # fmt: skip
        if not sites:
            self.notes.append("bias check: no guide site is on the pathwise estimator")
            return {}
        tensors = [p.tensor for p in trainable]
        reached = {}
        for name in sites:
            value = probe.guide_trace.nodes[name]["value"]
            grads = _grads(value.sum(), tensors)
            reached[name] = [p for p, g in zip(trainable, grads) if g is not None]
        union = list({id(p.tensor): p for ps in reached.values() for p in ps}.values())
        union_tensors = [p.tensor for p in union]
        pathwise = dict(zip(map(id, union_tensors), self.moments(self.guide, union_tensors)))
        checks = {}
        for name in sites:
            params = reached[name]
            if not params:
                self.notes.append(f"bias check: no trainable parameter reaches site {name!r}")
                continue
            reference, note, found = self.reference(name, probe.guide_trace.nodes[name], params)
            pairs = [(pathwise[id(p.tensor)], m) for p, m in zip(params, found)]
            checks[name] = self.compare(name, reference, note, params, pairs, threshold)
        return checks

    def forced(self, estimator: str, name: str):
        """The guide with site ``name`` on ``estimator`` and site-level costs: a reference
        that shares no footprint or dependency found for the estimate it checks."""
        messenger = ForceEstimatorMessenger(estimator, [name])
        messenger.extra = {"rao_blackwell": "site"}
        return messenger(self.guide)

    def reference(self, name: str, site: dict, params: list[_Param]):
        """``(reference, note, moments)``: measure-valued where it applies and works, else
        the score function with a leave-one-out baseline; both with site-level costs by
        sampling order (``dependency_tracking="order"``), so that the reference assumes
        no dependency the checked estimate may have missed."""
        tensors = [p.tensor for p in params]
        note = _measure_valued_why_not(site)
        order = {"dependency_tracking": "order"}
        if note is None:
            forced = self.forced("measure_valued", name)
            try:
                return "measure_valued", "", self.moments(forced, tensors, **order)
            except Exception as error:  # noqa: BLE001 - any failure: use the score function
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                note = f"measure_valued failed here ({type(error).__name__}: {first})"
        forced = self.forced("score", name)
        found = self.moments(forced, tensors, num_particles=2, baseline="leave_one_out", **order)
        return "score", note, found

    def compare(self, name, reference, note, params, pairs, threshold) -> BiasCheck:
        n = self.num_draws
        best = (-1.0, "", 0.0, 0.0)
        numel = 0
        for p, ((mean_a, var_a), (mean_b, var_b)) in zip(params, pairs):
            z = _z_scores(mean_a, (var_a / n).sqrt(), mean_b, (var_b / n).sqrt())
            numel += z.numel()
            i = int(z.argmax())
            if float(z[i]) > best[0]:
                index = ", ".join(
                    str(int(k)) for k in torch.unravel_index(torch.tensor(i), p.tensor.shape)
                )
                label = f"{p.name}[{index}]" if p.tensor.dim() else p.name
                best = (float(z[i]), label, float(mean_a[i]), float(mean_b[i]))
        limit = z_threshold(numel, n) if threshold is None else float(threshold)
        z, label, mean_a, mean_b = best
        return BiasCheck(name, reference, z, limit, label, mean_a, mean_b, n, numel, note)


def _measure_valued_why_not(site: dict) -> Optional[str]:
    """Why the measure-valued estimator is not the bias check's reference for ``site``."""
    if "measure_valued" not in ESTIMATORS:
        return "measure_valued is not registered"
    estimator = base.get("measure_valued")
    why_not = estimator.why_not(site["fn"])
    if why_not is None:
        try:
            why_not = estimator.too_many(site["fn"], site["infer"])
        except ValueError as error:
            why_not = str(error)
    return None if why_not is None else f"not measure_valued: {why_not}"


def _item(x: Any) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _grads(loss: Any, tensors: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """``d loss / d tensors`` (``None`` where a tensor is not in the graph)."""
    if not tensors or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return [None] * len(tensors)
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True))


# -------------------------------------------------------------------------- comparison
def _gradient_moments(elbo, model, guide, args, kwargs, tensors, num_draws: int):
    """``num_draws`` independent estimates of the gradient of ``elbo``'s loss with respect
    to ``tensors``: per tensor its elementwise ``(mean, variance)`` (flat, float64,
    ``ddof=1``), and the seconds per draw."""
    sums = [torch.zeros(t.numel(), dtype=torch.float64) for t in tensors]
    squares = [torch.zeros(t.numel(), dtype=torch.float64) for t in tensors]
    shift = None
    start = time.perf_counter()
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
        grads = _grads(loss, tensors)
        flat = [
            (torch.zeros_like(t) if g is None else g).detach().reshape(-1).double()
            for g, t in zip(grads, tensors)
        ]
        if shift is None:  # shifted sums keep the variance numerically stable
            shift = flat
        for s, q, g, c in zip(sums, squares, flat, shift):
            s += g - c
            q += (g - c) ** 2
    seconds = (time.perf_counter() - start) / num_draws
    moments = []
    for s, q, c in zip(sums, squares, shift):
        mean = s / num_draws
        var = ((q - num_draws * mean**2) / (num_draws - 1)).clamp_min(0.0)
        moments.append((mean + c, var))
    return moments, seconds


def _has_fast_path() -> bool:
    return "fast_path" in inspect.signature(RoutedELBO.__init__).parameters


def _split_evaluations(name: str) -> tuple[str, Optional[int]]:
    """``"arms@4"`` -> ``("arms", 4)``: an estimator forced with ``infer["evaluations"]``."""
    base, at, count = name.partition("@")
    if at and count.isdigit():
        return base, int(count)
    return name, None


def _estimator_setup(name, elbo_kwargs: dict):
    """``(RoutedELBO, [ForceEstimatorMessenger, ...])`` for one estimator name, or for a
    per-site configuration ``{site: name}`` (measured with the training ELBO's options)."""
    kwargs = dict(elbo_kwargs)
    if isinstance(name, Mapping):
        return RoutedELBO(**kwargs), [ForceEstimatorMessenger(e, [s]) for s, e in name.items()]
    name, count = _split_evaluations(name)
    if count is not None:  # a registered estimator at count evaluations
        forcer = ForceEstimatorMessenger(name, None, skip_invalid=True)
        forcer.extra = {"evaluations": count}
        return RoutedELBO(**kwargs), [forcer]
    if name == "auto":
        return RoutedELBO(**kwargs), []
    if _has_fast_path():  # the forced estimators are measured as Monte Carlo estimators
        kwargs["fast_path"] = name == "pathwise+kl"
    if name == "pathwise+kl":
        name = "pathwise"
    if name in ("score", "score+avg", "score+loo"):
        kwargs["baseline"] = {"score": None, "score+avg": "decaying_avg"}.get(name, "leave_one_out")
        if name == "score+loo":
            kwargs["num_particles"] = max(2, int(kwargs.get("num_particles", 1)))
        return RoutedELBO(**kwargs), [ForceEstimatorMessenger("score", None, skip_invalid=True)]
    return RoutedELBO(**kwargs), [ForceEstimatorMessenger(name, None, skip_invalid=True)]


def _valid_names() -> tuple[str, ...]:
    return COMPARE_ESTIMATORS + tuple(e for e in ESTIMATORS if e not in COMPARE_ESTIMATORS)


def _configurations(estimators) -> list[tuple[str, Any]]:
    """``(label, spec)`` pairs: names label themselves; a mapping gives labels to names or
    to per-site configurations ``{site: estimator name}``."""
    items = list(estimators.items()) if isinstance(estimators, Mapping) else [
        (e, e) for e in estimators]  # fmt: skip
    valid = _valid_names()
    bad = [
        spec
        for _, spec in items
        if (isinstance(spec, Mapping) and any(e not in ESTIMATORS for e in spec.values()))
        or (not isinstance(spec, Mapping) and spec not in valid
            and _split_evaluations(spec)[0] not in ESTIMATORS)
    ]
    if bad:
        raise ValueError(
            f"unknown estimator(s) {bad}; valid estimators are {', '.join(map(repr, valid))} "
            f"(per site: {', '.join(map(repr, ESTIMATORS))})"
        )
    return items


def compare_estimators(
    model: Callable,
    guide: Callable,
    *args,
    estimators: Sequence[str] | Mapping[str, Any] = ("pathwise", "score"),
    num_draws: int = 1000,
    elbo_kwargs: Optional[dict] = None,
    params: Optional[Sequence[str]] = None,
    seed: int = 0,
    **kwargs,
):
    """Mean, variance, signal-to-noise and cost of ELBO gradient estimators, per parameter.

    For each estimator, ``num_draws`` independent estimates of the gradient of the loss
    (-ELBO) with respect to each parameter (the unconstrained tensors, what an optimizer
    updates) are drawn with ``elbo.differentiable_loss`` and :func:`torch.autograd.grad`.
    Estimators:

    - ``"auto"``: the default routing of :class:`~.elbo.RoutedELBO` (``elbo_kwargs``),
      analytic-KL fast path included where it applies;
    - ``"pathwise"``: forced on every site with ``rsample``; other sites keep their default
      route (listed with the reason in ``df.attrs["skipped"]["pathwise"]``). Measured as the
      Monte Carlo reparameterization estimator: ``fast_path=False``;
    - ``"pathwise+kl"``: the same with the analytic-KL fast path (``fast_path=True``): at
      sites where it applies the ``log p - log q`` pair is the closed-form KL, which has no
      sampling variance of its own;
    - ``"score"``: score function on every latent site, no baseline;
    - ``"score+avg"``: score function with the decaying-average baseline (its state evolves
      across the draws, as in training; draws are therefore not exactly independent);
    - ``"score+loo"``: score function with the leave-one-out baseline, which needs
      ``num_particles >= 2``: each draw is one estimate from a 2-particle ELBO (or
      ``elbo_kwargs["num_particles"]`` if larger), so it costs about twice a 1-particle
      draw and averages two samples -- compare ``variance * seconds_per_draw``;
    - the score variants run with ``fast_path=False`` too (it only concerns pathwise sites);
    - any other name in ``routing.ESTIMATORS`` (``"enumerate"``, ``"disarm"``,
      ``"gumbel_st"``, ``"measure_valued"``, ``"implicit"``, ``"arms"``, ``"double_cv"``,
      ``"rodeo"``, ``"loo"``, registered plug-ins): forced like ``"pathwise"``, on the sites it
      applies to (``"measure_valued"`` is refused on a site of more than its ``max_evaluations``:
      that is an error, not a skip);
    - ``"name@K"`` (``"arms@4"``, ``"disarm@4"``): that estimator with
      ``infer["evaluations"] = K`` on the sites it applies to, to compare the multi-sample
      estimators at equal evaluations.

    ``estimators`` may also map labels to names or to per-site configurations, e.g.
    ``{"default": {}, "y by score": {"y": "score"}}``: each site named is forced onto its
    estimator (an error where it does not apply), the others keep their automatic route,
    and the ELBO is ``RoutedELBO(**elbo_kwargs)`` as in training. The label is the
    ``estimator`` column.

    Returns a ``pandas.DataFrame`` with one row per (estimator, parameter): ``mean`` (sum over
    the parameter's elements of the elementwise mean gradient; the mean itself for a scalar),
    ``mean_norm`` (Euclidean norm of the elementwise mean), ``variance`` (sum over elements of
    the per-draw sample variance, ``ddof=1``; the trace of the covariance), ``snr``
    (``mean_norm / sqrt(variance)``; ``inf`` for a nonzero mean without variance, ``nan`` for
    a parameter that gets no gradient), ``seconds_per_draw``, ``num_draws``, ``numel``,
    ``routes`` (the routes used), and whether the mean agrees with the unbiased estimators':

    - ``z_vs_unbiased``: per element, ``|mean - m_ref| / sqrt(se^2 + se_ref^2)`` with ``se``
      the standard error of the mean (``sqrt(variance / num_draws)``, elementwise) and
      ``m_ref``, ``se_ref`` the inverse-variance pooled mean of the *other* estimators in the
      table that are unbiased for any cost (:data:`UNBIASED_ESTIMATORS`: the score-function
      variants, ``measure_valued``, ``enumerate``, ``disarm``, ``loo``, ``arms``,
      ``double_cv``, ``rodeo``, with any ``@K``; not the pathwise gradient,
      which needs a cost differentiable in the site, nor ``implicit`` (likewise), nor
      ``gumbel_st``); the largest over
      the parameter's elements. ``nan`` when no other such estimator is in the table;
    - ``agrees``: ``z_vs_unbiased <= z_threshold(numel, num_draws)`` (4 standard errors
      for a few elements, more for many: :func:`z_threshold`), ``None`` without a reference. A
      ``False`` for ``pathwise`` with ``True`` for the others is the signature of a cost
      that is not differentiable in a site (``docs/biased_pathwise.md``). ``score+avg``'s
      draws are not independent, so its standard error is a rough guide.

    ``df.attrs["elementwise"][(estimator, param)]`` holds the
    elementwise ``mean`` and ``variance`` as nested lists (``numpy.asarray`` them; lists keep
    ``pandas.concat`` of several results working); ``df.attrs["skipped"][estimator]``
    maps each site left on its default route to the reason.

    ``params``: names to report (default: all, as found by :func:`audit_gradients`). Draws
    are seeded with ``seed``; the global RNG state, parameter values, ``.grad`` and the param
    store (apart from parameters created by a first call) are left as they were.
    """
    import pandas as pd

    configurations = _configurations(estimators)
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an int >= 2, got {num_draws!r}")
    elbo_kwargs = dict(elbo_kwargs or {})

    rows, elementwise, skipped, moments_of = [], {}, {}, {}
    with _Snapshot(_existing_tensors(model, guide)):
        pyro.set_rng_seed(seed)
        with poutine.trace(param_only=True) as capture:  # creates params, finds them
            RoutedELBO(**elbo_kwargs).differentiable_loss(model, guide, *args, **kwargs)
        found = [p for p in _collect_params(capture.trace, model, guide) if p.tensor.requires_grad]
        if params is not None:
            names = [p.name for p in found]
            params = [display_name(n) for n in params]
            unknown = [n for n in params if n not in names]
            if unknown:
                raise ValueError(f"unknown params {unknown}; parameters are {names}")
            found = [p for p in found if p.name in params]
        tensors = [p.tensor for p in found]
        with _Snapshot(tensors):  # also restores .grad of params created above
            for name, spec in configurations:
                elbo, forcers = _estimator_setup(spec, elbo_kwargs)
                fn = guide
                for forcer in forcers:
                    fn = forcer(fn)
                moments, seconds = _gradient_moments(
                    elbo, model, fn, args, kwargs, tensors, num_draws
                )
                skipped[name] = {k: v for f in forcers for k, v in f.skipped.items()}
                routes = ", ".join(
                    f"{r.site}:{r.estimator}"
                    + (f"({r.baseline})" if r.baseline is not None else "")
                    for r in elbo.routes.values()
                )
                for p, (mean, var) in zip(found, moments):
                    total_var = float(var.sum())
                    mean_norm = float(mean.norm())
                    snr = mean_norm / math.sqrt(total_var) if total_var > 0 else float("inf")
                    if total_var == 0 and mean_norm == 0:
                        snr = float("nan")
                    rows.append(
                        dict(
                            estimator=name,
                            param=p.name,
                            mean=float(mean.sum()),
                            mean_norm=mean_norm,
                            variance=total_var,
                            snr=snr,
                            seconds_per_draw=seconds,
                            num_draws=num_draws,
                            numel=p.tensor.numel(),
                            routes=routes,
                        )
                    )
                    moments_of[(name, p.name)] = (mean, var)
                    elementwise[(name, p.name)] = {
                        "mean": mean.reshape(p.tensor.shape).tolist(),
                        "variance": var.reshape(p.tensor.shape).tolist(),
                    }
    unbiased = [
        n
        for n, spec in configurations
        if isinstance(spec, str) and _split_evaluations(spec)[0] in UNBIASED_ESTIMATORS
    ]
    for row in rows:
        row["z_vs_unbiased"], row["agrees"] = _agreement(
            row["estimator"], row["param"], row["numel"], unbiased, moments_of, num_draws
        )
    columns = [
        "estimator", "param", "mean", "mean_norm", "variance", "snr",
        "seconds_per_draw", "num_draws", "numel", "routes", "z_vs_unbiased", "agrees",
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["skipped"] = skipped
    df.attrs["elementwise"] = elementwise
    df.attrs["seed"] = seed
    return df


def _agreement(name, param, numel, unbiased, moments_of, num_draws) -> tuple[float, Any]:
    """``(z_vs_unbiased, agrees)`` of one row of :func:`compare_estimators` (see there)."""
    others = [moments_of[(n, param)] for n in unbiased if n != name]
    if not others:
        return float("nan"), None
    precision = sum(1 / (var / num_draws).clamp_min(1e-300) for _, var in others)
    pooled = sum(m / (var / num_draws).clamp_min(1e-300) for m, var in others) / precision
    mean, var = moments_of[(name, param)]
    z = float(_z_scores(mean, (var / num_draws).sqrt(), pooled, precision.rsqrt()).max())
    return z, z <= z_threshold(numel, num_draws)
