"""The measure-valued estimator of Normal sites (Mohamed et al. 2020, section 6).

Checked against numbers computed another way:

- its constants and laws by quadrature: for smooth costs, ``1 / (sigma sqrt(2 pi)) (E f(mu +
  sigma W) - E f(mu - sigma W))`` with ``W`` Rayleigh(1) (= Weibull(scale sqrt 2,
  concentration 2)) and ``1 / sigma (E f(mu + sigma M) - E f(mu + sigma X))`` with ``M``
  double-sided Maxwell equal the derivatives of ``E f`` from the score identity
  (Gauss-Hermite); for the step ``1[x > 0]`` the same in closed form;
- its samplers: the Rayleigh draws and the coupled ``(M, eps)`` pair have the moments of the
  paper's laws (``(M, U M)`` by Gauss-Hermite x Gauss-Legendre), Monte Carlo within 4.5
  standard errors;
- its gradients through ``RoutedELBO``: unbiased against closed-form ELBO gradients on a
  smooth and on a step cost (Monte Carlo means within 4.5 standard errors), and per-sample
  variances equal to the quadrature variances of the estimator on the square cost, within
  4.5 standard errors of a variance estimate (``sqrt((m4 - var^2) / n)``).
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import assert_unbiased, param
from quadrature import (
    e_maxwell,
    e_maxwell_uniform,
    e_normal,
    e_rayleigh,
    measure_valued_moments,
    score_moments,
)

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.estimators.measure_valued import (
    MAX_EVALUATIONS,
    maxwell_given_normal,
    rayleigh,
)
from pyro_reparam_conv.layers import sample_elementwise_normal

MV = {"estimator": "measure_valued"}

SMOOTH = {
    "square": lambda x: (x - 2.0) ** 2,
    "cube": lambda x: x**3 - x,
    "exp": lambda x: np.exp(-0.5 * x**2),
    "cos": lambda x: np.cos(2.0 * x),
}


@pytest.mark.parametrize("name", list(SMOOTH))
def test_the_constants_and_laws_give_the_derivatives_of_smooth_costs(name):
    """1 / (sigma sqrt(2 pi)) with Rayleigh(1) for the mean, 1 / sigma with double-sided
    Maxwell against the normal for the scale: the score identity's derivatives."""
    f, mu, sigma = SMOOTH[name], 0.7, 1.3
    (d_mu, _, _), (d_sigma, _, _) = score_moments(f, mu, sigma)  # E[f(x) d log q(x)]
    h = 1e-5  # and by central differences of E f (Gauss-Hermite)
    mean = lambda m, s: e_normal(lambda x: f(m + s * x))  # noqa: E731
    assert d_mu == pytest.approx((mean(mu + h, sigma) - mean(mu - h, sigma)) / (2 * h), rel=1e-5)
    assert d_sigma == pytest.approx((mean(mu, sigma + h) - mean(mu, sigma - h)) / (2 * h), rel=1e-5)
    for coupled in (True, False):
        g_mu, g_sigma = measure_valued_moments(f, mu, sigma, coupled)
        assert g_mu[0] == pytest.approx(d_mu, rel=1e-6, abs=1e-9)
        assert g_sigma[0] == pytest.approx(d_sigma, rel=1e-6, abs=1e-9)


def test_the_constants_give_the_derivatives_of_the_step_in_closed_form():
    """f = 1[x > 0], mu > 0: E f(mu + sigma W) - E f(mu - sigma W) = P(W > mu / sigma) =
    exp(-mu^2 / (2 sigma^2)), times 1 / (sigma sqrt(2 pi)): phi(mu / sigma) / sigma, the
    derivative of Phi(mu / sigma). Scale: P(mu + sigma M > 0) - P(mu + sigma X > 0) over
    sigma, against -phi(mu / sigma) mu / sigma^2."""
    mu, sigma = 0.3, 1.4
    t = mu / sigma
    phi = math.exp(-(t**2) / 2) / math.sqrt(2 * math.pi)
    d_mu = math.exp(-(t**2) / 2) / (sigma * math.sqrt(2 * math.pi))
    assert d_mu == pytest.approx(phi / sigma)
    # P(M > -t) for double-sided Maxwell: 1/2 + P(0 < M < t) = 1/2 + (Phi(t) - 1/2 - t phi(t))
    normal_cdf = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    p_maxwell = 1 - (0.5 - (normal_cdf - 0.5 - t * phi))
    d_sigma = (p_maxwell - normal_cdf) / sigma
    assert d_sigma == pytest.approx(-phi * mu / sigma**2)


