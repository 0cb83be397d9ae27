"""The per-site term table and what it fixed: every part of every guide site's score parts
enters the surrogate (guide factors, observed guide sites, partially reparameterized
distributions), checked against Trace_ELBO's gradients on the same draws (float tolerance);
baselines with the wrong shape are refused; the table is what loss, surrogate, the
non-finite scan and the audit read."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import binary_tensors, exact_elbo, param
from pyro.distributions.testing.rejection_gamma import ShapeAugmentedGamma
from pyro.infer import Trace_ELBO

from pyro_reparam_conv import RoutedELBO, audit_gradients
from pyro_reparam_conv.elbo import NonFiniteLossError


def _loss_and_grads(elbo, model, guide, names, seed, *args):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, *args)
    params = [pyro.param(n).unconstrained() for n in names]
    return float(loss.detach()), torch.autograd.grad(loss, params)


def factor_model(*args):
    pyro.sample("mu", dist.Normal(0.0, 1.0))


def factor_guide(has_rsample=True):
    m = param("m", 0.5)
    s = param("s", 2.0)
    pyro.sample("mu", dist.Normal(m, 1.0))
    pyro.factor("jac", -(s**2), has_rsample=has_rsample)
    pyro.sample("aux", dist.Normal(s, 1.0), obs=torch.tensor(0.0))


@pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide")
@pytest.mark.parametrize("fast_path", [True, False])
def test_guide_factor_and_observed_guide_site_get_their_gradient(fast_path):
    """d loss / d s = -2 s (factor -s^2 in log q) - s (log N(0 | s, 1) in log q) = -6."""
    expected = _loss_and_grads(Trace_ELBO(), factor_model, factor_guide, ["m", "s"], 0)
    got = _loss_and_grads(
        RoutedELBO(fast_path=fast_path), factor_model, factor_guide, ["m", "s"], 0
    )
    assert got[1][1].item() == pytest.approx(-6.0)
    assert got[1][1].item() == pytest.approx(expected[1][1].item())
    if not fast_path:  # the same Monte Carlo terms as Trace_ELBO
        assert got[0] == pytest.approx(expected[0], rel=1e-6)
        torch.testing.assert_close(got[1][0], expected[1][0])
    audit = audit_gradients(factor_model, factor_guide, elbo=RoutedELBO(fast_path=fast_path))
    assert audit.no_gradient == []
    assert set(audit.param("s").sites) == {"jac", "aux"}


def test_guide_factor_without_rsample_is_an_unbiased_score_function_term():
    """A guide factor with has_rsample=False is the log-density of a draw the guide made
    without rsample (here a hidden Bernoulli b): its gradient is a score-function term whose
    cost must count its own -log q. The exact gradient of -ELBO = KL(q || p) in the logit is
    matched within the standard error. (Pyro's Trace_ELBO leaves guide-only sites out of
    its cost and is biased here: 0.209 +- 0.005 against the exact 0.300.)"""
    shared = {}
    prior = torch.tensor(0.3)

    def model():
        pyro.factor("log_p", dist.Bernoulli(prior).log_prob(shared["b"]))

    def guide():
        q = dist.Bernoulli(logits=param("theta", 0.4))
        shared["b"] = q.sample()
        pyro.factor("log_q", q.log_prob(shared["b"]), has_rsample=False)

    theta = param("theta", 0.4)
    q1 = torch.sigmoid(theta)
    kl = q1 * (q1 / prior).log() + (1 - q1) * ((1 - q1) / (1 - prior)).log()
    exact = torch.autograd.grad(kl, theta)[0]
    pyro.set_rng_seed(0)
    elbo = RoutedELBO()
    draws = torch.stack(
        [torch.autograd.grad(elbo.differentiable_loss(model, guide), theta)[0] for _ in range(2000)]
    )
    se = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 4.5 * se, (draws.mean(), exact, se)
    (table,) = elbo.site_terms(model, guide)
    log_q = next(row for row in table.rows if row.site == "log_q")
    assert log_q.score is not None and log_q.estimator is None  # a guide factor: not routed


def gamma_model(x):
    with pyro.plate("N", len(x)):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        pyro.sample("x", dist.Poisson(rate), obs=x)


def gamma_guide(x):
    alpha = pyro.param("alpha", torch.full((len(x),), 0.5), constraint=dist.constraints.positive)
    beta = pyro.param("beta", torch.full((len(x),), 1.5), constraint=dist.constraints.positive)
    with pyro.plate("N", len(x)):
        pyro.sample("rate", ShapeAugmentedGamma(alpha, beta))


@pytest.mark.parametrize("fast_path", [True, False])
def test_rejection_sampled_gamma_keeps_its_score_function_part(fast_path):
    """Pyro's ShapeAugmentedGamma (RSVI, Naesseth et al. 2017) is partially
    reparameterized: its score_parts carry the accept step's score function. The gradient in
    the concentration equals Trace_ELBO's on the same draws (a plate of independent sites:
    the Rao-Blackwellized cost of each is its own terms, which is what Trace_ELBO's log_r
    summed to the plate is); the fast path says why it uses no analytic KL."""
    x = torch.tensor([0.0, 3.0, 1.0])
    for seed in range(3):
        expected = _loss_and_grads(
            Trace_ELBO(), gamma_model, gamma_guide, ["alpha", "beta"], seed, x
        )
        elbo = RoutedELBO(fast_path=fast_path)
        got = _loss_and_grads(elbo, gamma_model, gamma_guide, ["alpha", "beta"], seed, x)
        assert got[0] == pytest.approx(expected[0], rel=1e-6)
        for a, b in zip(got[1], expected[1]):
            torch.testing.assert_close(a, b)
    assert elbo.routes["rate"].estimator == "pathwise"
    if fast_path:
        assert "no analytic KL: partially reparameterized" in elbo.routes["rate"].reason


@pytest.mark.parametrize("fast_path", [True, False])
def test_rejection_sampled_gamma_gradient_is_unbiased_against_closed_form(fast_path):
    """rate ~ Gamma(2, 1), loc ~ N(0, 1), x ~ N(loc + rate, 1); q = Gamma(a, 1.5) (RSVI) x
    N(m, 0.8^2). The ELBO is closed-form in (a, m) (digamma and lgamma terms), and the
    mean of 40 estimates of 4000 vectorized particles each matches its gradient within 4.5
    standard errors. Dropping the accept step's score function (as before this table)
    biases d/da by about -0.056, about 5 standard errors here."""
    x, beta, s = 2.0, 1.5, 0.8

    def model():
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(loc + rate, 1.0), obs=torch.tensor(x))

    def guide():
        a = pyro.param("a", torch.tensor(0.5), constraint=dist.constraints.positive)
        pyro.sample("rate", ShapeAugmentedGamma(a, torch.tensor(beta)))
        pyro.sample("loc", dist.Normal(param("m", 0.3), s))

    guide()
    a, m = pyro.param("a").unconstrained(), pyro.param("m")
    alpha = a.exp()
    mean_r, var_r = alpha / beta, alpha / beta**2
    elbo = (
        torch.digamma(alpha) - math.log(beta) - mean_r  # E log Gamma(rate | 2, 1)
        - 0.5 * (m**2 + s**2)  # E log N(loc | 0, 1) + 0.5 log 2 pi
        - 0.5 * ((x - m - mean_r) ** 2 + s**2 + var_r)  # E log N(x | loc + rate, 1) + ...
        + alpha - math.log(beta) + torch.lgamma(alpha) + (1 - alpha) * torch.digamma(alpha)
        + math.log(s)  # entropies, up to constants
    )  # fmt: skip
    exact = torch.autograd.grad(-elbo, [a, m])
    pyro.set_rng_seed(5)
    routed = RoutedELBO(num_particles=4000, vectorize_particles=True, fast_path=fast_path)
    estimates = [torch.autograd.grad(routed.differentiable_loss(model, guide), [a, m])
                 for _ in range(40)]  # fmt: skip
    for k in range(2):
        draws = torch.stack([e[k] for e in estimates])
        se = draws.std() / math.sqrt(len(draws))
        assert abs(draws.mean() - exact[k]) < 4.5 * se, (k, draws.mean(), exact[k], se)


# ----------------------------------------------------------------- baselines
DATA = torch.tensor([0.3, 1.8, 2.4])


def bern_model(data=DATA):
    with pyro.plate("N", len(data)):
        c = pyro.sample("c", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=data)


def bern_guide(data=DATA, baseline=None):
    logits = param("logits", [0.3, -0.4, 0.8])
    with pyro.plate("N", len(data)):
        infer = {"estimator": "score"}  # the estimator whose baselines these tests are about
        if baseline is not None:
            infer["baseline"] = baseline
        pyro.sample("c", dist.Bernoulli(logits=logits), infer=infer)


@pytest.mark.parametrize(
    "baseline",
    [
        {"baseline_value": torch.zeros(7)},
        {"baseline_value": torch.zeros(1)},
        {"nn_baseline": torch.nn.Linear(1, 1), "nn_baseline_input": torch.ones(1)},
    ],
    ids=["value-7", "value-1", "nn-1"],
)
def test_a_baseline_of_the_wrong_shape_names_the_site_and_both_shapes(baseline):
    with pytest.raises(ValueError, match=r"site 'c': baseline of shape \((7|1),\).*shape \(3,\)"):
        RoutedELBO().loss_and_grads(bern_model, lambda data=DATA: bern_guide(data, baseline))


def test_baseline_value_of_the_right_shape_is_used():
    def guide(data=DATA):
        bern_guide(data, {"baseline_value": torch.full((3,), -2.0)})

    elbo = RoutedELBO()
    elbo.loss_and_grads(bern_model, guide)
    assert elbo.routes["c"].baseline == "value"


def test_pyro_decaying_average_switch_false_means_no_baseline():
    """Pyro's SVI Part III compares {"use_decaying_avg_baseline": False} with True: False must
    be no baseline at all, on the same draws the gradient of RoutedELBO(baseline=None)."""
    switch_off = {"use_decaying_avg_baseline": False}
    grads = {}
    for name, elbo, baseline in (
        ("off", RoutedELBO(), switch_off),
        ("none", RoutedELBO(baseline=None), None),
    ):
        pyro.clear_param_store()
        values = []
        for seed in range(5):
            pyro.set_rng_seed(seed)
            loss = elbo.differentiable_loss(
                bern_model, lambda data=DATA, b=baseline: bern_guide(data, b)
            )
            values.append(torch.autograd.grad(loss, [pyro.param("logits")])[0])
        grads[name] = values
        if name == "off":
            assert elbo.routes["c"].baseline == "none", elbo.routes["c"]
    for a, b in zip(grads["off"], grads["none"]):
        torch.testing.assert_close(a, b)
    on = RoutedELBO()
    on.loss(bern_model, lambda data=DATA: bern_guide(data, {"use_decaying_avg_baseline": True}))
    assert on.routes["c"].baseline.startswith("decaying_avg")


# ------------------------------------------------------------------ the table
def test_the_table_adds_up_to_the_loss_and_names_its_rows():
    """Loss = -(sum of the rows' ELBO terms); rows name model, guide and analytic-KL sites."""

    def model(data):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("N", len(data)):
            c = pyro.sample("c", dist.Bernoulli(0.4))
            pyro.sample("x", dist.Normal(2 * c - 1 + z, 1.0), obs=data)

    def guide(data):
        pyro.sample("z", dist.Normal(param("zm", 0.1), 0.9))
        with pyro.plate("N", len(data)):
            logits = param("logits", [0.3, -0.4, 0.8])
            pyro.sample("c", dist.Bernoulli(logits=logits), infer={"estimator": "score"})

    elbo = RoutedELBO()
    pyro.set_rng_seed(3)
    (table,) = elbo.site_terms(model, guide, DATA)
    pyro.set_rng_seed(3)
    loss = elbo.loss(model, guide, DATA)
    assert -sum(float(row.elbo.detach()) for row in table.rows) == pytest.approx(loss, rel=1e-6)
    labels = {row.label for row in table.rows}
    assert labels == {"c (model)", "x (model)", "c (guide)", "z (analytic KL)"}
    (scored,) = table.scored()
    assert scored.site == "c" and scored.score.shape == scored.cost.shape == (3,)
    assert scored.baseline.kind == "decaying_avg"
    assert table.dependencies[("model", "x")] == frozenset({"z", "c"})


def test_non_finite_rows_are_named():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(float("nan")))

    def guide():
        pyro.sample("z", dist.Normal(param("m", 0.0), 1.0))

    with pyro.validation_enabled(False):
        (table,) = RoutedELBO().site_terms(model, guide)
        assert table.non_finite() == ["x (model)"]
        with pytest.raises(NonFiniteLossError, match=r"x \(model\)"):
            RoutedELBO().loss(model, guide)


