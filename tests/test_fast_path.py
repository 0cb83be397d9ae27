"""RoutedELBO's fast path: analytic KL(q || p) in place of log p(z) - log q(z) where exact.

Each test states the quantity it checks: the closed-form ELBO of a Gaussian model (value and
gradient, tolerance from the standard error), equality with Pyro's TraceMeanField_ELBO /
Trace_ELBO on the same draws (float tolerance), and the routes' reports.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import (
    assert_unbiased,
    draw_gradients,
    gaussian_elbo,
    gaussian_guide,
    gaussian_model,
    gaussian_params_and_exact_gradients,
    param,
)
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_reparam_conv import RoutedELBO, force_estimator, sample_elementwise_normal
from pyro_reparam_conv.kernels import analytic_kl, compact_normal_log_prob

X = torch.tensor(1.3)
SCORE = {"estimator": "score"}  # discrete sites these tests put on the score function


def _losses(elbo, n, *args):
    return torch.tensor([elbo.loss(gaussian_model, gaussian_guide, *args) for _ in range(n)])


# The analytic KL removes the noise of log p(z) - log q(z) but not its correlation with the
# likelihood: near the optimum (m = x / 2, s^2 = 1/2 here) the Monte Carlo terms cancel and
# can have *less* variance. The variance checks use a guide far from it.
FAR_LOG_S = -1.5
FAR_M = 1.2


def test_analytic_kl_loss_is_exact_in_expectation_with_less_variance():
    pyro.param("log_s", torch.tensor(FAR_LOG_S))
    gaussian_guide(X)
    exact = -gaussian_elbo(pyro.param("m"), pyro.param("log_s"), X).item()
    pyro.set_rng_seed(10)
    fast = _losses(RoutedELBO(), 1500, X)
    mc = _losses(RoutedELBO(fast_path=False), 1500, X)
    assert abs(fast.mean() - exact) < 4.5 * fast.std() / math.sqrt(len(fast))
    assert abs(mc.mean() - exact) < 4.5 * mc.std() / math.sqrt(len(mc))
    # only the likelihood is sampled now: var(-0.5 (x - z)^2) vs var of the whole MC sum
    assert fast.var() < 0.7 * mc.var()


def test_analytic_kl_gradient_is_unbiased_against_closed_form():
    pyro.param("m", torch.tensor(FAR_M))
    pyro.param("log_s", torch.tensor(FAR_LOG_S))
    params, exact = gaussian_params_and_exact_gradients(X)
    pyro.set_rng_seed(11)
    elbo = RoutedELBO()
    draws = draw_gradients(elbo, gaussian_model, gaussian_guide, params, 1500, X)
    assert elbo.routes["z"].analytic_kl
    assert_unbiased(draws, exact)
    # and with less variance than the plain Monte Carlo terms
    pyro.set_rng_seed(11)
    plain = RoutedELBO(fast_path=False)
    mc = draw_gradients(plain, gaussian_model, gaussian_guide, params, 1500, X)
    for k in params:  # d/dlog_s: (x - z) s eps against (x - 2 z) s eps
        assert draws[k].var() < 0.5 * mc[k].var(), k


# ------------------------------------------------- equal values on the same draws
def meanfield_model(data):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
    with pyro.plate("N", data.shape[0], dim=-1):
        loc = torch.zeros(data.shape[0], 2, 3, 3)
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(3))
        mean = z.mean((-3, -2, -1)) + w[..., :1]
        pyro.sample("x", dist.Normal(mean, rate.rsqrt()), obs=data)


def meanfield_guide(data):
    loc = param("w_loc", [0.3, -0.2])
    a = pyro.param("a", torch.tensor(3.0), constraint=dist.constraints.positive)
    n = data.shape[0]
    z_mean = param("z_mean", torch.linspace(-1, 1, n * 18).reshape(n, 2, 3, 3))
    z_var = param("z_var", torch.full((data.shape[0], 2, 3, 3), -0.5))
    pyro.sample("w", dist.Normal(loc, 0.7).to_event(1))
    pyro.sample("rate", dist.Gamma(a, 2.0))
    with pyro.plate("N", data.shape[0], dim=-1):
        sample_elementwise_normal("z", z_mean, z_var, "softplus")


MF_DATA = torch.tensor([0.5, -1.0, 2.0, 0.1])


def _value_and_grads(elbo, model, guide, *args):
    guide(*args)
    params = dict(pyro.get_param_store().named_parameters())
    for p in params.values():
        p.grad = None
    pyro.set_rng_seed(12)
    loss = elbo.loss_and_grads(model, guide, *args)
    grads = {k: p.grad.clone() for k, p in params.items()}
    pyro.set_rng_seed(12)
    value = elbo.loss(model, guide, *args)
    return loss, value, grads


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
@pytest.mark.parametrize("fast_path, reference", [(True, TraceMeanField_ELBO), (False, Trace_ELBO)])
def test_values_and_gradients_equal_pyro_on_the_same_draws(fast_path, reference, validate):
    """Unvalidated, the fast path also computes Normal(out, 1.0)-style log-densities on the
    compact (unexpanded) parameters: still equal to Pyro's."""
    with pyro.validation_enabled(validate):
        expected = _value_and_grads(reference(), meanfield_model, meanfield_guide, MF_DATA)
        elbo = RoutedELBO(fast_path=fast_path)
        got = _value_and_grads(elbo, meanfield_model, meanfield_guide, MF_DATA)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    assert got[1] == pytest.approx(expected[1], rel=1e-5)
    for k in expected[2]:
        torch.testing.assert_close(got[2][k], expected[2][k], rtol=1e-5, atol=1e-6)


