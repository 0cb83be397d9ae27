"""Implicit reparameterization gradients (Figurnov et al. 2018) for sites without rsample.

Checked against numbers computed another way:

- the von Mises CDF against ``scipy.stats.vonmises.cdf`` (concentration below 50, where
  scipy sums the series) and against adaptive quadrature of the density (above, where scipy
  uses a cruder normal approximation than Hill's corrected one), both to float64 precision;
  its derivatives against central differences and the density;
- the derivative of each draw, ``dz/dphi``, against central differences of the inverse CDF
  solved by bisection in float64 at ``phi +- h`` with the uniform held fixed (for the
  mixture of diagonal Gaussians, the inverse of the distributional transform, dimension by
  dimension, with the conditional CDFs written out here): float tolerance;
- the mean gradient of ``E[f(z)]`` for several ``f`` against the gradient of the
  expectation by quadrature on a grid (one- and two-dimensional), within 4.5 standard
  errors at fixed seeds, and the ELBO's gradient through ``RoutedELBO`` the same way;
- routes, refusals, analytic KL, vectorized particles, a map site beside element-level
  costs, ``compare_estimators`` and the bias check.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch
from exact import (
    assert_unbiased,
    draw_gradients,
    gaussian_guide,
    gaussian_model,
    gaussian_params_and_exact_gradients,
    param,
)

from pyro_reparam_conv import RoutedELBO, audit_gradients, compare_estimators, force_estimator
from pyro_reparam_conv.estimators.implicit import component_draws, implicit_value, von_mises_cdf

F64 = torch.float64
IMPLICIT = {"estimator": "implicit"}


# ------------------------------------------------------------------- von Mises CDF
@pytest.mark.parametrize("kappa", [1e-3, 0.3, 1.0, 4.0, 12.0, 30.0, 49.9])
def test_von_mises_cdf_matches_scipy_where_scipy_sums_the_series(kappa):
    x = np.linspace(-3 * math.pi, 3 * math.pi, 301)
    ours = von_mises_cdf(torch.tensor(x), torch.tensor(kappa, dtype=F64)).numpy()
    np.testing.assert_allclose(ours, scipy.stats.vonmises.cdf(x, kappa), rtol=0, atol=1e-13)
    ours32 = von_mises_cdf(torch.tensor(x, dtype=torch.float32), torch.tensor(kappa))
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), scipy.stats.vonmises.cdf(x, kappa), atol=5e-6)


@pytest.mark.parametrize("kappa", [50.0, 80.0, 300.0, 5000.0])
def test_von_mises_cdf_matches_quadrature_above_the_series(kappa):
    def pdf(t):
        return np.exp(kappa * (np.cos(t) - 1)) / (2 * math.pi * scipy.special.i0e(kappa))

    x = np.linspace(-4, 4, 33) / math.sqrt(kappa)
    exact = [0.5 + scipy.integrate.quad(pdf, 0, v, epsabs=1e-14, epsrel=1e-13)[0] for v in x]
    ours = von_mises_cdf(torch.tensor(x), torch.tensor(kappa, dtype=F64)).numpy()
    np.testing.assert_allclose(ours, exact, rtol=0, atol=5e-11)


def test_von_mises_cdf_derivatives():
    """In the concentration: central differences (series and normal approximation); in the
    angle: the density."""
    kappa = torch.tensor([0.2, 2.0, 9.0, 40.0, 49.0, 51.0, 120.0], dtype=F64, requires_grad=True)
    x = torch.tensor([2.5, -1.0, 0.4, 0.2, -0.1, 0.15, 0.05], dtype=F64, requires_grad=True)
    g_kappa, g_x = torch.autograd.grad(von_mises_cdf(x, kappa).sum(), [kappa, x])
    h = 1e-5
    with torch.no_grad():
        fd = (von_mises_cdf(x, kappa + h) - von_mises_cdf(x, kappa - h)) / (2 * h)
        density = torch.tensor(scipy.stats.vonmises.pdf(x.numpy(), kappa.numpy()))
    torch.testing.assert_close(g_kappa, fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_x, density, rtol=1e-9, atol=1e-12)


# --------------------------------------------------- distributions, by a parameter vector
def _mixture(phi, k=2):
    logits, loc, log_s = phi[..., :k], phi[..., k : 2 * k], phi[..., 2 * k :]
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, log_s.exp()))


def _lognormal_mixture(phi):  # a TransformedDistribution: the generic path through its cdf
    return dist.TransformedDistribution(_mixture(phi), [torch.distributions.ExpTransform()])


def _von_mises(phi):
    return dist.VonMises(phi[..., 0], phi[..., 1].exp())


def _von_mises_mixture(phi):  # components without rsample: each by its own implicit gradient
    logits, loc, log_kappa = phi[..., :2], phi[..., 2:4], phi[..., 4:6]
    components = dist.VonMises(loc, log_kappa.exp())
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


def _mixture_2d(phi):
    logits = phi[..., :2]
    loc = phi[..., 2:6].reshape(phi.shape[:-1] + (2, 2))
    scale = phi[..., 6:10].reshape(phi.shape[:-1] + (2, 2)).exp()
    return dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
    )


def _normal_cdf(z, loc, scale):
    return 0.5 * torch.erfc(-(z - loc) / (scale * math.sqrt(2)))


def _mixture_cdf(phi, z):
    w = phi[..., :2].softmax(-1)
    return (w * _normal_cdf(z.unsqueeze(-1), phi[..., 2:4], phi[..., 4:6].exp())).sum(-1)


def _conditional_cdfs(phi, z1, z2):
    """``F_1(z1)`` and ``F_2(z2 | z1)`` of the diagonal mixture, written out."""
    log_w = phi[..., :2].log_softmax(-1)
    loc = phi[..., 2:6].reshape(phi.shape[:-1] + (2, 2))
    scale = phi[..., 6:10].reshape(phi.shape[:-1] + (2, 2)).exp()
    f1 = (log_w.exp() * _normal_cdf(z1.unsqueeze(-1), loc[..., 0], scale[..., 0])).sum(-1)
    post = (log_w + dist.Normal(loc[..., 0], scale[..., 0]).log_prob(z1.unsqueeze(-1))).softmax(-1)
    f2 = (post * _normal_cdf(z2.unsqueeze(-1), loc[..., 1], scale[..., 1])).sum(-1)
    return f1, f2


def _bisect(cdf, u, lo, hi, steps=200):
    """``z`` with ``cdf(z) = u`` elementwise (``cdf`` increasing), in float64."""
    lo, hi = torch.full_like(u, lo), torch.full_like(u, hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        below = cdf(mid) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


PHI = {
    "mixture": [0.3, -0.4, -1.0, 1.2, -0.2, -0.6],
    "lognormal_mixture": [0.3, -0.4, -1.0, 1.2, -0.2, -0.6],
    "von_mises_series": [0.4, math.log(2.0)],
    "von_mises_normal": [-0.3, math.log(60.0)],
    "mixture_2d": [0.2, -0.5, -1.0, 0.5, 1.0, -0.8, -0.3, 0.1, -0.5, 0.2],
    "von_mises_mixture": [0.3, -0.2, -1.0, 1.5, math.log(2.0), math.log(0.7)],
}
BUILD = {
    "mixture": _mixture,
    "lognormal_mixture": _lognormal_mixture,
    "von_mises_series": _von_mises,
    "von_mises_normal": _von_mises,
    "mixture_2d": _mixture_2d,
    "von_mises_mixture": _von_mises_mixture,
}


def _inverse(name, phi, z0):
    """The inverse CDF at ``phi`` of the uniforms that give ``z0`` at ``PHI[name]``."""
    base = torch.tensor(PHI[name], dtype=F64)
    if name == "mixture":
        return _bisect(lambda z: _mixture_cdf(phi, z), _mixture_cdf(base, z0), -30, 30)
    if name == "lognormal_mixture":
        u = _mixture_cdf(base, z0.log())
        return _bisect(lambda z: _mixture_cdf(phi, z), u, -30, 30).exp()
    if name.startswith("von_mises"):
        u = von_mises_cdf(z0 - base[0], base[1].exp())
        return _bisect(lambda z: von_mises_cdf(z - phi[0], phi[1].exp()), u, -10, 10)
    u1, u2 = _conditional_cdfs(base, z0[..., 0], z0[..., 1])
    z1 = _bisect(lambda z: _conditional_cdfs(phi, z, z)[0], u1, -30, 30)
    z2 = _bisect(lambda z: _conditional_cdfs(phi, z1, z)[1], u2, -30, 30)
    return torch.stack([z1, z2], -1)


def _jacobian(name, mixture="responsibilities"):
    """``(z0, dz/dphi of each element of 6 draws, central differences of the inverse CDF)``."""
    phi = torch.tensor(PHI[name], dtype=F64, requires_grad=True)
    torch.manual_seed(3)
    fn = BUILD[name](phi)
    z0 = fn.sample((6,))
    z = implicit_value(fn.expand((6,)), z0, mixture)
    assert torch.equal(z.detach(), z0)
    flat = z.reshape(-1)
    jac = torch.stack([torch.autograd.grad(v, phi, retain_graph=True)[0] for v in flat])
    h = 1e-6
    fd = []
    for i in range(len(phi)):
        step = torch.zeros_like(phi)
        step[i] = h
        with torch.no_grad():
            plus, minus = _inverse(name, phi + step, z0), _inverse(name, phi - step, z0)
        fd.append(((plus - minus) / (2 * h)).reshape(-1))
    return z0, jac, torch.stack(fd, -1)


ONE_DRAW = [n for n in PHI if n not in ("mixture_2d", "von_mises_mixture")]


@pytest.mark.parametrize("name", ONE_DRAW + ["mixture_2d-transform"])
def test_each_draws_derivative_is_the_inverse_cdfs(name):
    """dz/dphi of every draw (value exactly the draw) against central differences of the
    inverse CDF at the same uniform, in float64 (the 2D mixture: everything by the
    distributional transform)."""
    _, jac, fd = _jacobian(*name.split("-"))
    torch.testing.assert_close(jac, fd, rtol=1e-5, atol=1e-6)


def test_a_diagonal_mixtures_weights_by_the_transform_components_by_responsibilities():
    """The default for a mixture of diagonal components: dz/dlogits is the distributional
    transform's (the inverse CDF's), dz_j/dloc_kj = r_k(z) and dz_j/dlog_scale_kj = r_k(z)
    (z_j - loc_kj), with r_k the posterior responsibility of component k at the draw."""
    z0, jac, fd = _jacobian("mixture_2d")
    torch.testing.assert_close(jac[:, :2], fd[:, :2], rtol=1e-5, atol=1e-6)
    phi = torch.tensor(PHI["mixture_2d"], dtype=F64)
    loc, log_s = phi[2:6].reshape(2, 2), phi[6:10].reshape(2, 2)
    joint = phi[:2].log_softmax(-1) + dist.Normal(loc, log_s.exp()).log_prob(z0.unsqueeze(-2)).sum(
        -1
    )
    r = joint.softmax(-1)  # (6, K)
    expected = torch.zeros(6, 2, 10, dtype=F64)
    for k in range(2):
        for j in range(2):
            expected[:, j, 2 + 2 * k + j] = r[:, k]
            expected[:, j, 6 + 2 * k + j] = r[:, k] * (z0[:, j] - loc[k, j])
    torch.testing.assert_close(jac[:, 2:], expected.reshape(12, 10)[:, 2:], rtol=1e-9, atol=1e-12)


def test_a_normal_draws_derivative_is_its_noise():
    """Forced on a Normal (which has rsample): dz/dmu = 1, dz/dsigma = eps exactly."""
    mu = torch.tensor(0.3, requires_grad=True)
    sigma = torch.tensor(1.7, requires_grad=True)
    fn = dist.Normal(mu, sigma).expand([50])
    z0 = fn.sample()
    g_mu, g_sigma = torch.autograd.grad(implicit_value(fn, z0).sum(), [mu, sigma])
    assert float(g_mu) == pytest.approx(50.0, rel=1e-6)
    eps = ((z0 - mu) / sigma).detach()
    assert float(g_sigma) == pytest.approx(float(eps.sum()), rel=1e-4, abs=1e-4)


# ------------------------------------------------------- mean gradients vs quadrature
COSTS_LINE = {
    "square": lambda z: (z - 0.5) ** 2,
    "sin": torch.sin,
    "bump": lambda z: (-z * z).exp(),
}
COSTS_CIRCLE = {  # continuous on the circle, so E[f] has no boundary term at +-pi
    "cos": torch.cos,
    "sin2": lambda z: torch.sin(2 * z),
    "exp_cos": lambda z: torch.exp(torch.cos(z - 1.0)),
}
COSTS_PLANE = {
    "product": lambda z: z[..., 0] * z[..., 1],
    "square": lambda z: (z[..., 0] - 1) ** 2 + 0.5 * z[..., 1] ** 2,
    "sin": lambda z: torch.sin(z[..., 0] + 2 * z[..., 1]),
}


def _cost(name, cost):
    """The cost called ``cost`` for distribution ``name`` (the line's, the circle's and the
    plane's share names)."""
    if name.startswith("mixture_2d"):
        return COSTS_PLANE[cost]
    return (COSTS_CIRCLE if name.startswith("von_mises") else COSTS_LINE)[cost]


def _grid(name):
    """Quadrature nodes and the volume of a cell (trapezoid: the integrands vanish at the
    ends, or are periodic)."""
    if name.startswith("von_mises"):
        z = torch.linspace(-math.pi, math.pi, 20001, dtype=F64)[:-1]
        return z, 2 * math.pi / 20000
    if name == "lognormal_mixture":
        z = torch.linspace(-12, 12, 24001, dtype=F64).exp()  # in log space: dz = z du
        return z, None
    if name == "mixture_2d":
        axis = torch.linspace(-9, 9, 721, dtype=F64)
        return torch.cartesian_prod(axis, axis), (axis[1] - axis[0]).item() ** 2
    return torch.linspace(-15, 15, 30001, dtype=F64), 0.001


def _quadrature_gradient(name, f, phi):
    phi = phi.clone().requires_grad_(True)
    z, cell = _grid(name)
    density = BUILD[name](phi).log_prob(z).exp()
    if cell is None:  # u = log z on a uniform grid
        value = (f(z) * density * z).sum() * 0.001
    else:
        value = (f(z) * density).sum() * cell
    return torch.autograd.grad(value, phi)[0]


CASES = (
    [("mixture", c) for c in COSTS_LINE]
    + [("lognormal_mixture", "bump")]
    + [(n, c) for n in ("von_mises_series", "von_mises_normal") for c in COSTS_CIRCLE]
    + [("mixture_2d", c) for c in COSTS_PLANE]
    + [("mixture_2d-transform", c) for c in COSTS_PLANE]
)
COMPONENT_CASES = (
    [("mixture", c) for c in COSTS_LINE]
    + [("von_mises_mixture", c) for c in COSTS_CIRCLE]
    + [("mixture_2d", c) for c in COSTS_PLANE]
)


@pytest.mark.parametrize("name, cost", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_mean_gradient_matches_quadrature(name, cost):
    """Per-draw gradients of f(z) from independent copies of the parameters (one row each),
    their mean within 4.5 standard errors of the gradient of E[f] by quadrature."""
    f = _cost(name, cost)
    name, *mixture = name.split("-")
    phi = torch.tensor(PHI[name], dtype=F64)
    n = 3000
    rows = phi.expand(n, -1).clone().requires_grad_(True)
    torch.manual_seed(4)
    fn = BUILD[name](rows)
    z = implicit_value(fn, fn.sample(), *mixture)
    (draws,) = torch.autograd.grad(f(z).sum(), rows)
    assert bool(torch.isfinite(draws).all())
    assert_unbiased({cost: draws}, {cost: _quadrature_gradient(name, f, phi)})


@pytest.mark.parametrize(
    "name, cost", COMPONENT_CASES, ids=[f"{n}-{c}" for n, c in COMPONENT_CASES]
)
def test_the_components_side_by_side_match_quadrature(name, cost):
    """The default for a mixture: one draw of each component (its own pathwise gradient, or
    its implicit one for von Mises components), sum_k w_k f(z_k) differentiated; per-row
    gradients' mean within 4.5 standard errors of the gradient of E[f] by quadrature."""
    f = _cost(name, cost)
    phi = torch.tensor(PHI[name], dtype=F64)
    n = 3000
    rows = phi.expand(n, -1).clone().requires_grad_(True)
    torch.manual_seed(4)
    values, weights = component_draws(BUILD[name](rows))
    assert values.shape[:2] == weights.shape == (2, n)
    (draws,) = torch.autograd.grad((weights * f(values)).sum(), rows)
    assert bool(torch.isfinite(draws).all())
    assert_unbiased({cost: draws}, {cost: _quadrature_gradient(name, f, phi)})


def test_the_components_side_by_side_have_less_variance_in_the_weights():
    """On the 2D mixture, cost sin(z1 + 2 z2): the weights' gradient of the components side
    by side has less variance than one draw's by the distributional transform."""
    f = COSTS_PLANE["sin"]
    rows = torch.tensor(PHI["mixture_2d"], dtype=F64).expand(2000, -1).clone().requires_grad_(True)
    torch.manual_seed(11)
    values, weights = component_draws(_mixture_2d(rows))
    (sides,) = torch.autograd.grad((weights * f(values)).sum(), rows)
    fn = _mixture_2d(rows)
    (one,) = torch.autograd.grad(f(implicit_value(fn, fn.sample())).sum(), rows)
    ratio = one[:, :2].var(0).sum() / sides[:, :2].var(0).sum()
    assert ratio > 3, ratio


# ------------------------------------------------------------ through RoutedELBO
X_OBS = 1.3


def mixture_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(X_OBS))


def mixture_guide(option=None):
    logits, loc = param("logits", [0.2, -0.3]), param("loc", [-0.5, 1.0])
    log_s = param("log_s", [-0.2, -0.7])
    mix = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, log_s.exp()))
    pyro.sample("z", mix, infer={} if option is None else {"implicit_mixture": option})


