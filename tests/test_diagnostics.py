"""Diagnostics: gradient audit (routes, parameters cut off from the gradient) and the estimator
comparison, whose means and variances are checked against Gauss-Hermite quadrature.

The Gaussian example: guide ``x ~ N(mu, sigma)`` with unconstrained params ``mu``, ``sigma``
and model ``x ~ N(k, 1/sqrt(2))``, so ``log p(x) = -(x - k)^2 - log(pi)/2`` and one draw of
the loss (-ELBO) is ``(x - k)^2 + log q(x) + const``. With ``x = mu + sigma * eps``:

- pathwise: ``d/dmu = 2 (x - k)`` (variance ``4 sigma^2``), ``d/dsigma = 2 (x - k) eps - 1/sigma``
  (variance ``4 ((mu - k)^2 + 2 sigma^2)``);
- score, no baseline: ``-(log p(x) - log q(x)) * d log q(x)``, with ``d/dmu log q = eps / sigma``
  and ``d/dsigma log q = (eps^2 - 1) / sigma``;
- score, leave-one-out with 2 particles: ``-(1/2) sum_k d log q(x_k) (c_k - c_{other})`` with
  ``c = log p - log q``.

Every estimate is a polynomial in eps, so quadrature with 60 nodes is exact for its mean,
variance and fourth central moment. Tolerances: 4 standard errors, ``sqrt(var / n)`` for a
mean and ``sqrt((m4 - var^2) / n)`` for a sample variance.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import param
from numpy.polynomial.hermite_e import hermegauss
from torch import nn

from pyro_reparam_conv.diagnostics import GradientAudit, audit_gradients, compare_estimators
from pyro_reparam_conv.plots import plot_estimator_comparison

MU, SIGMA, K = 0.5, 1.2, 2.0
NUM_DRAWS = 1000


def normal_model():
    pyro.sample("x", dist.Normal(K, 1 / math.sqrt(2)))


def normal_guide():
    pyro.sample("x", dist.Normal(param("mu", MU), param("sigma", SIGMA)))


# ------------------------------------------------------------------- exact, by quadrature
NODES, WEIGHTS = hermegauss(60)
WEIGHTS = WEIGHTS / math.sqrt(2 * math.pi)  # expectations under eps ~ N(0, 1)


def _log_p(x):
    return -((x - K) ** 2) - 0.5 * math.log(math.pi)


def _log_q(eps):
    return -math.log(SIGMA) - 0.5 * math.log(2 * math.pi) - eps**2 / 2


def _dlogq(eps):
    return {"mu": eps / SIGMA, "sigma": (eps**2 - 1) / SIGMA}


def _pathwise(eps):
    x = MU + SIGMA * eps
    return {"mu": 2 * (x - K), "sigma": 2 * (x - K) * eps - 1 / SIGMA}


def _score(eps):
    cost = _log_p(MU + SIGMA * eps) - _log_q(eps)
    return {k: -cost * d for k, d in _dlogq(eps).items()}


def _score_loo(eps1, eps2):
    c1 = _log_p(MU + SIGMA * eps1) - _log_q(eps1)
    c2 = _log_p(MU + SIGMA * eps2) - _log_q(eps2)
    d1, d2 = _dlogq(eps1), _dlogq(eps2)
    return {k: -0.5 * (d1[k] * (c1 - c2) + d2[k] * (c2 - c1)) for k in d1}


def _moments(values, weights):
    mean = np.sum(weights * values)
    var = np.sum(weights * (values - mean) ** 2)
    m4 = np.sum(weights * (values - mean) ** 4)
    return mean, var, m4


def exact_moments(estimator: str) -> dict:
    """Per parameter: (mean, variance, 4th central moment) of one draw of the estimator."""
    if estimator == "score+loo":
        e1, e2 = np.meshgrid(NODES, NODES, indexing="ij")
        w = np.outer(WEIGHTS, WEIGHTS)
        return {k: _moments(v, w) for k, v in _score_loo(e1, e2).items()}
    fn = {"pathwise": _pathwise, "score": _score}[estimator]
    return {k: _moments(v, WEIGHTS) for k, v in fn(NODES).items()}


def test_quadrature_matches_closed_forms():
    exact = exact_moments("pathwise")
    assert exact["mu"][1] == pytest.approx(4 * SIGMA**2)
    assert exact["sigma"][1] == pytest.approx(4 * ((MU - K) ** 2 + 2 * SIGMA**2))
    for estimator in ("pathwise", "score", "score+loo"):  # all unbiased: d(-ELBO)
        moments = exact_moments(estimator)
        assert moments["mu"][0] == pytest.approx(2 * (MU - K))
        assert moments["sigma"][0] == pytest.approx(2 * SIGMA - 1 / SIGMA)


# ------------------------------------------------------------------- compare_estimators
@pytest.fixture(scope="module")
def normal_comparison():
    pyro.clear_param_store()
    df = compare_estimators(
        normal_model,
        normal_guide,
        estimators=("pathwise", "score", "score+loo", "score+avg"),
        num_draws=NUM_DRAWS,
        seed=0,
    )
    pyro.clear_param_store()
    return df


@pytest.mark.parametrize("estimator", ["pathwise", "score", "score+loo"])
def test_compare_estimators_mean_and_variance_match_quadrature(normal_comparison, estimator):
    df = normal_comparison.set_index(["estimator", "param"])
    for name, (mean, var, m4) in exact_moments(estimator).items():
        row = df.loc[(estimator, name)]
        assert row["num_draws"] == NUM_DRAWS
        mean_se = math.sqrt(var / NUM_DRAWS)
        var_se = math.sqrt((m4 - var**2) / NUM_DRAWS)
        assert abs(row["mean"] - mean) < 4 * mean_se, (name, row["mean"], mean, mean_se)
        assert abs(row["variance"] - var) < 4 * var_se, (name, row["variance"], var, var_se)
        assert row["snr"] == pytest.approx(abs(row["mean"]) / math.sqrt(row["variance"]))
        assert row["seconds_per_draw"] > 0


def test_compare_estimators_decaying_average_is_unbiased(normal_comparison):
    """The average uses past draws only, so the mean is the exact gradient (its draws are
    not independent; the standard error from their variance is a rough guide, hence 5 SE)."""
    df = normal_comparison.set_index(["estimator", "param"])
    for name, (mean, _, _) in exact_moments("pathwise").items():
        row = df.loc[("score+avg", name)]
        assert abs(row["mean"] - mean) < 5 * math.sqrt(row["variance"] / NUM_DRAWS)
    assert "decaying_avg" in df.loc[("score+avg", "mu"), "routes"]


def test_compare_estimators_attrs_and_columns(normal_comparison):
    df = normal_comparison
    assert set(df["estimator"]) == {"pathwise", "score", "score+loo", "score+avg"}
    assert set(df["param"]) == {"mu", "sigma"}
    assert df.attrs["skipped"]["pathwise"] == {}
    elementwise = df.attrs["elementwise"][("pathwise", "mu")]
    row = df.set_index(["estimator", "param"]).loc[("pathwise", "mu")]
    assert np.asarray(elementwise["mean"]).sum() == pytest.approx(row["mean"])
    assert np.asarray(elementwise["variance"]).sum() == pytest.approx(row["variance"])


# A model with a Normal (pathwise) and a Bernoulli site on the score function.
def mixed_model(data):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    c = pyro.sample("c", dist.Bernoulli(0.5))
    pyro.sample("x", dist.Normal(z + c, 1.0), obs=data)


def mixed_guide(data):
    pyro.sample("z", dist.Normal(param("m", 0.2), param("s", 0.8)))
    pyro.sample("c", dist.Bernoulli(logits=param("logit", 0.3)), infer={"estimator": "score"})


def test_compare_estimators_skips_pathwise_on_bernoulli():
    data = torch.tensor(1.0)
    df = compare_estimators(
        mixed_model, mixed_guide, data, estimators=("pathwise", "score", "score+loo"),
        num_draws=50,
    )  # fmt: skip
    assert df.attrs["skipped"]["pathwise"] == {"c": "Bernoulli has no rsample"}
    assert df.attrs["skipped"]["score"] == {}
    rows = df.set_index(["estimator", "param"])
    assert "z:pathwise" in rows.loc[("pathwise", "m"), "routes"]
    assert "c:score" in rows.loc[("pathwise", "logit"), "routes"]
    for estimator in ("score", "score+loo"):
        assert (rows.loc[estimator, "variance"] > 0).all()
        assert "z:score" in rows.loc[(estimator, "m"), "routes"]


def test_compare_estimators_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid estimators are.*'score\\+loo'"):
        compare_estimators(normal_model, normal_guide, estimators=("pathwise", "reinforce"))
    with pytest.raises(ValueError, match="unknown params"):
        compare_estimators(normal_model, normal_guide, params=["nope"], num_draws=2)


# ----------------------------------------------------------------------- audit_gradients
class MixedGuide(nn.Module):
    """Two layers; one runs under ``torch.no_grad()`` by mistake, and a param is detached."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(1, 2)
        self.under_no_grad = nn.Linear(1, 1)

    def forward(self, data):
        h = self.used(torch.ones(1))
        with torch.no_grad():
            shift = self.under_no_grad(torch.ones(1))
        scale = pyro.param("scale", torch.tensor(0.7), constraint=dist.constraints.positive)
        loc = pyro.param("detached_loc", torch.tensor(0.1)).detach()
        pyro.sample("z", dist.Normal(h[0] + shift[0] + loc, scale))
        pyro.sample("c", dist.Bernoulli(logits=h[1]), infer={"estimator": "score"})