def test_empty_model_and_guide_give_a_zero_loss_like_trace_elbo():
    def empty():
        pass

    elbo = RoutedELBO()
    assert elbo.loss(empty, empty) == 0.0
    assert elbo.differentiable_loss(empty, empty) == 0.0
    assert elbo.loss_and_grads(empty, empty) == 0.0


def test_particles_are_values_not_state():
    """Each particle's routes are its own: a guide whose route changes between particles
    (score on even calls) reports each particle's route in its table, whatever Pyro does
    with the particle loop."""
    calls = []

    def guide():
        calls.append(None)
        infer = {"estimator": "score"} if len(calls) % 2 else {}
        pyro.sample("z", dist.Normal(param("m", 0.0), 1.0), infer=infer)

    elbo = RoutedELBO(num_particles=4, dependency_tracking="always")
    tables = elbo.site_terms(factor_model_z, guide)
    estimators = [t.routes["z"].estimator for t in tables]
    assert estimators == ["score", "pathwise", "score", "pathwise"]
    for table in tables:
        kl = any(row.role == "kl" for row in table.rows)
        assert kl == (table.routes["z"].estimator == "pathwise") == table.routes["z"].analytic_kl


def factor_model_z():
    pyro.sample("z", dist.Normal(0.0, 1.0))


def test_score_gradient_is_unbiased_with_every_table_path():
    """The enumeration check of the score route, through the table (order-based costs)."""
    guide = bern_guide
    guide()
    params = dict(pyro.get_param_store().named_parameters())
    loss = -exact_elbo(bern_model, guide, {"c": binary_tensors((3,))})
    exact = torch.autograd.grad(loss, list(params.values()))[0]
    pyro.set_rng_seed(4)
    elbo = RoutedELBO(dependency_tracking="order")
    draws = []
    for _ in range(1500):
        loss = elbo.differentiable_loss(bern_model, guide)
        draws.append(torch.autograd.grad(loss, list(params.values()))[0])
    draws = torch.stack(draws)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4.5 * se).all()


def test_no_warning_on_import_or_plain_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RoutedELBO().loss(factor_model_z, lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))