def mixture_exact_gradients():
    """Gradient of -ELBO = -E_q[log p(x, z) - log q(z)] by quadrature."""
    mixture_guide()
    names = ["logits", "loc", "log_s"]
    params = [pyro.param(n) for n in names]
    z = torch.linspace(-15, 15, 30001, dtype=F64)
    w = params[0].double().softmax(-1)
    q = dist.MixtureSameFamily(
        dist.Categorical(w), dist.Normal(params[1].double(), params[2].double().exp())
    )
    log_q = q.log_prob(z)
    log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(torch.tensor(X_OBS))
    loss = -(log_q.exp() * (log_p - log_q)).sum() * 0.001
    grads = torch.autograd.grad(loss, params)
    return dict(zip(names, params)), {n: g.float() for n, g in zip(names, grads)}


@pytest.mark.parametrize("option", [None, "responsibilities"], ids=["components", "one-draw"])
@pytest.mark.parametrize("particles", [1, 4], ids=["one-particle", "vectorized-particles"])
def test_the_elbo_gradient_of_a_mixture_guide_is_unbiased(particles, option):
    params, exact = mixture_exact_gradients()
    pyro.set_rng_seed(5)
    elbo = RoutedELBO(num_particles=particles, vectorize_particles=particles > 1)
    draws = draw_gradients(elbo, mixture_model, lambda: mixture_guide(option), params, 400)
    assert_unbiased(draws, exact)
    route = elbo.routes["z"]
    assert route.estimator == "implicit" and not route.forced
    assert route.reason.startswith("MixtureSameFamily has no rsample; implicit reparameterization")
    if option is None:
        assert "2 components side by side" in route.reason, route.reason
    else:
        assert "sum_k w_k F_k" in route.reason and "dz/dphi = -(dF/dphi) / q(z)" in route.reason


