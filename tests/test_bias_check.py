"""The pathwise-bias detector of ``audit_gradients(..., check_bias=True)`` and the ``agrees``
column of ``compare_estimators``.

The step cost of issue 14: ``x ~ N(mu = 0.3, 1)``, prior ``N(0, 1)``, cost ``1[x > 0]``. The
loss is ``Phi(mu) + KL``, whose gradient in ``mu`` is ``phi(0.3) + 0.3 = 0.681``; the pathwise
gradient with the analytic KL is ``0.3`` on every draw (the step's derivative is 0). The
detector must flag that site (with the measure-valued reference, and with the score
function where that estimator does not apply) and flag nothing on smooth models, the demo's
conv VAE included, at fixed seeds.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import param
from pyro.util import get_rng_state

from pyro_reparam_conv import RoutedELBO, audit_gradients, compare_estimators
from pyro_reparam_conv.models import ConvClusterVAE

EXACT_MU = math.exp(-0.045) / math.sqrt(2 * math.pi) + 0.3  # phi(0.3) + 0.3


def step_model():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("cost", -(x > 0).to(x.dtype))


def step_guide(infer=None):
    mu, s = param("mu", 0.3), param("s", 1.0)
    pyro.sample("x", dist.Normal(mu, s), infer=dict(infer or {}))


def test_the_step_cost_is_flagged_with_the_measure_valued_reference():
    pyro.set_rng_seed(0)
    audit = audit_gradients(step_model, step_guide, check_bias=True, num_draws=200)
    assert set(audit.pathwise_bias) == {"x"}
    check = audit.bias_checks["x"]
    assert check.reference == "measure_valued" and check.biased
    assert check.z_score > 10 and check.threshold == 4.0 and check.numel == 2
    assert check.param == "mu" and check.pathwise_mean == pytest.approx(0.3)
    assert abs(check.reference_mean - EXACT_MU) < 0.05
    report = str(audit)
    assert "!! BIASED PATHWISE GRADIENT: site 'x'" in report
    assert "infer={'estimator': 'measure_valued'}" in report and "'score'" in report


def test_routed_to_measure_valued_the_site_is_no_longer_checked():
    guide = lambda: step_guide({"estimator": "measure_valued"})  # noqa: E731
    audit = audit_gradients(step_model, guide, check_bias=True, num_draws=20)
    assert audit.pathwise_bias == {} and audit.bias_checks == {}
    assert "bias check: no guide site is on the pathwise estimator" in audit.notes
    assert "BIASED" not in str(audit)


def lognormal_model():
    x = pyro.sample("x", dist.LogNormal(0.0, 1.0))
    pyro.factor("cost", -(x > 1.2).to(x.dtype))


def lognormal_guide():
    pyro.sample("x", dist.LogNormal(param("m", 0.1), 1.0))


def test_a_site_measure_valued_does_not_apply_to_is_checked_with_the_score_function():
    pyro.set_rng_seed(1)
    audit = audit_gradients(lognormal_model, lognormal_guide, check_bias=True, num_draws=300)
    check = audit.bias_checks["x"]
    assert check.reference == "score" and "is not a Normal" in check.note
    assert set(audit.pathwise_bias) == {"x"}


def smooth_model(data):
    with pyro.plate("N", len(data)):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(data), 3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(torch.tanh(z).sum(-1), 0.5), obs=data)


def smooth_guide(data):
    loc, log_s = param("loc", torch.zeros(len(data), 3)), param("log_s", torch.zeros(len(data), 3))
    with pyro.plate("N", len(data)):
        pyro.sample("z", dist.Normal(loc, log_s.exp()).to_event(1))


def rounded_model(data):
    """A quantized decoder: the likelihood sees round(z); its derivative is 0 a.e."""
    with pyro.plate("N", len(data)):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(data), 3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(torch.round(z).sum(-1), 0.5), obs=data)


DATA = torch.tensor([0.8, -1.5, 2.2, 0.1])


def test_a_smooth_plate_model_is_not_flagged_and_a_rounded_one_is():
    pyro.set_rng_seed(2)
    smooth = audit_gradients(smooth_model, smooth_guide, DATA, check_bias=True, num_draws=200)
    assert smooth.pathwise_bias == {}
    check = smooth.bias_checks["z"]
    assert check.reference == "measure_valued" and check.numel == 24 and not check.biased
    assert "consistent" in str(smooth) and "BIASED" not in str(smooth)
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    rounded = audit_gradients(rounded_model, smooth_guide, DATA, check_bias=True, num_draws=200)
    assert set(rounded.pathwise_bias) == {"z"}


SMALL = dict(hidden_channels=8, latent_channels=2, num_classes=3)


def test_the_conv_vae_is_not_flagged():
    """y is summed exactly ("enumerate"), z is a pathwise Normal map (32 elements per image):
    z rerouted to measure_valued (97 evaluations side by side) agrees with pathwise."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    vae = ConvClusterVAE(**SMALL)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    audit = audit_gradients(vae.model, vae.guide, x, check_bias=True, num_draws=100)
    assert audit.routes["y"].estimator == "enumerate"
    assert audit.pathwise_bias == {}
    check = audit.bias_checks["z"]
    assert check.reference == "measure_valued" and not check.biased
    assert check.param.startswith(("encoder", "z_head"))  # the guide's, upstream of z