def test_fast_path_changes_the_value_only_by_the_kl_terms():
    """fast_path=True and False differ on the same draws (the KL replaces the MC terms)."""
    meanfield_guide(MF_DATA)
    pyro.set_rng_seed(13)
    fast = RoutedELBO().loss(meanfield_model, meanfield_guide, MF_DATA)
    pyro.set_rng_seed(13)
    plain = RoutedELBO(fast_path=False).loss(meanfield_model, meanfield_guide, MF_DATA)
    assert fast != pytest.approx(plain, rel=1e-6)


# --------------------------------------------------------------------- routes
def test_routes_report_analytic_kl_on_every_step():
    elbo = RoutedELBO()
    for _ in range(3):  # first step tracks provenance, later ones reuse the cached map
        elbo.loss_and_grads(meanfield_model, meanfield_guide, MF_DATA)
        for name in ("w", "rate", "z"):
            assert elbo.routes[name].analytic_kl, elbo.routes[name]
        assert "analytic KL(Normal\u2016Normal)" in elbo.routes["z"].reason
        assert "analytic KL(Gamma\u2016Gamma)" in elbo.routes["rate"].reason
    elbo = RoutedELBO(fast_path=False)
    elbo.loss(meanfield_model, meanfield_guide, MF_DATA)
    assert not any(r.analytic_kl for r in elbo.routes.values())


def hierarchical_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    z = pyro.sample("z", dist.Normal(mu, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def hierarchical_guide(x):
    pyro.sample("mu", dist.Normal(param("mu_loc", 0.1), 1.0))
    pyro.sample("z", dist.Normal(param("z_loc", 0.2), 0.8))


def test_no_analytic_kl_when_the_prior_depends_on_another_latent():
    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss_and_grads(hierarchical_model, hierarchical_guide, X)
        assert elbo.routes["mu"].analytic_kl
        assert not elbo.routes["z"].analytic_kl
        assert "prior depends on latent 'mu'" in elbo.routes["z"].reason


def test_no_analytic_kl_when_the_prior_depends_on_a_score_site():
    def model():
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.3, 0.7])))
        pyro.sample("z", dist.Normal(torch.tensor([-1.0, 1.0])[y], 1.0))

    def guide():
        pyro.sample("y", dist.Categorical(logits=param("logits", [0.0, 0.5])), infer=SCORE)
        pyro.sample("z", dist.Normal(param("loc", 0.0), 1.0))

    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss_and_grads(model, guide)
        assert elbo.routes["y"].estimator == "score"
        assert not elbo.routes["z"].analytic_kl
        assert "latent 'y'" in elbo.routes["z"].reason