def test_analytic_kl_composes_on_a_normal_forced_to_implicit():
    x = torch.tensor(1.3)
    params, exact = gaussian_params_and_exact_gradients(x)
    pyro.set_rng_seed(6)
    elbo = RoutedELBO()
    guide = force_estimator(gaussian_guide, "implicit")
    draws = draw_gradients(elbo, gaussian_model, guide, params, 300, x)
    assert_unbiased(draws, exact)
    route = elbo.routes["z"]
    assert route.estimator == "implicit" and route.analytic_kl, route.reason


# ------------------------------------------------------------------ routes and refusals
def _route(fn, infer=None):
    def guide():
        pyro.sample("z", fn, infer=dict(infer or {}))

    elbo = RoutedELBO()
    elbo.loss(lambda: pyro.sample("z", fn), guide)
    return elbo.routes["z"]


MIX = dist.Categorical(logits=torch.zeros(2))
ROUTES = {
    "von_mises": (dist.VonMises(0.3, 2.0), "implicit", "the von Mises cdf"),
    "mixture": (dist.MixtureSameFamily(MIX, dist.Normal(torch.tensor([0.0, 1.0]), 1.0)),
                "implicit", "2 components side by side"),
    "mixture_diag": (dist.MixtureSameFamily(MIX, dist.Normal(torch.zeros(2, 3), 1.0).to_event(1)),
                     "implicit", "2 components side by side"),
    "von_mises_mixture": (dist.MixtureSameFamily(MIX, dist.VonMises(torch.tensor([0.0, 1.0]), 3.0)),
                          "implicit", "2 components side by side"),
    "mixture_map": (dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(3, 2)),
                                           dist.Normal(torch.zeros(3, 2), 1.0)).to_event(1),
                    "implicit", "sum_k w_k F_k"),
    "plated_von_mises": (dist.VonMises(torch.zeros(4), 2.0).to_event(1), "implicit", "von Mises"),
    "normal": (dist.Normal(0.0, 1.0), "pathwise", "Normal has rsample"),
    "gamma": (dist.Gamma(2.0, 1.0), "pathwise", "Gamma has rsample"),
    "beta": (dist.Beta(2.0, 1.0), "pathwise", "Beta has rsample"),
    "bernoulli": (dist.Bernoulli(0.3), "enumerate", "Bernoulli has no rsample; support of 2"),
    "categorical": (dist.Categorical(logits=torch.zeros(3)), "enumerate",
                    "Categorical has no rsample; support of 3"),
    "poisson": (dist.Poisson(3.0), "score", ("Poisson has no rsample; Poisson has no finite "
                "support to enumerate; Poisson is not a Bernoulli")),
    "beta_mixture": (dist.MixtureSameFamily(MIX, dist.Beta(torch.ones(2), 2.0)), "score",
                     "its components: Beta has no cdf"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROUTES))