def test_the_check_leaves_parameters_grads_store_and_rng_as_they_were():
    step_guide()
    mu = pyro.param("mu")
    mu.grad = torch.tensor(7.0)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    rng = get_rng_state()
    audit_gradients(step_model, step_guide, check_bias=True, num_draws=10)
    after = dict(pyro.get_param_store().items())
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v)
    assert pyro.param("mu").grad == torch.tensor(7.0)
    assert torch.equal(get_rng_state()["torch"], rng["torch"])


def test_the_default_audit_has_no_bias_check():
    audit = audit_gradients(step_model, step_guide)
    assert audit.bias_checks == {} and audit.pathwise_bias == {}
    assert "bias check" not in str(audit).lower()
    with pytest.raises(ValueError, match="num_draws must be an int >= 2"):
        audit_gradients(step_model, step_guide, check_bias=True, num_draws=1)


# ------------------------------------------------------------ compare_estimators
def test_compare_estimators_says_which_means_agree():
    pyro.set_rng_seed(3)
    df = compare_estimators(
        step_model,
        step_guide,
        estimators=("pathwise+kl", "score+loo", "measure_valued"),
        num_draws=300,
    )
    rows = df.set_index(["estimator", "param"])
    assert not rows.loc[("pathwise+kl", "mu"), "agrees"]
    assert rows.loc[("pathwise+kl", "mu"), "z_vs_unbiased"] > 10
    for name in ("score+loo", "measure_valued"):
        assert rows.loc[(name, "mu"), "agrees"] and rows.loc[(name, "s"), "agrees"]
        se = math.sqrt(rows.loc[(name, "mu"), "variance"] / 300)
        assert abs(rows.loc[(name, "mu"), "mean"] - EXACT_MU) < 4.5 * se
    assert "measure_valued" in rows.loc[("measure_valued", "mu"), "routes"]
    alone = compare_estimators(step_model, step_guide, estimators=("pathwise",), num_draws=5)
    assert alone["agrees"].isna().all() and alone["z_vs_unbiased"].isna().all()


@pytest.mark.slow
def test_no_false_alarms_on_a_smooth_model_over_seeds():
    """The threshold allows a false alarm per check with probability about 1e-3: none in
    40 seeds of the smooth plate model (24 parameter elements compared each; measured: the
    largest z-score 3.35, threshold 4.19)."""
    flagged = []
    for seed in range(40):
        pyro.clear_param_store()
        pyro.set_rng_seed(100 + seed)
        audit = audit_gradients(smooth_model, smooth_guide, DATA, check_bias=True, num_draws=200)
        flagged += [(seed, z) for z in audit.pathwise_bias.values()]
    assert flagged == []


def test_measure_valued_fixes_the_step_site():
    """Routed to measure_valued, SVI-style gradient draws average to the exact 0.681."""
    pyro.set_rng_seed(4)
    guide = lambda: step_guide({"estimator": "measure_valued"})  # noqa: E731
    guide()
    mu = pyro.param("mu")
    elbo = RoutedELBO()
    draws = torch.stack(
        [
            torch.autograd.grad(elbo.differentiable_loss(step_model, guide), [mu])[0]
            for _ in range(400)
        ]
    )
    assert abs(float(draws.mean()) - EXACT_MU) < 4.5 * float(draws.std()) / math.sqrt(400)