@pytest.mark.parametrize("bound", [False, True], ids=["module", "bound-method"])
def test_audit_flags_detached_and_no_grad_parameters(bound):
    net = MixedGuide()
    guide = net.forward if bound else net
    audit = audit_gradients(mixed_model, guide, torch.tensor(1.0))
    assert isinstance(audit, GradientAudit)
    assert audit.routes["z"].estimator == "pathwise"
    assert audit.routes["c"].estimator == "score"
    assert set(audit.no_gradient) == {
        "detached_loc",
        "guide:MixedGuide.under_no_grad.weight",
        "guide:MixedGuide.under_no_grad.bias",
    }
    # the used layer feeds z (pathwise: its prior, guide and likelihood terms) and c (score)
    used = audit.param("guide:MixedGuide.used.weight")
    assert used.receives_gradient and used.grad_norm > 0 and used.shape == (2, 1)
    assert set(used.sites) == {"z", "x", "c"}
    assert set(audit.param("scale").sites) == {"z", "x"}
    report = str(audit)
    assert "z: pathwise" in report and "c: score" in report
    for name in audit.no_gradient:
        assert f"NO GRADIENT: {name}" in report


def test_audit_clean_model_has_no_flags():
    audit = audit_gradients(normal_model, normal_guide)
    assert audit.no_gradient == []
    assert "NO GRADIENT" not in str(audit)
    assert audit.param("mu").sites == ("x",)