def test_routes(case):
    fn, estimator, reason = ROUTES[case]
    pyro.set_rng_seed(7)
    route = _route(fn)
    assert route.estimator == estimator and reason in route.reason, route.reason
    if estimator != "implicit":
        assert "implicit" not in route.reason and "is discrete" not in route.reason


@pytest.mark.parametrize(
    "fn, why",
    [
        (dist.Beta(2.0, 1.0), "Beta has no cdf"),
        (dist.Poisson(3.0), "Poisson is discrete"),
        (dist.MixtureSameFamily(MIX, dist.MultivariateNormal(torch.zeros(2, 2), torch.eye(2))),
         "its components MultivariateNormal do not factorize"),
        (dist.Dirichlet(torch.ones(3)), "Dirichlet is not univariate"),
    ],
    ids=["no-cdf", "discrete", "mixture-not-factorized", "multivariate"],
)  # fmt: skip
def test_forced_where_there_is_no_usable_cdf_is_an_error_naming_the_site(fn, why):
    with pytest.raises(ValueError) as refused:
        _route(fn, IMPLICIT)
    message = str(refused.value)
    assert message.startswith("site 'z': infer['estimator']='implicit' was requested but")
    assert why in message and "use 'score'" in message


# ------------------------------------------------- composes with the rest of the package
B, H, W = 2, 5, 5