def test_no_analytic_kl_on_a_site_forced_onto_score():
    elbo = RoutedELBO()
    elbo.loss_and_grads(gaussian_model, force_estimator(gaussian_guide, "score"), X)
    assert elbo.routes["z"].estimator == "score" and not elbo.routes["z"].analytic_kl


def test_no_analytic_kl_without_dependency_information():
    elbo = RoutedELBO(dependency_tracking="order")
    elbo.loss(gaussian_model, gaussian_guide, X)
    assert not elbo.routes["z"].analytic_kl and "unknown" in elbo.routes["z"].reason


def test_no_analytic_kl_without_a_closed_form():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.StudentT(4.0, param("loc", 0.0), 1.0))

    elbo = RoutedELBO()
    loss = elbo.loss(model, guide)
    assert math.isfinite(loss)
    assert not elbo.routes["z"].analytic_kl
    assert "no closed-form KL(StudentT" in elbo.routes["z"].reason


def test_compact_normal_log_prob_equals_log_prob():
    out = torch.randn(2, 3, 4, 4)
    value = torch.randn(2, 3, 4, 4)
    for fn in (dist.Normal(out, 0.7).to_event(3), dist.Normal(0.0, 2.0).expand([2, 3, 4, 4])):
        torch.testing.assert_close(compact_normal_log_prob(fn, value), fn.log_prob(value))
    assert compact_normal_log_prob(dist.Normal(out, out.exp()), value) is None  # nothing to save
    assert compact_normal_log_prob(dist.Gamma(out.exp(), 1.0), value.exp()) is None


def test_normal_kl_does_not_need_a_materialized_prior():
    q = dist.Normal(torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4) + 0.5).to_event(3)
    p = dist.Normal(0.0, 1.0).expand([2, 3, 4, 4]).to_event(3)
    expected = torch.distributions.kl_divergence(q, p)
    torch.testing.assert_close(analytic_kl(q, p), expected)
    assert analytic_kl(q, p).shape == (2,)


# ------------------------------------------------------- subsampled plate scaling
SUB_DATA = torch.tensor([0.2, 1.5, -0.3, 0.9, 2.1, -1.2])


def local_model(data, subsample_size=None):
    with pyro.plate("N", len(data), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])


def local_guide(data, subsample_size=None):
    m = param("m", torch.linspace(-0.5, 0.5, len(data)))
    log_s = param("log_s", torch.linspace(-1.0, 0.2, len(data)))
    with pyro.plate("N", len(data), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(m[idx], log_s[idx].exp()))


def test_subsampled_kl_is_scaled_like_trace_mean_field():
    local_guide(SUB_DATA)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        expected = TraceMeanField_ELBO().loss(local_model, local_guide, SUB_DATA, 2)
        pyro.set_rng_seed(seed)
        elbo = RoutedELBO()
        got = elbo.loss(local_model, local_guide, SUB_DATA, 2)
        assert got == pytest.approx(expected, rel=1e-6)
        assert elbo.routes["z"].analytic_kl


def test_subsampled_gradient_is_unbiased_for_the_full_data_elbo():
    local_guide(SUB_DATA)
    params = dict(pyro.get_param_store().named_parameters())
    loss = -gaussian_elbo(params["m"], params["log_s"], SUB_DATA).sum()
    exact = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    pyro.set_rng_seed(14)
    draws = draw_gradients(RoutedELBO(), local_model, local_guide, params, 1500, SUB_DATA, 2)
    assert_unbiased(draws, exact)