def test_samplers_have_the_papers_laws():
    torch.manual_seed(0)
    n = 400_000
    like = torch.zeros((), dtype=torch.float64)
    w = rayleigh((n,), like)
    weibull = torch.distributions.Weibull(math.sqrt(2.0), 2.0)
    grid = torch.linspace(0.01, 5, 50, dtype=torch.float64)
    density = weibull.log_prob(grid.float()).double().exp()
    torch.testing.assert_close(density, grid * (-(grid**2) / 2).exp(), rtol=1e-5, atol=1e-6)
    eps = torch.randn(n, dtype=torch.float64)
    m = maxwell_given_normal(eps)
    checks = {
        "E W": (w, e_rayleigh(lambda w: w)),
        "E W^3": (w**3, e_rayleigh(lambda w: w**3)),
        "E M^2": (m**2, e_maxwell(lambda m: m**2)),
        "E M^4": (m**4, e_maxwell(lambda m: m**4)),
        "E |M|": (m.abs(), e_maxwell(np.abs)),
        "E M X": (m * eps, e_maxwell_uniform(lambda m, x: m * x)),
        "E M^2 X^2": (m**2 * eps**2, e_maxwell_uniform(lambda m, x: m**2 * x**2)),
        "E |M| X^2": (m.abs() * eps**2, e_maxwell_uniform(lambda m, x: np.abs(m) * x**2)),
        "E cos(M + X)": (torch.cos(m + eps), e_maxwell_uniform(lambda m, x: np.cos(m + x))),
    }
    for label, (sample, exact) in checks.items():
        se = float(sample.std()) / math.sqrt(n)
        assert abs(float(sample.mean()) - exact) < 4.5 * se, (label, float(sample.mean()), exact)


# ------------------------------------------------------- through RoutedELBO: unbiased
WEIGHTS = torch.tensor([1.0, -2.0, 0.5])
OBS = 0.7


def smooth_model():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("x", dist.Normal((z * WEIGHTS).sum(-1), 1.0), obs=torch.tensor(OBS))


def smooth_guide(coupled=True):
    loc, log_s = param("loc", [0.2, -0.4, 0.9]), param("log_s", [-0.3, 0.1, -0.6])
    infer = {**MV, "coupled": coupled}
    pyro.sample("z", dist.Normal(loc, log_s.exp()).to_event(1), infer=infer)


def smooth_exact_loss(loc, log_s):
    """-ELBO of smooth_model / smooth_guide in closed form."""
    s2 = (2 * log_s).exp()
    log2pi = math.log(2 * math.pi)
    lik = -0.5 * log2pi - 0.5 * ((OBS - (WEIGHTS * loc).sum()) ** 2 + (WEIGHTS**2 * s2).sum())
    prior = (-0.5 * log2pi - 0.5 * (loc**2 + s2)).sum()
    entropy = (0.5 * (log2pi + 1) + log_s).sum()
    return -(lik + prior + entropy)


def gradient_draws(model, guide, names, n, elbo=None):
    elbo = RoutedELBO() if elbo is None else elbo
    params = [pyro.param(name) for name in names]
    found, losses = {name: [] for name in names}, []
    for _ in range(n):
        loss = elbo.differentiable_loss(model, guide)
        losses.append(float(loss.detach()))
        for name, g in zip(names, torch.autograd.grad(loss, params)):
            found[name].append(g)
    return {k: torch.stack(v) for k, v in found.items()}, torch.tensor(losses), elbo