def map_model(x):
    with pyro.plate("images", B):
        z = pyro.sample("z", dist.Normal(torch.zeros(B, 1, H, W), 1.0).to_event(3))
        b = pyro.sample("b", dist.Bernoulli(0.5 * torch.ones(B, 1, H, W)).to_event(3))
        out = torch.nn.functional.conv2d(z + b, torch.ones(1, 1, 3, 3) / 9, padding=1)
        pyro.sample("x", dist.Normal(out, 1.0).to_event(3), obs=x)


def map_guide(x):
    logits = param("map_logits", torch.zeros(B, 1, H, W, 2))
    loc = param("map_loc", torch.tensor([-1.0, 1.0]).expand(B, 1, H, W, 2))
    b_logits = param("b_logits", torch.zeros(B, 1, H, W))
    with pyro.plate("images", B):
        mix = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, 0.7))
        pyro.sample("z", mix.to_event(3))
        pyro.sample("b", dist.Bernoulli(logits=b_logits).to_event(3), infer={"estimator": "score"})


def test_a_mixture_map_beside_a_score_map_with_element_level_costs():
    x = torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(8))
    pyro.set_rng_seed(8)
    elbo = RoutedELBO()
    for _ in range(2):
        loss = elbo.differentiable_loss(map_model, map_guide, x)
    params = [pyro.param(n) for n in ("map_logits", "map_loc", "b_logits")]
    grads = torch.autograd.grad(loss, params)
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    assert elbo.routes["z"].estimator == "implicit"
    assert "sum_k w_k F_k" in elbo.routes["z"].reason  # a map of mixtures: one draw
    assert "element-level costs" in elbo.routes["b"].reason, elbo.routes["b"].reason