# -------------------------------------------- with score sites and changing structure
def test_kl_below_a_score_site_keeps_gradients_unbiased():
    """y ~ Categorical (score); z | y ~ N(m[y], s), prior N(0, 1) (analytic KL); x ~ N(z + y, 1).

    Exact ELBO: sum_y q(y) [log p(y) - log q(y) + gaussian_elbo(m[y], log_s, x - y)].
    """
    x = torch.tensor(1.1)
    prior_y = torch.tensor([0.3, 0.7])

    def model():
        y = pyro.sample("y", dist.Categorical(prior_y))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + y, 1.0), obs=x)

    def guide():
        logits = param("logits", [0.2, -0.1])
        m = param("m", [0.5, -0.3])
        log_s = param("log_s", -0.5)
        y = pyro.sample("y", dist.Categorical(logits=logits), infer=SCORE)
        pyro.sample("z", dist.Normal(m[y], log_s.exp()))

    guide()
    params = dict(pyro.get_param_store().named_parameters())
    log_qy = params["logits"].log_softmax(-1)
    elbo_y = torch.stack([gaussian_elbo(params["m"][k], params["log_s"], x - k) for k in range(2)])
    loss = -(log_qy.exp() * (prior_y.log() - log_qy + elbo_y)).sum()
    exact = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    pyro.set_rng_seed(15)
    elbo = RoutedELBO()
    draws = draw_gradients(elbo, model, guide, params, 1500)
    assert elbo.routes["y"].estimator == "score" and elbo.routes["z"].analytic_kl
    assert_unbiased(draws, exact)


def test_kl_sites_skip_their_log_densities_after_the_first_step():
    elbo = RoutedELBO()
    first = elbo.site_terms(gaussian_model, gaussian_guide, X)
    second = elbo.site_terms(gaussian_model, gaussian_guide, X)
    assert "log_prob" in first[0].model_trace.nodes["z"]  # tracked step: everything computed
    assert "log_prob" not in second[0].model_trace.nodes["z"]  # the KL replaces it
    assert "log_prob" not in second[0].guide_trace.nodes["z"]
    assert "log_prob" in second[0].model_trace.nodes["x"]


def test_structure_change_retracks_before_using_analytic_kl_again():
    """The structure changes with state the arguments do not show (a closure here): the
    cached prior map is not used, then found again. A changed argument is tracked at once."""
    state = {"extra": False}

    def model(extra=None):
        extra = state["extra"] if extra is None else extra
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0)) if extra else 0.0
        pyro.sample("z", dist.Normal(mu, 1.0))

    def guide(extra=None):
        if (state["extra"] if extra is None else extra):
            pyro.sample("mu", dist.Normal(param("mu_loc", 0.0), 1.0))
        pyro.sample("z", dist.Normal(param("z_loc", 0.0), 1.0))

    elbo = RoutedELBO()
    elbo.loss(model, guide)
    assert elbo.routes["z"].analytic_kl
    state["extra"] = True
    elbo.loss(model, guide)  # new sites: the cached prior map no longer applies
    assert not elbo.routes["z"].analytic_kl and "unknown" in elbo.routes["z"].reason
    elbo.loss(model, guide)  # tracked again: z's prior depends on mu
    assert not elbo.routes["z"].analytic_kl and "latent 'mu'" in elbo.routes["z"].reason
    assert elbo.routes["mu"].analytic_kl
    fresh = RoutedELBO()
    fresh.loss(model, guide, False)
    fresh.loss(model, guide, True)  # a changed argument: tracked on this very step
    assert not fresh.routes["z"].analytic_kl and "latent 'mu'" in fresh.routes["z"].reason


def test_no_analytic_kl_on_a_delta_guide_site():
    """AutoNormal's constrained sites are Deltas with a log_density (here log|d exp|)."""
    from pyro.infer.autoguide import AutoNormal

    def model():
        pyro.sample("rate", dist.Gamma(2.0, 2.0))

    guide = AutoNormal(model)
    guide()  # initialize its parameters (this draws random numbers)
    elbo = RoutedELBO()
    for seed in range(2):
        pyro.set_rng_seed(seed)
        expected = Trace_ELBO().loss(model, guide)
        pyro.set_rng_seed(seed)
        assert elbo.loss(model, guide) == pytest.approx(expected, rel=1e-6)
    assert not elbo.routes["rate"].analytic_kl and "Delta" in elbo.routes["rate"].reason