@pytest.mark.parametrize("coupled", [True, False], ids=["coupled", "uncoupled"])
def test_unbiased_on_a_smooth_cost_with_interacting_elements(coupled):
    """An Independent(Normal) of 3 elements feeding one likelihood: 10 evaluations side by
    side; gradients and the loss (the draw's alone) match the closed-form ELBO."""
    guide = lambda: smooth_guide(coupled)  # noqa: E731
    guide()
    names = ["loc", "log_s"]
    exact_loss = smooth_exact_loss(*(pyro.param(n) for n in names))
    exact = dict(zip(names, torch.autograd.grad(exact_loss, [pyro.param(n) for n in names])))
    pyro.set_rng_seed(11)
    draws, losses, elbo = gradient_draws(smooth_model, guide, names, 400)
    assert_unbiased(draws, exact)
    assert abs(losses.mean() - exact_loss.item()) < 4.5 * losses.std() / math.sqrt(len(losses))
    reason = elbo.routes["z"].reason
    assert "10 evaluations side by side" in reason and "3 elements" in reason
    assert ("coupled (common random numbers)" if coupled else "uncoupled") in reason


def step_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.factor("step", -(z.sum(-1) > 0).to(z.dtype))


def step_guide():
    mean, log_v = param("mean", [0.4, -0.1]), param("log_v", 0.3)
    # NoiseReusingNormal, expanded from a scalar variance, as the package's layers draw it
    sample_elementwise_normal("z", mean, log_v.exp(), infer=MV)


def test_unbiased_on_a_step_cost_where_pathwise_is_not():
    """Loss E_q[1[z_1 + z_2 > 0]] + KL(q || p): Phi((m_1 + m_2) / sqrt(2 v)) + KL in closed
    form. The pathwise gradient sees the step's derivative, 0, and returns the KL's alone."""
    step_guide()
    mean, log_v = pyro.param("mean"), pyro.param("log_v")
    v = log_v.exp()
    step = torch.distributions.Normal(0.0, 1.0).cdf(mean.sum() / (2 * v).sqrt())
    kl = 0.5 * (v + mean**2 - 1 - log_v).sum()
    grads = torch.autograd.grad(step + kl, [mean, log_v], retain_graph=True)
    exact = dict(zip(["mean", "log_v"], grads))
    pyro.set_rng_seed(12)
    draws, _, elbo = gradient_draws(step_model, step_guide, ["mean", "log_v"], 600)
    assert_unbiased(draws, exact)
    assert elbo.routes["z"].estimator == "measure_valued"
    kl_only = dict(zip(["mean", "log_v"], torch.autograd.grad(kl, [mean, log_v])))
    pathwise = lambda: sample_elementwise_normal("z", mean, log_v.exp())  # noqa: E731
    pyro.set_rng_seed(12)
    (g_mean, g_log_v) = torch.autograd.grad(
        RoutedELBO().differentiable_loss(step_model, pathwise), [mean, log_v]
    )
    torch.testing.assert_close(g_mean, kl_only["mean"])
    assert (g_mean - exact["mean"]).abs().min() > 0.2  # the bias the estimator removes


def test_the_elbo_value_is_the_draws_and_other_gradients_use_only_it():
    """Weights one-hot on evaluation 0: the loss is -(log p - log q) at the draw, and the
    model's parameters get the gradient of log p at the draw."""
    w = param("w", 1.5)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(w * z.sum(-1), 1.0), obs=torch.tensor(OBS))

    smooth_guide()
    pyro.set_rng_seed(13)
    (table,) = RoutedELBO().site_terms(model, smooth_guide)
    z_all = table.guide_trace.nodes["z"]["value"]
    assert z_all.shape == (10, 3)
    z = z_all[0].detach()
    loc, scale = pyro.param("loc"), pyro.param("log_s").exp()
    log_p = dist.Normal(torch.zeros(3), 1.0).log_prob(z).sum()
    log_p = log_p + dist.Normal(w * z.sum(), 1.0).log_prob(torch.tensor(OBS))
    log_q = dist.Normal(loc, scale).log_prob(z).sum()
    loss, surrogate = RoutedELBO().loss_and_surrogate([table])
    assert float(loss.detach()) == pytest.approx(float(-(log_p - log_q).detach()), rel=1e-5)
    (g_w,) = torch.autograd.grad(surrogate, [w], retain_graph=True)
    (expected,) = torch.autograd.grad(-log_p, [w])
    torch.testing.assert_close(g_w, expected)
    # every other evaluation differs from the draw in exactly one element
    changed = (z_all[1:] != z_all[:1]).sum(-1)
    assert bool((changed == 1).all())


