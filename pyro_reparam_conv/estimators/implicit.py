"""Implicit reparameterization: pathwise gradients through a draw that has no ``rsample``.

For a univariate ``z ~ q_phi`` with a CDF ``F(z; phi)`` differentiable in ``phi``, the draw
``z = F^{-1}(u; phi)`` of a uniform ``u`` held fixed moves with ``phi`` as

    dz/dphi = -(dF(z; phi)/dphi) / q_phi(z)

(differentiate ``F(z(phi); phi) = u``; Figurnov, Mohamed & Mnih 2018, "Implicit
Reparameterization Gradients", NeurIPS, eq. 4). No inverse CDF is needed: the value is
drawn by the distribution's own ``sample()`` (``z0``, no gradient) and the site's value is

    z = z0 - (F(z0; phi) - stop_grad(F(z0; phi))) / stop_grad(q(z0))

whose value is exactly ``z0`` and whose derivative in ``phi`` is the one above; every term
downstream (the model, ``log q(z)`` itself) is then differentiated through ``z`` as the
pathwise estimator does through ``rsample`` (score parts ``(log q, 0, log q)``). Where
``q(z0)`` is 0 or below the dtype's smallest normal number the draw gets no gradient (no
NaN). Supported, through ``Independent``, ``.expand`` and masks (elementwise, so batch
shapes, event shapes and plates as usual):

- any continuous univariate distribution whose ``cdf`` is implemented and differentiable
  (torch's own, a ``TransformedDistribution`` through monotone transforms, ...);
- von Mises: torch has no CDF for it; :func:`von_mises_cdf` is the series of Hill (1977,
  ACM Algorithm 518) for concentration below 50 (its Bessel ratios by a trapezoid rule on
  the circle rather than his recurrence) and his corrected normal approximation above (the
  choices of ``scipy.stats.vonmises`` and, with fewer digits, TFP's ``von_mises_cdf``:
  about 12 digits), differentiable by autograd in the angle and the concentration;
  ``F(z; loc, kappa) = von_mises_cdf(z - loc, kappa)``, unwrapped so that it is continuous
  and increasing on the real line. The draw lies in ``[-pi, pi)``: a cost of an angle must
  be continuous on the circle (periodic), or its jump at ``+-pi`` is a cost not
  differentiable in the site (biased, as for any pathwise gradient; the bias check sees it);
- ``MixtureSameFamily`` of such components, by default **its components side by side**
  (``infer={"implicit_mixture": "components"}``): the mixture is the law of ``z ~ q_c``
  after ``c ~ Categorical(w)``, so ``E_q[f(z)] = sum_k w_k E_{q_k}[f(z)]``, and with one
  draw ``z_k`` of each component, carrying the component's own gradient (its ``rsample``,
  else its implicit one, univariate or per element), ``sum_k w_k f(z_k)`` is an unbiased
  estimate of ``E_q[f]`` whose derivative is an unbiased estimate of the gradient: ``sum_k
  (dw_k/dphi) f(z_k)`` for the weights (the component index summed exactly, no score
  function: only the variation of ``f`` within a component, not the gap between
  components, enters) plus ``sum_k w_k d f(z_k)/dphi`` for the components (stratified: one
  draw of each instead of a draw of one). ``f`` here is the whole ELBO term, ``log p(x, z)
  - log q(z)`` with the mixture's own density; its direct dependence on the parameters
  through ``log q`` enters the derivative too (its expectation is 0 either way). The ``K``
  values lie side by side along an evaluation dim, weighted by ``w_k`` per element of the
  site's plates (as the exact sum over a discrete site's support is, by ``q(k)``; Pyro's
  ``TraceEnum_ELBO`` would enumerate ``c`` the same way for a guide written as ``c`` then
  ``z | c``): ``K`` evaluations of everything that depends on the site. A mixture of more than
  ``MAX_COMPONENTS_SIDE_BY_SIDE`` (16) components draws once unless asked, as routing
  enumerates at most ``max_enumerate`` values. This is the
  stratified ELBO of Morningstar et al. (2021, "Automatic Differentiation Variational
  Inference with Mixtures", AISTATS) with one draw per component. It needs the component
  index per element of the site's plates: a mixture whose batch dims are an event
  (``.to_event``: a map of independent mixtures) would need ``K`` to the number of
  elements, and gets one draw as below (so does a site whose values side by side fail, the
  route saying why). On ``benchmarks/implicit.py``'s mixture of 3 diagonal Gaussians in
  ``D = 8`` and ``64`` dims (the README has the table) the weights' gradient has 45-250x less
  variance than one draw's and the components' 4.4-4.7x less, the total 0.005-0.2x that of
  Pyro's ``MixtureOfDiagNormals`` and 145-460x less than the best score-function route, at
  0.8-0.9x the time per step of the former and 1.2-1.5x that of the latter. The other way to
  avoid a pathwise gradient of the weights, the score function of the component index with
  the index Rao-Blackwellized given ``z`` (its conditional expectation is the mixture's own
  score in the weights, ``r_k(z) - w_k`` per logit), left ``(f(z) - b) (r(z) - w)`` with the
  best constant baseline ``b = E_q[f]`` 5-11x more variance in the weights than the
  components side by side (measured on the same mixture). One draw per particle
  (``"responsibilities"`` and ``"transform"``): univariate components, ``F(z) = sum_k w_k
  F_k(z)``. Diagonal multivariate components (``Independent(univariate, 1)``, event of ``D``
  dims): the distributional transform (Graves 2016, "Stochastic Backpropagation through
  Mixture Density Distributions") maps ``z`` to ``D`` uniforms dimension by dimension, with
  the conditional CDF of ``z_d`` given ``z_<d``, ``F_d(z_d | z_<d) = sum_k pi_kd F_kd(z_d)``,
  ``pi_kd`` the posterior weights ``w_k prod_{j<d} q_kj(z_j)`` normalized; the implicit
  derivative of ``z_d`` is the total one, ``-(dF_d/dphi + sum_{j<d} dF_d/dz_j dz_j/dphi) /
  q_d(z_d | z_<d)``. In more than one dimension the velocity ``dz/dphi`` is not unique: any
  field ``v`` with ``dq/dphi + div(q v) = 0`` (the continuity equation) gives an unbiased
  gradient, and one may be chosen per parameter (Jankowiak & Obermeyer 2018, "Pathwise
  Derivatives Beyond the Reparameterization Trick").
  ``infer={"implicit_mixture": "responsibilities"}`` takes the transform's field for the
  mixture weights only, and for the parameters of component ``k`` its own implicit field
  weighted by its posterior responsibility, ``dz_j/dphi_k = r_k(z) (-(dF_kj(z_j)/dphi_k) /
  q_kj(z_j))`` with ``r_k = w_k q_k(z) / q(z)`` (it solves the continuity equation because
  each component's field solves its own; in one dimension both are the transform's). On
  ``benchmarks/implicit.py``'s mixture the transform's field for the components' parameters
  has 12-20x the variance of this one. The transform's field for the weights is linear in
  the derivatives of ``z_<d``: a unit lower-triangular system, solved at once
  (``torch.linalg.solve_triangular``) with ``dF_d/dz_j`` from the components' scores at the
  draw. It depends on the order of the dimensions (the first carries all of the mass
  between components across the gaps between them): the mean of the fields of 4 cyclic
  orders, also a solution, had 6.6x less variance in the weights at ``D = 8`` and 300x
  more at ``D = 64`` (an order that starts on a dimension separating the components), so
  the order is the event's own. ``infer={"implicit_mixture": "transform"}`` takes the
  transform's field for every parameter, dimension by dimension (``D`` evaluations of the
  components' densities).

Routing prefers it to every estimator for distributions without ``rsample`` (priority 5:
after ``pathwise``, before enumeration); discrete distributions and distributions whose
CDF is not implemented are refused with the reason. Its gradient goes through the cost, as
the pathwise gradient's does (``through_the_cost``: the bias check applies), and the
analytic KL of the fast path applies where a closed form exists.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import (
    Distribution,
    Independent,
    MixtureSameFamily,
    TransformedDistribution,
    VonMises,
)

from ..distributions import distribution_name
from ..sparsity import distribution_tensors
from .base import Estimator, Layout, RoutingOptions, register

__all__ = ["ImplicitEstimator", "component_draws", "implicit_value", "von_mises_cdf"]

#: below this concentration the series, above it the normal approximation (Hill 1977)
VON_MISES_SERIES_BELOW = 50.0
_TWO_PI = 2 * math.pi


def _series_terms(concentration: float) -> int:
    """Hill's number of series terms for 12 digits at ``concentration`` (scipy's choice)."""
    return int(1 + 28.0 + 0.5 * concentration - 100.0 / (concentration + 5.0))


#: the series' terms, enough for every concentration below the cut-off
SERIES_TERMS = _series_terms(VON_MISES_SERIES_BELOW)
#: nodes of the trapezoid rule for the Bessel ratios of the series
RATIO_NODES = 128


def _von_mises_series(x: torch.Tensor, kappa: torch.Tensor, terms: int) -> torch.Tensor:
    """``1/2 + x / (2 pi) + V / pi`` with ``V = sum_{n < terms} rho_n sin(n x) / n`` and the
    Bessel ratios ``rho_n = I_n(kappa) / I_0(kappa) = E[cos(n t)]`` under ``exp(kappa cos
    t)``: the trapezoid rule on :data:`RATIO_NODES` equispaced nodes of the circle, exact to
    rounding for a periodic analytic integrand (its error is of the order of
    ``I_{nodes - n} / I_n``, below 1e-13 for ``n <= 52``, ``kappa < 50``). A few tensor
    operations instead of a loop of ``terms`` steps (Hill's backward recurrence)."""
    t = torch.arange(RATIO_NODES, dtype=x.dtype, device=x.device) * (_TWO_PI / RATIO_NODES)
    n = torch.arange(1, terms, dtype=x.dtype, device=x.device)
    weight = torch.exp(kappa.unsqueeze(-1) * (torch.cos(t) - 1.0))
    rho = (weight @ torch.cos(torch.outer(t, n))) / weight.sum(-1, keepdim=True)
    v = (rho * torch.sin(x.unsqueeze(-1) * n) / n).sum(-1)
    return 0.5 + x / _TWO_PI + v / math.pi


def _von_mises_normal(x: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Hill's corrected normal approximation: ``Phi(xi)`` for ``z = sqrt(2 / pi) e^kappa /
    I_0(kappa) sin(x / 2)`` and ``xi = z - z^3 / ((c - 2 z^2 - 16) / 3 - (z^4 + 7/4 z^2 +
    167/2) / (c - 56 - z^2 + 3))^2``, ``c = 24 kappa`` (as TFP writes it)."""
    z = math.sqrt(2 / math.pi) / torch.special.i0e(kappa) * torch.sin(0.5 * x)
    z2 = z * z
    c = 24.0 * kappa
    y = (c - 2.0 * z2 - 16.0) / 3.0 - (z2 * z2 + 1.75 * z2 + 83.5) / (c - 56.0 - z2 + 3.0)
    xi = z - z2 * z / y.square()
    return 0.5 * torch.special.erfc(-xi / math.sqrt(2.0))


def von_mises_cdf(x: torch.Tensor, concentration: torch.Tensor) -> torch.Tensor:
    """CDF of the von Mises law of mean 0 at angle ``x``, unwrapped: ``P(-pi <= X <= x)`` on
    ``[-pi, pi]`` plus the number of whole periods, so continuous and increasing on the
    real line. Computed in float64 (about 12 digits, against ``scipy.stats.vonmises.cdf``),
    returned in the inputs' dtype; differentiable in both arguments by autograd."""
    x, concentration = torch.broadcast_tensors(torch.as_tensor(x), torch.as_tensor(concentration))
    dtype = torch.promote_types(x.dtype, concentration.dtype)
    x64, kappa = x.double(), concentration.double()
    periods = torch.round(x64 / _TWO_PI).detach()
    x64 = x64 - _TWO_PI * periods
    small = kappa < VON_MISES_SERIES_BELOW
    # each branch on inputs where it is valid, so that neither puts NaN into the gradient
    kappa_small = torch.where(small, kappa, torch.ones_like(kappa))
    kappa_large = torch.where(small, torch.full_like(kappa, VON_MISES_SERIES_BELOW), kappa)
    # Hill's term count at the cut-off, for every element: reading the largest
    # concentration would turn a tensor into a Python number (a value leaving the graph,
    # which the dependency analysis must treat as control flow); extra terms cost time only
    series = _von_mises_series(x64, kappa_small, SERIES_TERMS)
    cdf = torch.where(small, series, _von_mises_normal(x64, kappa_large)).clamp(0.0, 1.0)
    return (cdf + periods).to(dtype if dtype.is_floating_point else torch.get_default_dtype())


# ------------------------------------------------------------------ CDFs of distributions
_WRAPPERS = (Independent, ExpandedDistribution, MaskedDistribution)


def _unwrap(fn):
    """The distribution inside ``Independent``, ``.expand`` and mask wrappers (they change
    no element's law)."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def _mixture_components(fn: MixtureSameFamily):
    """``(univariate component distribution, D or None)``: ``None`` for univariate
    components, ``D`` for ``Independent(univariate, 1)`` components of ``D`` dims."""
    component = fn.component_distribution
    if not component.event_shape:
        return _unwrap(component), None
    if len(component.event_shape) == 1 and isinstance(component, Independent):
        base = component.base_dist
        if component.reinterpreted_batch_ndims == 1 and not base.event_shape:
            return _unwrap(base), component.event_shape[0]
    return None, None


def _cdf_why_not(fn) -> Optional[str]:
    """Why the implicit gradient cannot use ``fn``'s CDF (elementwise), or ``None``."""
    fn = _unwrap(fn)
    name = distribution_name(fn)
    if fn.support.is_discrete:
        return f"{name} is discrete"
    if isinstance(fn, VonMises):
        return None
    if isinstance(fn, MixtureSameFamily):
        component, _ = _mixture_components(fn)
        if component is None:
            return (
                f"{name}: its components {distribution_name(fn.component_distribution)} do not "
                "factorize (univariate, or Independent(univariate, 1) for the distributional "
                "transform)"
            )
        why = _cdf_why_not(component)
        return None if why is None else f"{name}: its components: {why}"
    if fn.event_shape:
        return f"{name} is not univariate (event shape {tuple(fn.event_shape)}) nor a mixture"
    if getattr(type(fn), "cdf", Distribution.cdf) is Distribution.cdf:
        return f"{name} has no cdf"
    if type(fn) in _CDF_WORKS:
        return None
    params = [t for t in distribution_tensors(fn) if t.requires_grad]
    try:  # on a draw, the global random state left as it was
        with torch.random.fork_rng(devices=[]):
            with torch.no_grad():
                value = fn.sample()
            with torch.enable_grad():
                cdf = fn.cdf(value)
                if params and cdf.requires_grad:  # its derivative in the parameters exists
                    torch.autograd.grad(cdf.sum(), params, allow_unused=True)
    except NotImplementedError as error:
        first = (str(error).strip().splitlines() or [""])[0]
        return f"{name}: its cdf has no derivative in its parameters in torch ({first})"
    except Exception as error:  # noqa: BLE001 - any failure: no usable cdf, say which
        first = (str(error).strip().splitlines() or [""])[0]
        return f"{name}: its cdf could not be evaluated on a draw ({type(error).__name__}: {first})"
    if params and not isinstance(fn, TransformedDistribution):  # transforms decide per instance
        _CDF_WORKS.add(type(fn))  # its cdf and its derivative were evaluated: not repeated
    return None


#: distribution classes whose cdf and its derivative in the parameters were evaluated on a
#: draw (the check is not repeated)
_CDF_WORKS: set = set()


def _cdf(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn``'s CDF at ``value`` elementwise (``fn`` unwrapped, univariate), broadcasting."""
    if isinstance(fn, VonMises):
        return von_mises_cdf(value - fn.loc, fn.concentration)
    if isinstance(fn, MixtureSameFamily):  # univariate components: sum_k w_k F_k
        component = _unwrap(fn.component_distribution)
        weights = fn.mixture_distribution.probs
        return (weights * _cdf(component, value.unsqueeze(-1))).sum(-1)
    return fn.cdf(value)


def _density(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn``'s density at ``value`` (von Mises: in float64 with ``i0e``, as accurate as
    :func:`von_mises_cdf`; torch's ``log_prob`` has float32 accuracy)."""
    if isinstance(fn, VonMises):
        x, kappa = (value - fn.loc).double(), fn.concentration.double()
        density = torch.exp(kappa * (torch.cos(x) - 1)) / (_TWO_PI * torch.special.i0e(kappa))
        return density.to(value.dtype)
    return fn.log_prob(value).exp()


def _shift(z0: torch.Tensor, cdf: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """``z0 - (F - stop_grad(F)) / stop_grad(q)``: the value ``z0``, the derivative
    ``-dF / q``; no gradient where ``q`` is 0 or subnormal."""
    density = density.detach()
    usable = density > torch.finfo(density.dtype).tiny
    safe = torch.where(usable, density, torch.ones_like(density))
    step = torch.where(usable, (cdf - cdf.detach()) / safe, torch.zeros_like(cdf))
    return z0 - step.to(z0.dtype)


def _univariate_value(fn, z0: torch.Tensor) -> torch.Tensor:
    base = _unwrap(fn)
    return _shift(z0, _cdf(base, z0), _density(base, z0))


def _distributional_transform(fn: MixtureSameFamily, z0: torch.Tensor) -> torch.Tensor:
    """The mixture of diagonal components, dimension by dimension (Graves 2016)."""
    component, size = _mixture_components(fn)
    log_w = fn.mixture_distribution.logits.log_softmax(-1)  # (..., K)
    fixed = z0.unsqueeze(-2)  # (..., 1, D) against the components' (..., K, D)
    cdfs = _cdf(component, fixed)  # F_kd(z0_d), differentiable in phi
    log_q0 = component.log_prob(fixed).detach()  # q_kd(z0_d), for the denominators
    built = []
    log_prior = torch.zeros_like(log_w)  # sum_{j<d} log q_kj(z_j), through the built z_j
    for d in range(size):
        log_post = torch.log_softmax(log_w + log_prior, -1)  # pi_k^d
        cdf = (log_post.exp() * cdfs[..., d]).sum(-1)
        density = torch.logsumexp(log_post.detach() + log_q0[..., d], -1).exp()
        built.append(_shift(z0[..., d], cdf, density))
        if d + 1 < size:
            column = built[-1].unsqueeze(-1).expand_as(cdfs[..., d])
            log_prior = log_prior + _column_log_prob(component, column, d, fixed)
    return torch.stack(built, -1)


def _responsibilities(fn: MixtureSameFamily, z0: torch.Tensor) -> torch.Tensor:
    """The mixture of diagonal components: its weights by the distributional transform, its
    components' parameters by their own implicit gradients weighted by the posterior
    responsibilities (module docstring), all at once (a triangular solve, no loop)."""
    component, size = _mixture_components(fn)
    log_w = fn.mixture_distribution.logits.log_softmax(-1)  # (..., K), differentiable
    fixed = z0.unsqueeze(-2)  # (..., 1, D) against the components' (..., K, D)
    cdfs = _cdf(component, fixed)  # F_kd(z0_d), differentiable in the components' parameters
    shape = torch.broadcast_shapes(cdfs.shape, fixed.shape)
    with torch.enable_grad():  # d/dz log q_kd at z0: how F_d moves with z_<d
        probe = fixed.detach().expand(shape).clone().requires_grad_(True)
        log_q = component.log_prob(probe)
        (score,) = torch.autograd.grad(log_q.sum(), probe)
    tiny = torch.finfo(z0.dtype).tiny
    usable = log_q.detach().exp() > tiny  # elsewhere no gradient, and no NaN from 0 * inf
    score = torch.where(usable, score, torch.zeros_like(score))
    log_q = log_q.detach().clamp_min(-1e30)  # finite: sums and softmaxes stay defined
    # components: sum_k r_k(z0) (-(dF_kd / dphi) / q_kd), r_k = w_k q_k(z0) / q(z0)
    resp = torch.softmax(log_w.detach() + log_q.sum(-1), -1).unsqueeze(-1)
    step = (cdfs - cdfs.detach()) / torch.where(usable, log_q.exp(), torch.ones_like(log_q))
    moved = -(resp * torch.where(usable, step, torch.zeros_like(step))).sum(-2)
    # weights: the distributional transform, linearized at z0 (first derivatives are exact)
    before = torch.cat([torch.zeros_like(log_q[..., :1]), log_q[..., :-1]], -1).cumsum(-1)
    prior = log_w.detach().unsqueeze(-1) + before  # log w_k q_k(z0_<d)
    post = torch.softmax(prior, -2)  # pi_kd
    cdf = (post * cdfs.detach()).sum(-2, keepdim=True)  # F_d(z0_d | z0_<d)
    density = torch.logsumexp(prior + log_q, -2, keepdim=True) - torch.logsumexp(prior, -2, True)
    density = density.exp()
    ok = density > tiny
    g = torch.where(ok, post * (cdfs.detach() - cdf) / torch.where(ok, density, 1.0), 0.0)
    eps = (log_w - log_w.detach()).unsqueeze(-1)  # zero-valued, carries d log w_k / dphi
    c = -(g * eps).sum(-2)  # (..., D)
    lower = torch.ones(size, size, dtype=torch.bool, device=z0.device).tril(-1)
    a = torch.where(lower, torch.einsum("...kd,...kj->...dj", g, score), 0.0)
    c = c.expand(a.shape[:-1])
    eye = torch.eye(size, dtype=a.dtype, device=a.device)
    weights = torch.linalg.solve_triangular(eye + a, c.unsqueeze(-1), upper=False)
    return z0 + moved + weights.squeeze(-1)


def _column_log_prob(component, column, d, fixed) -> torch.Tensor:
    """``log q_kd(column)`` (``column``: ``(..., K)``): the components' densities with
    dimension ``d`` set to ``column`` and the others at the draw."""
    values = fixed.expand(column.shape + (fixed.shape[-1],))
    mask = torch.zeros(values.shape[-1], dtype=torch.bool, device=values.device)
    mask[d] = True
    values = torch.where(mask, column.unsqueeze(-1), values)
    return component.log_prob(values)[..., d]


#: how the gradient of a mixture is obtained (``infer={"implicit_mixture": ...}``): its
#: components side by side, weighted by the mixture's weights (the default, where the
#: component index is per element of the site's plates); one draw, the weights by the
#: distributional transform and the components by their responsibilities; one draw, all by
#: the transform (module docstring)
MIXTURE_GRADIENTS = ("components", "responsibilities", "transform")


def implicit_value(fn, z0: torch.Tensor, mixture: str = "responsibilities") -> torch.Tensor:
    """The draw ``z0`` of ``fn`` with its implicit reparameterization gradient (its value is
    ``z0``); ``fn`` as :meth:`ImplicitEstimator.why_not` accepts it; ``mixture``: how one
    draw of a mixture of diagonal components gets its gradient, ``"responsibilities"`` or
    ``"transform"`` (``"components"`` is not one draw: :func:`component_draws`)."""
    base = _unwrap(fn)
    if isinstance(base, MixtureSameFamily) and base.event_shape:
        if mixture == "transform":
            return _distributional_transform(base, z0)
        if mixture != "responsibilities":
            raise ValueError(f"one draw of a mixture: 'responsibilities' or 'transform', not "
                             f"{mixture!r}")  # fmt: skip
        return _responsibilities(base, z0)
    return _univariate_value(fn, z0)


def component_draws(fn, batch_shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, weights)`` of a mixture ``fn`` (through ``.expand`` and masks): one draw
    of each of its ``K`` components for every element of ``batch_shape`` (default
    ``fn.batch_shape``), ``values`` of shape ``(K,) + batch_shape + event_shape``, each
    with its component's own gradient (``rsample``, else the implicit one); ``weights``
    of shape ``(K,) + batch_shape``, the mixture's ``w_k``, differentiable.
    ``sum_k weights[k] f(values[k])`` is an unbiased estimate of ``E_q[f(z)]`` whose
    gradient is unbiased too (module docstring)."""
    mix = _unwrap(fn)
    batch = torch.Size(fn.batch_shape if batch_shape is None else batch_shape)
    component = mix.component_distribution
    k = component.batch_shape[-1]
    component = component.expand(batch + (k,))
    if component.has_rsample:
        z = component.rsample()
    else:
        z = implicit_value(component, component.sample().detach())
    values = z.movedim(-1 - len(component.event_shape), 0)
    weights = mix.mixture_distribution.probs.movedim(-1, 0).expand((k,) + batch)
    return values, weights


def _per_element_mixture(fn) -> Optional[MixtureSameFamily]:
    """``fn``'s mixture if its component index is per element of ``fn``'s batch (no
    ``to_event`` over the mixture's batch dims), else ``None``."""
    while isinstance(fn, _WRAPPERS):
        if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims:
            return None
        fn = fn.base_dist
    return fn if isinstance(fn, MixtureSameFamily) else None


def _batch_in_plates(msg: dict) -> bool:
    """Whether every batch dim of the site of more than one element is a plate's (as Pyro's
    shape check requires)."""
    plates = {f.dim for f in msg["cond_indep_stack"] if f.vectorized}
    batch = msg["fn"].batch_shape
    return all(n == 1 or i - len(batch) in plates for i, n in enumerate(batch))


#: the most components a mixture gets side by side without being asked (``K`` evaluations of
#: everything downstream; as many as routing enumerates, ``RoutingOptions.max_enumerate``)
MAX_COMPONENTS_SIDE_BY_SIDE = 16


def _mixture_option(infer: dict, fn=None) -> str:
    """The site's ``implicit_mixture``: as asked, else the components side by side where a
    mixture ``fn`` has at most :data:`MAX_COMPONENTS_SIDE_BY_SIDE` of them, else one draw."""
    default = MIXTURE_GRADIENTS[0]
    mix = None if fn is None else _unwrap(fn)
    if isinstance(mix, MixtureSameFamily):
        if mix.mixture_distribution.logits.shape[-1] > MAX_COMPONENTS_SIDE_BY_SIDE:
            default = "responsibilities"
    option = infer.get("implicit_mixture", default)
    if option not in MIXTURE_GRADIENTS:
        raise ValueError(
            f"infer['implicit_mixture'] must be one of {', '.join(map(repr, MIXTURE_GRADIENTS))}"
            f", got {option!r}"
        )
    return option


def _one_draw_option(infer: dict) -> str:
    option = _mixture_option(infer)
    return "responsibilities" if option == "components" else option


class ImplicitDraw(Layout):
    """One draw by ``fn.sample()`` whose value carries the implicit gradient; a mixture's
    ``K`` components side by side (one draw each), weighted by ``w_k`` per element of the
    site's plates."""

    local_weights = True  # the components' weights: per element of the plates

    def site_evaluations(self, msg: dict) -> int:
        mix = _per_element_mixture(msg["fn"])
        if mix is None or _mixture_option(msg["infer"], msg["fn"]) != "components":
            return 1
        if not _batch_in_plates(msg):
            return 1
        return mix.mixture_distribution.logits.shape[-1]

    def draw(self, msg: dict, dim=None) -> None:
        if msg["value"] is not None:
            return
        fn = msg["fn"]
        if dim is None:
            z0 = fn.sample(*msg["args"], **msg["kwargs"]).detach()
            msg["value"] = implicit_value(fn, z0, _one_draw_option(msg["infer"]))
            return
        values, _ = component_draws(fn)
        pad = (1,) * (-1 - dim - len(fn.batch_shape))
        msg["value"] = values.reshape(values.shape[:1] + pad + values.shape[1:])

    def weights(self, site: dict, dim: int) -> torch.Tensor:
        fn = site["fn"]
        probs = _unwrap(fn).mixture_distribution.probs  # w_k, differentiable
        k, batch = probs.shape[-1], tuple(fn.batch_shape)
        weights = probs.movedim(-1, 0).expand((k,) + batch)
        return weights.reshape((k,) + (1,) * (-1 - dim - len(batch)) + batch)


class ImplicitEstimator(Estimator):
    """Implicit reparameterization through a differentiable CDF (module docstring)."""

    name = "implicit"
    priority = 5  # after pathwise (rsample), before every estimator without rsample
    takes_analytic_kl = True
    through_the_cost = True
    layout = ImplicitDraw()
    hint_when_refused = (
        "; it needs a continuous distribution with a differentiable cdf (univariate or "
        "factorized), a MixtureSameFamily of such components, or a VonMises; use 'score'"
    )

    def why_not(self, fn) -> Optional[str]:
        return _cdf_why_not(fn)

    def auto_why_not(self, fn, options: RoutingOptions) -> Optional[str]:
        # a discrete site is skipped silently: its route's reason lists the rules for it
        return "" if _unwrap(fn).support.is_discrete else self.why_not(fn)

    def note(self, fn, infer: dict) -> str:
        base, option = _unwrap(fn), _mixture_option(infer, fn)  # a bad option: an error here
        if isinstance(base, MixtureSameFamily):
            k = base.mixture_distribution.logits.shape[-1]
            if option == "components" and _per_element_mixture(fn) is not None:
                return (
                    f"implicit reparameterization of its mixture's {k} components side by side "
                    f"({k} evaluations per element of its plates, weighted by the "
                    "differentiable weights w_k), each drawn with its own pathwise or implicit "
                    "gradient: no score function"
                )
            if "implicit_mixture" not in infer and k > MAX_COMPONENTS_SIDE_BY_SIDE:
                how = f"one draw ({k} components > {MAX_COMPONENTS_SIDE_BY_SIDE} side by side): "
                return how + self.note(fn, {"implicit_mixture": option})
            if not base.event_shape:
                how = "its mixture's cdf sum_k w_k F_k"
            elif option == "transform":
                how = "the distributional transform of its mixture, dimension by dimension"
            else:
                how = (
                    "the distributional transform of its mixture's weights and its components' "
                    "cdfs weighted by their responsibilities"
                )
        elif isinstance(base, VonMises):
            how = "the von Mises cdf (series / normal approximation)"
        else:
            how = "its cdf"
        return f"implicit reparameterization through {how}: dz/dphi = -(dF/dphi) / q(z)"

    def one_draw(self, infer: dict) -> Optional[dict]:
        if _mixture_option(infer) == "components":  # a mixture's components: one draw
            return {**infer, "implicit_mixture": "responsibilities"}
        return infer

    def has_score_function(self, fn) -> bool:
        return False

    def score_parts(self, site: dict) -> ScoreParts:
        return ScoreParts(site["log_prob"], 0.0, site["log_prob"])


register(ImplicitEstimator())