# ------------------------------------------ few-pass KL and likelihood (issue 5)
def _grads(value, tensors, create_graph=False):
    # retain_graph: the compared expressions share the graph of their inputs
    return torch.autograd.grad(value, tensors, create_graph=create_graph, retain_graph=True)


def assert_same_derivatives(got, expected, inputs):
    """First derivatives of two scalars w.r.t. ``inputs`` agree, and so do the second
    (the gradient of the squared-gradient norm: a Hessian-vector product)."""
    g_got = _grads(got, inputs, create_graph=True)
    g_exp = _grads(expected, inputs, create_graph=True)
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b)
    h_got = _grads(sum((g**2).sum() for g in g_got), inputs)
    h_exp = _grads(sum((g**2).sum() for g in g_exp), inputs)
    for a, b in zip(h_got, h_exp):
        torch.testing.assert_close(a, b)


def test_compact_normal_log_prob_with_one_scale_equals_log_prob_with_gradients():
    """Normal(out, s).to_event(3) takes the squared-distance path: value, gradients in loc
    and value, second derivatives (create_graph) and repeated backward all match log_prob."""
    torch.manual_seed(0)
    out = torch.randn(2, 3, 4, 4, requires_grad=True)
    value = torch.randn(2, 3, 4, 4, requires_grad=True)
    for s in (1.0, 0.7):
        fn = dist.Normal(out, s).to_event(3)
        got, expected = compact_normal_log_prob(fn, value), fn.log_prob(value)
        assert got.shape == expected.shape == (2,)
        torch.testing.assert_close(got, expected)
        w = torch.tensor([0.3, -1.2])
        assert_same_derivatives((got * w).sum(), (expected * w).sum(), [out, value])
    lp = compact_normal_log_prob(dist.Normal(out, 1.0).to_event(3), value).sum()
    lp.backward(retain_graph=True)
    g1 = out.grad.clone()
    lp.backward()  # the retained graph runs twice
    torch.testing.assert_close(out.grad, 2 * g1)


@pytest.mark.parametrize(
    "p_loc, p_scale, site_scale",
    [(0.0, 1.0, 1.0), (0.3, 2.0, 1.0), (0.0, 1.0, 0.25), (-0.5, 0.5, 3.0)],
)
def test_site_kl_with_a_one_value_prior_equals_kl_divergence(p_loc, p_scale, site_scale):
    """The few-pass KL sum (standard and general one-value priors, scaled sites) equals
    torch's kl_divergence summed: value, gradients and second derivatives."""
    from pyro_reparam_conv.analytic_kl import site_kl

    torch.manual_seed(1)
    m = torch.randn(3, 2, 5, requires_grad=True)
    raw = torch.randn(3, 2, 5, requires_grad=True)
    q = dist.Normal(m, torch.nn.functional.softplus(raw)).to_event(2)
    p = dist.Normal(torch.tensor(p_loc), torch.tensor(p_scale)).expand([3, 2, 5]).to_event(2)
    got = site_kl({"fn": q, "scale": site_scale, "mask": None}, {"fn": p})
    expected = site_scale * torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(got, expected)
    assert_same_derivatives(got, expected, [m, raw])


def test_site_kl_with_a_learnable_one_value_prior():
    """A prior loc/scale that requires grad gets its gradient (plain autograd path)."""
    from pyro_reparam_conv.analytic_kl import site_kl

    torch.manual_seed(2)
    m = torch.randn(4, 3, requires_grad=True)
    s = (torch.rand(4, 3) + 0.5).requires_grad_()
    p_loc = torch.tensor(0.2, requires_grad=True)
    p_scale = torch.tensor(1.5, requires_grad=True)
    q = dist.Normal(m, s).to_event(1)
    p = dist.Normal(p_loc, p_scale).expand([4, 3]).to_event(1)
    got = site_kl({"fn": q, "scale": 1.0, "mask": None}, {"fn": p})
    expected = torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(got, expected)
    for a, b in zip(_grads(got, [m, s, p_loc, p_scale]), _grads(expected, [m, s, p_loc, p_scale])):
        torch.testing.assert_close(a, b)