CLUSTERS = torch.tensor([-1.0, 0.5, 2.0])
PRIOR = torch.tensor([0.2, 0.5, 0.3])


def mixture_model():
    y = pyro.sample("y", dist.Categorical(PRIOR))
    z = pyro.sample("z", dist.Normal(CLUSTERS[y], 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(OBS))


def mixture_guide():
    logits, locs = param("logits", [0.1, -0.2, 0.3]), param("locs", [-0.5, 0.2, 0.9])
    y = pyro.sample("y", dist.Categorical(logits=logits))
    pyro.sample("z", dist.Normal(locs[y], param("log_s", -0.2).exp()), infer=MV)


def mixture_exact_loss(logits, locs, log_s):
    """-ELBO: the sum over y of q(y) (closed-form Gaussian terms of z given y - log q(y))."""
    q, s2, log2pi = torch.softmax(logits, 0), (2 * log_s).exp(), math.log(2 * math.pi)
    lik = -0.5 * log2pi - 0.5 * ((OBS - locs) ** 2 + s2)
    prior = -0.5 * log2pi - 0.5 * ((locs - CLUSTERS) ** 2 + s2)
    entropy = 0.5 * (log2pi + 1) + log_s
    return -(q * (lik + prior + entropy + PRIOR.log() - q.log())).sum()


@pytest.mark.parametrize("particles", [1, 4], ids=["one-particle", "vectorized-particles"])
def test_unbiased_below_an_enumerated_site(particles):
    """z | y with y summed exactly: z's distribution has y's evaluation dim, which is
    perturbed side by side like a plate (4 evaluations, not 3 x 4); also under a vectorized
    particle plate."""
    mixture_guide()
    names = ["logits", "locs", "log_s"]
    params = [pyro.param(n) for n in names]
    exact = dict(zip(names, torch.autograd.grad(mixture_exact_loss(*params), params)))
    pyro.set_rng_seed(16)
    elbo = RoutedELBO(num_particles=particles, vectorize_particles=particles > 1)
    draws, _, elbo = gradient_draws(mixture_model, mixture_guide, names, 400, elbo)
    assert_unbiased(draws, exact)
    assert elbo.routes["y"].estimator == "enumerate"
    assert "4 evaluations side by side" in elbo.routes["z"].reason


# ------------------------------------------------------------- variance: quadrature
MU, SIGMA, K, N = 1.0, 1.0, 2.0, 20000  # Mohamed et al. 2020, figure 2: N(x | 1, 1)


def square(x):
    return (x - K) ** 2


def plate_model():
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    with pyro.plate("N", N):
        x = pyro.sample("x", dist.Normal(loc, scale))  # prior = q: log p - log q = 0
        pyro.factor("f", -square(x))


def plate_guide(coupled):
    loc = param("loc", torch.full((N,), MU))
    scale = param("scale", torch.full((N,), SIGMA))
    with pyro.plate("N", N):
        pyro.sample("x", dist.Normal(loc, scale), infer={**MV, "coupled": coupled})


@pytest.mark.parametrize("coupled", [True, False], ids=["coupled", "uncoupled"])
def test_per_sample_variance_matches_quadrature_on_the_square_cost(coupled):
    """N independent estimates in one pass: every plate element has its own parameters and
    is perturbed side by side with the others (4 evaluations for the whole plate); the loss
    is E[(x - k)^2], whose gradient in loc[i], scale[i] is element i's estimate."""
    guide = lambda: plate_guide(coupled)  # noqa: E731
    guide()
    pyro.set_rng_seed(14)
    elbo = RoutedELBO()
    loss = elbo.differentiable_loss(plate_model, guide)
    g_loc, g_scale = torch.autograd.grad(loss, [pyro.param("loc"), pyro.param("scale")])
    assert elbo.routes["x"].reason.count("4 evaluations") == 1
    exact = {"loc": 2 * (MU - K), "scale": 2 * SIGMA}
    for (label, g), (mean, var, m4) in zip(
        (("loc", g_loc), ("scale", g_scale)), measure_valued_moments(square, MU, SIGMA, coupled)
    ):
        g = g.double()
        assert mean == pytest.approx(exact[label])
        assert abs(float(g.mean()) - mean) < 4.5 * math.sqrt(var / N), (label, float(g.mean()))
        var_se = math.sqrt((m4 - var**2) / N)
        assert abs(float(g.var()) - var) < 4.5 * var_se, (label, float(g.var()), var, var_se)
    if coupled:  # the paper's closed form for the mean: 16 (mu - k)^2 Var(W) / (2 pi)
        g_mu = measure_valued_moments(square, MU, SIGMA, True)[0]
        assert g_mu[1] == pytest.approx(16 * (MU - K) ** 2 * (2 - math.pi / 2) / (2 * math.pi))


# ------------------------------------------------------------ routing and refusals
def big_guide(n, **infer):
    loc = param("big_loc", torch.zeros(n))
    pyro.sample("z", dist.Normal(loc, 1.0).to_event(1), infer={**MV, **infer})


def big_model(n):
    z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
    pyro.factor("f", -(z > 0).sum(-1).to(z.dtype))


def test_a_site_too_large_is_refused_naming_the_site_and_the_cost():
    n = 400
    count = 1 + 3 * n
    assert count > MAX_EVALUATIONS
    with pytest.raises(ValueError) as refused:
        RoutedELBO().loss(big_model, big_guide, n)
    message = str(refused.value)
    assert message.startswith("site 'z': measure_valued would evaluate")
    assert f"{count} times" in message and f"{n} elements" in message
    assert f"'max_evaluations': {count}" in message and "'score'" in message
    elbo = RoutedELBO()
    pyro.set_rng_seed(15)
    elbo.loss(big_model, lambda n: big_guide(n, max_evaluations=count), n)
    assert f"{count} evaluations side by side" in elbo.routes["z"].reason


@pytest.mark.parametrize(
    "infer, message",
    [
        ({"coupled": "yes"}, r"site 'z': infer\['coupled'\] must be True or False"),
        ({"max_evaluations": 2}, r"site 'z': infer\['max_evaluations'\] must be an int >= 4"),
    ],
)
def test_bad_options_name_the_site(infer, message):
    with pytest.raises(ValueError, match=message):
        RoutedELBO().loss(big_model, lambda n: big_guide(n, **infer), 3)


def test_only_normal_sites():
    def guide():
        pyro.sample("z", dist.LogNormal(param("m", 0.0), 1.0), infer=MV)

    with pytest.raises(
        ValueError, match=r"site 'z'.*'measure_valued'.*LogNormal\(Normal\) is not a Normal"
    ):
        RoutedELBO().loss(lambda: pyro.sample("z", dist.LogNormal(0.0, 1.0)), guide)


def test_a_batch_dim_no_plate_declares_is_refused():
    def guide():
        with pyro.plate("N", 2, dim=-2):
            pyro.sample("z", dist.Normal(param("m", torch.zeros(2, 3)), 1.0), infer=MV)

    def model():
        with pyro.plate("N", 2, dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(2, 3), 1.0))

    with pytest.raises(ValueError, match=r"site 'z': batch dim -1 \(size 3\) is declared by no"):
        RoutedELBO().loss(model, guide)


def test_a_term_outside_the_plate_is_refused():
    """Plate elements are perturbed side by side: a term outside the plate would see them all
    perturbed at once, so it is an error naming both (as for enumeration)."""

    def guide():
        with pyro.plate("N", 3):
            pyro.sample("z", dist.Normal(param("m", torch.zeros(3)), 1.0), infer=MV)

    def model():
        with pyro.plate("N", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("total", -(z.sum(-1, keepdim=True) > 0).to(z.dtype))

    with pytest.raises(ValueError, match=r"site 'z' is evaluated per element of its plates"):
        RoutedELBO().loss(model, guide)