# ------------------------------------------------------------------- nothing is changed
def test_param_store_grads_and_rng_are_unchanged():
    data = torch.tensor(1.0)
    mixed_guide(data)  # create m, s, logit
    store = pyro.get_param_store()
    for i, name in enumerate(store.keys()):
        store._params[name].grad = torch.full_like(store._params[name], float(i + 1))
    before = {n: (store._params[n].detach().clone(), store._params[n].grad.clone())
              for n in store.keys()}  # fmt: skip
    rng = pyro.util.get_rng_state()
    expected = torch.rand(3)  # what the global RNG gives next, if untouched
    pyro.util.set_rng_state(rng)

    audit_gradients(mixed_model, mixed_guide, data)
    compare_estimators(mixed_model, mixed_guide, data, estimators=("score+avg", "auto"),
                       num_draws=5)  # fmt: skip

    assert torch.equal(torch.rand(3), expected)
    assert set(store.keys()) == set(before)
    for n, (value, grad) in before.items():
        assert torch.equal(store._params[n].detach(), value), n
        assert torch.equal(store._params[n].grad, grad), n


# ---------------------------------------------------------------------------------- plot
def test_plot_estimator_comparison_writes_png(normal_comparison, tmp_path):
    path = plot_estimator_comparison(normal_comparison, tmp_path / "figs" / "cmp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="lacks columns"):
        plot_estimator_comparison(normal_comparison[["estimator"]], tmp_path / "x.png")


def test_pathwise_with_analytic_kl_has_no_variance_here():
    """Here ``log p - log q`` is the whole loss, so the KL fast path gives the exact gradient."""
    df = compare_estimators(normal_model, normal_guide, estimators=("pathwise+kl",), num_draws=10)
    rows = df.set_index("param")
    assert rows.loc["mu", "mean"] == pytest.approx(2 * (MU - K))
    assert rows.loc["sigma", "mean"] == pytest.approx(2 * SIGMA - 1 / SIGMA)
    assert (rows["variance"] < 1e-10).all()