def map_of_one_mixture_model(x):
    with pyro.plate("images", B):
        z = pyro.sample("z", dist.Normal(torch.zeros(B, H * W), 1.0).to_event(1))
        b = pyro.sample("b", dist.Bernoulli(0.5 * torch.ones(B, 1, H, W)).to_event(3))
        image = z.reshape(z.shape[:-1] + (1, H, W)) + b
        out = torch.nn.functional.conv2d(image, torch.ones(1, 1, 3, 3) / 9, padding=1)
        pyro.sample("x", dist.Normal(out, 1.0).to_event(3), obs=x)


def map_of_one_mixture_guide(x):
    logits = param("map1_logits", torch.zeros(B, 2))
    loc = param("map1_loc", torch.tensor([-1.0, 1.0]).reshape(2, 1).expand(B, 2, H * W))
    b_logits = param("b_logits", torch.zeros(B, 1, H, W))
    with pyro.plate("images", B):
        comps = dist.Normal(loc, 0.7).to_event(1)
        pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=logits), comps))
        pyro.sample("b", dist.Bernoulli(logits=b_logits).to_event(3), infer={"estimator": "score"})


def test_a_mixture_per_image_side_by_side_beside_a_score_map_with_element_level_costs():
    """One mixture of diagonal Gaussians per image (its components side by side through a
    conv, folded) beside an element-level score map; the score map's gradient agrees with
    the one it gets beside one draw of the mixture (the mixture's route changes only the
    variance)."""
    x = torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(8))
    names = ("map1_logits", "map1_loc", "b_logits")
    draws = {}
    for option in (None, "responsibilities"):
        pyro.set_rng_seed(8)
        elbo = RoutedELBO()
        infer = {} if option is None else {"implicit_mixture": option}
        guide = poutine.infer_config(
            map_of_one_mixture_guide, lambda site: infer if site["name"] == "z" else {}
        )
        rows = []
        for _ in range(300):
            loss = elbo.differentiable_loss(map_of_one_mixture_model, guide, x)
            grads = torch.autograd.grad(loss, [pyro.param(n) for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        draws[option] = torch.stack(rows)
        assert bool(torch.isfinite(draws[option]).all())
        assert "element-level costs" in elbo.routes["b"].reason, elbo.routes["b"].reason
        side = "2 components side by side" in elbo.routes["z"].reason
        assert side == (option is None), elbo.routes["z"].reason
    a, b = draws[None], draws["responsibilities"]
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert bool(((a.mean(0) - b.mean(0)).abs() <= 4.5 * se + 1e-6).all())


def test_compare_estimators_and_the_bias_check_see_it():
    mixture_guide()
    df = compare_estimators(
        mixture_model, mixture_guide, estimators=("auto", "implicit", "score+loo"), num_draws=150
    )
    implicit = df[df.estimator == "implicit"]
    assert "z:implicit" in implicit.routes.iloc[0]
    assert bool(implicit.agrees.all())
    by = df.set_index(["estimator", "param"]).variance
    assert by[("implicit", "loc")] < by[("score+loo", "loc")]
    pyro.set_rng_seed(9)
    audit = audit_gradients(mixture_model, mixture_guide, check_bias=True, num_draws=200)
    check = audit.bias_checks["z"]
    assert check.reference == "score" and not check.biased
    assert audit.pathwise_bias == {}


def diag_model():
    with pyro.plate("N", 2):
        pyro.sample("z", dist.Normal(torch.zeros(2, 3), 1.0).to_event(1))


def diag_guide(option=None):
    logits = param("diag_logits", torch.zeros(2, 2))
    loc = param("diag_loc", torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.5, -1.0]]))
    infer = {} if option is None else {"implicit_mixture": option}
    with pyro.plate("N", 2):
        comps = dist.Normal(loc, 0.8).to_event(1)
        pyro.sample(
            "z", dist.MixtureSameFamily(dist.Categorical(logits=logits), comps), infer=infer
        )