def conv_model(y, conv):
    pyro.module("conv", conv)
    with pyro.plate("batch", y.shape[0], dim=-1):
        prior = dist.Normal(torch.zeros(()), 1.0).expand([y.shape[0], 3, 5, 5])
        z = pyro.sample("z", prior.to_event(3))
        pyro.sample("y", dist.Normal(conv(z), 1.0).to_event(3), obs=y)


def conv_guide(y, conv):
    mean = param("conv_mean", 0.1 * torch.arange(2 * 75.0).reshape(2, 3, 5, 5).sin())
    raw_var = param("conv_raw_var", torch.full((2, 3, 5, 5), -1.0))
    with pyro.plate("batch", y.shape[0], dim=-1):
        std = torch.nn.functional.softplus(raw_var).sqrt()
        pyro.sample("z", dist.Normal(mean, std).to_event(3))


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
@pytest.mark.parametrize("fast_path, reference", [(True, TraceMeanField_ELBO), (False, Trace_ELBO)])
def test_seed_workload_equals_pyro_on_the_same_draws(fast_path, reference, validate):
    """The issue-5 workload (conv likelihood Normal(out, 1), standard normal prior): values
    and gradients (conv weights included) equal Pyro's on the same draws."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    y = torch.randn(2, 4, 5, 5)
    with pyro.validation_enabled(validate):
        expected = _value_and_grads(reference(), conv_model, conv_guide, y, conv)
        elbo = RoutedELBO(fast_path=fast_path)
        for _ in range(2):  # the tracked first step and an untracked one
            got = _value_and_grads(elbo, conv_model, conv_guide, y, conv)
            assert got[0] == pytest.approx(expected[0], rel=1e-5)
            assert got[1] == pytest.approx(expected[1], rel=1e-5)
            for k in expected[2]:
                torch.testing.assert_close(got[2][k], expected[2][k], rtol=1e-5, atol=1e-6)
    assert elbo.routes["z"].analytic_kl == fast_path


# ------------------------------------------------- measured: KL only where it lowers variance
def conjugate_model(x):
    mu = param("mu", 0.3)
    z = pyro.sample("z", dist.Normal(mu, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def exact_posterior_guide(x):
    """q equal to the posterior of conjugate_model, built from the model's own param (as
    Pyro's test_beta_binomial_elbo does): log p(x, z) - log q(z) = log p(x) for every z."""
    mu = pyro.param("mu")
    pyro.sample("z", dist.Normal((mu + x) / 2, math.sqrt(0.5)))


VECTORIZED = dict(num_particles=200, vectorize_particles=True, max_plate_nesting=0)


def test_exact_posterior_guide_keeps_the_zero_variance_monte_carlo_terms():
    for seed in range(3):
        pyro.set_rng_seed(seed)
        param("mu", 0.3)
        elbo = RoutedELBO(**VECTORIZED)
        loss = elbo.differentiable_loss(conjugate_model, exact_posterior_guide, X)
        route = elbo.routes["z"]
        assert not route.analytic_kl and "measured" in route.reason, route.reason
        mu = pyro.param("mu")
        log_evidence = dist.Normal(mu, math.sqrt(2.0)).log_prob(X)
        assert torch.allclose(loss, -log_evidence, atol=1e-5)
        (grad,) = torch.autograd.grad(
            loss, [pyro.get_param_store().get_param("mu").unconstrained()]
        )
        assert torch.allclose(grad, -(X - mu) / 2, atol=1e-5)  # every draw: no variance


def test_far_from_the_posterior_the_analytic_kl_is_measured_to_win():
    pyro.param("log_s", torch.tensor(FAR_LOG_S))
    pyro.param("m", torch.tensor(FAR_M))
    pyro.set_rng_seed(0)
    elbo = RoutedELBO(**VECTORIZED)
    elbo.loss(gaussian_model, gaussian_guide, X)
    assert elbo.routes["z"].analytic_kl
    assert "measured" not in elbo.routes["z"].reason


def test_few_particles_are_not_measured():
    elbo = RoutedELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    param("mu", 0.3)
    elbo.loss(conjugate_model, exact_posterior_guide, X)
    assert elbo.routes["z"].analytic_kl