@pytest.mark.parametrize("option", [None, "responsibilities", "transform"])
def test_a_diagonal_mixture_in_a_plate_with_vectorized_particles(option):
    pyro.set_rng_seed(10)
    elbo = RoutedELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(diag_model, lambda: diag_guide(option))
    grads = torch.autograd.grad(loss, [pyro.param("diag_logits"), pyro.param("diag_loc")])
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    reason = elbo.routes["z"].reason
    expected = {
        None: "2 components side by side",
        "responsibilities": "weighted by their responsibilities",
        "transform": "dimension by dimension",
    }[option]
    assert elbo.routes["z"].estimator == "implicit" and expected in reason, reason


def plated_mixture_guide():
    logits = param("plated_logits", [[0.2, -0.3], [0.5, 0.4], [-1.0, 0.3]])
    loc = param("plated_loc", [[-0.5, 1.0], [0.3, 2.0], [-1.2, -0.1]])
    log_s = param("plated_log_s", [[-0.2, -0.7], [0.1, -0.4], [-0.5, 0.0]])
    with pyro.plate("N", 3):
        components = dist.Normal(loc, log_s.exp())
        pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=logits), components))


def plated_mixture_model():
    with pyro.plate("N", 3):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor([X_OBS, -0.4, 2.0]))


def test_the_components_side_by_side_per_plate_element_with_vectorized_particles():
    """Three independent mixtures in a plate, 4 particles vectorized: the components' dim,
    the plate's and the particles' together; the gradient against quadrature per element."""
    names = ["plated_logits", "plated_loc", "plated_log_s"]
    plated_mixture_guide()
    params = [pyro.param(n) for n in names]
    z = torch.linspace(-15, 15, 30001, dtype=F64).unsqueeze(-1)
    q = dist.MixtureSameFamily(
        dist.Categorical(logits=params[0].double()),
        dist.Normal(params[1].double(), params[2].double().exp()),
    )
    x = torch.tensor([X_OBS, -0.4, 2.0], dtype=F64)
    log_q = q.log_prob(z)
    log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x)
    exact = torch.autograd.grad(-(log_q.exp() * (log_p - log_q)).sum() * 0.001, params)
    pyro.set_rng_seed(12)
    elbo = RoutedELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    draws = draw_gradients(
        elbo, plated_mixture_model, plated_mixture_guide, dict(zip(names, params)), 300
    )
    assert_unbiased(draws, dict(zip(names, exact)))
    assert "2 components side by side" in elbo.routes["z"].reason


def test_values_side_by_side_that_fail_fall_back_to_one_draw():
    """A term outside the mixture's plate that depends on it: the components side by side
    cannot be weighted per element, so the site keeps the implicit gradient with one draw
    (not the score function) and the route says why."""

    def model():
        with pyro.plate("N", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=torch.tensor(0.5))

    pyro.set_rng_seed(13)
    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss_and_grads(model, plated_mixture_guide)
    route = elbo.routes["z"]
    assert route.estimator == "implicit", route.reason
    assert "one draw per particle instead" in route.reason and "sum_k w_k F_k" in route.reason


def test_a_bad_mixture_option_names_the_site():
    with pytest.raises(ValueError, match=r"site 'z': infer\['implicit_mixture'\] must be one of"):
        RoutedELBO().loss(diag_model, lambda: diag_guide("exact"))


def test_a_bad_mixture_option_on_a_univariate_mixture_names_the_site_too():
    guide = lambda: pyro.sample(  # noqa: E731
        "z",
        dist.MixtureSameFamily(MIX, dist.Normal(torch.zeros(2), 1.0)),
        infer={"implicit_mixture": "exact"},
    )
    with pytest.raises(ValueError, match=r"site 'z': infer\['implicit_mixture'\] must be one of"):
        RoutedELBO().loss(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)), guide)


def test_a_cdf_without_a_derivative_in_its_parameters_is_not_used():
    """torch's Gamma cdf (igamma) has no derivative in its concentration: not implicit."""
    from pyro.distributions.testing.fakes import NonreparameterizedGamma

    def model():
        pyro.sample("r", dist.Gamma(2.0, 1.0))

    def guide():
        a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
        pyro.sample("r", NonreparameterizedGamma(a, torch.tensor(1.0)))

    elbo = RoutedELBO()
    elbo.loss_and_grads(model, guide)
    route = elbo.routes["r"]
    assert route.estimator == "score", route
    assert "its cdf has no derivative in its parameters" in route.reason


def test_implicit_is_unbiased_under_a_subsampled_plate():
    """A model it was not built for: a local site under ``plate(subsample_size=...)``; the
    expected gradient of -ELBO in loc_i is -(x_i - 2 loc_i) (Normal prior and likelihood)."""
    from pyro.distributions.testing.fakes import NonreparameterizedNormal

    x = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.2, -0.4])

    def model():
        with pyro.plate("n", 6, subsample_size=2) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    def guide():
        loc = pyro.param("loc", torch.linspace(-0.5, 0.5, 6))
        with pyro.plate("n", 6, subsample_size=2) as i:
            pyro.sample("z", NonreparameterizedNormal(loc[i], 0.8))

    pyro.set_rng_seed(3)
    elbo = RoutedELBO(fast_path=False)
    draws = []
    for _ in range(2000):
        loss = elbo.differentiable_loss(model, guide)
        draws.append(torch.autograd.grad(loss, [pyro.param("loc").unconstrained()])[0])
    assert elbo.routes["z"].estimator == "implicit"
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    exact = -(x - 2 * pyro.param("loc").detach())
    assert ((mean - exact).abs() / se).max() < 4.5, (mean, exact, se)


def test_a_mixture_of_many_components_draws_once_unless_asked():
    """More components than MAX_COMPONENTS_SIDE_BY_SIDE: one draw by default (the route says
    why), the components side by side when asked."""
    from pyro_reparam_conv.estimators.implicit import MAX_COMPONENTS_SIDE_BY_SIDE

    k = MAX_COMPONENTS_SIDE_BY_SIDE + 1

    def model(asked):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(asked):
        logits = pyro.param("logits", torch.zeros(k))
        locs = pyro.param("locs", torch.linspace(-2, 2, k))
        mix = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(locs, 1.0))
        pyro.sample("z", mix, infer=asked)

    pyro.clear_param_store()
    elbo = RoutedELBO(max_plate_nesting=0)
    elbo.loss(model, guide, {})
    assert "one draw (17 components > 16 side by side)" in elbo.routes["z"].reason
    elbo.loss(model, guide, {"implicit_mixture": "components"})
    assert "17 components side by side" in elbo.routes["z"].reason


def test_mixture_components_side_by_side_under_subsampling_a_gate_and_changing_data():
    """The components-side-by-side default on a model it was not built for: a subsampled
    plate (2 of 3 points a step), a gate written in place on the draw, and observations
    that alternate between two vectors from step to step; the mean gradient against the
    exact one, each point's ELBO integrated on a fine grid."""
    observed = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.0, -0.5])]

    def gate(z):
        h = z.clone()
        h.mul_(torch.where(z > 0, 1.0, 0.5))
        return h

    def model(x):
        with pyro.plate("N", 3, subsample_size=2) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(gate(z), 1.0), obs=x[i])

    def params():
        return (pyro.param("logits", lambda: torch.tensor([[0.3, -0.2], [0.0, 0.5], [1.0, -1.0]])),
                pyro.param("locs", lambda: torch.tensor([[-1.0, 1.0], [0.5, -0.5], [2.0, 0.0]])))

    def mixture(logits, locs):
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(locs, 0.8))

    def guide(x):
        logits, locs = params()
        with pyro.plate("N", 3, subsample_size=2) as i:
            pyro.sample("z", mixture(logits[i], locs[i]))

    def exact_loss(x):  # -sum_i integral q_i(z) (log p(x_i, z) - log q_i(z)) dz
        z = torch.linspace(-12.0, 12.0, 12001, dtype=torch.float64).unsqueeze(-1)
        logits, locs = (p.double() for p in params())
        log_q = mixture(logits, locs).log_prob(z)
        log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(gate(z), 1.0).log_prob(x.double())
        return -((log_q.exp() * (log_p - log_q)).sum(0) * (z[1] - z[0])).sum()

    pyro.clear_param_store()
    theta = params()
    exact = sum(torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_loss(x), theta)])
                for x in observed) / 2  # fmt: skip
    pyro.set_rng_seed(31)
    elbo = RoutedELBO(max_plate_nesting=1)
    samples = []
    for step in range(3000):
        loss = elbo.differentiable_loss(model, guide, observed[step % 2])
        samples.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta)]))
    assert "2 components side by side" in elbo.routes["z"].reason
    samples = torch.stack(samples).double()
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    z_scores = (mean - exact).abs() / se
    assert bool((z_scores <= 4.5).all()), (mean, exact, z_scores)
