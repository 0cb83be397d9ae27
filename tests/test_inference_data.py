"""to_inference_data: posterior moments against the closed-form conjugate posterior, groups,
dims, ArviZ interop, and the ConvClusterVAE's sites.

Conjugate model: ``mu ~ Normal(M0, S0)``, ``x_i ~ Normal(mu, SIGMA)`` for i = 1..N with SIGMA
known. The exact posterior is Normal with precision ``1/S0^2 + N/SIGMA^2`` and mean
``(M0/S0^2 + sum x / SIGMA^2) / precision``; AutoNormal's family contains it.
"""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_reparam_conv.inference_data import to_inference_data
from pyro_reparam_conv.models import ConvClusterVAE

M0, S0, SIGMA, N = 1.0, 2.0, 1.5, 20
DATA = 3.0 + SIGMA * torch.randn(N, generator=torch.Generator().manual_seed(0))
PRECISION = 1 / S0**2 + N / SIGMA**2
POST_MEAN = (M0 / S0**2 + DATA.sum().item() / SIGMA**2) / PRECISION
POST_SD = PRECISION**-0.5
NUM_SAMPLES = 2000


@pytest.fixture(scope="module")
def az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


pytestmark = pytest.mark.usefixtures("one_thread")


def model(x):
    mu = pyro.sample("mu", dist.Normal(M0, S0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, SIGMA), obs=x)


@pytest.fixture(scope="module")
def fitted_state():
    """AutoNormal fitted by SVI: Trace_ELBO with 8 vectorized particles, Adam lr 0.05 decayed
    by 0.995 per step (ClippedAdam's lrd) for 600 steps, seed 0. The decay removes the
    stationary SGD jitter; with it the fit lands within about 0.03 posterior sd of the exact
    mean and 3% of the exact sd (measured), so the slack below is generous."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}), elbo)
    losses = [svi.step(DATA) for _ in range(600)]
    state = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    return guide, state, losses


@pytest.fixture
def fitted(fitted_state):
    guide, state, losses = fitted_state
    pyro.get_param_store().set_state(state)
    return guide, losses


def store_snapshot():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def test_posterior_moments_match_the_exact_conjugate_posterior(fitted):
    guide, losses = fitted
    idata = to_inference_data(model, guide, DATA, num_samples=NUM_SAMPLES, seed=1)
    draws = idata.posterior["mu"].values
    assert draws.shape == (1, NUM_SAMPLES)
    mean, sd = draws.mean(), draws.std(ddof=1)
    # Monte Carlo standard errors of the sample mean and sd of n Normal draws
    se_mean = POST_SD / NUM_SAMPLES**0.5
    se_sd = POST_SD / (2 * (NUM_SAMPLES - 1)) ** 0.5
    # (a) against the fitted guide's own q(mu): Monte Carlo error only, 4 standard errors
    loc = pyro.param("AutoNormal.locs.mu").item()
    scale = pyro.param("AutoNormal.scales.mu").item()
    assert abs(mean - loc) < 4 * scale / NUM_SAMPLES**0.5
    assert abs(sd - scale) < 4 * scale / (2 * (NUM_SAMPLES - 1)) ** 0.5
    # (b) against the exact posterior: 4 standard errors plus an optimization slack of
    # 0.1 posterior sd for the mean and 10% of the sd for the sd
    assert abs(mean - POST_MEAN) < 4 * se_mean + 0.1 * POST_SD, (mean, POST_MEAN)
    assert abs(sd - POST_SD) < 4 * se_sd + 0.1 * POST_SD, (sd, POST_SD)


def test_groups_dims_and_no_guide_internals(fitted, az):
    guide, losses = fitted
    idata = to_inference_data(model, guide, DATA, num_samples=50, seed=0)
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(
        idata.groups()
    )
    assert "svi" not in idata.groups()
    assert list(idata.posterior.data_vars) == ["mu"]  # no *_unconstrained, no AutoNormal.*
    assert idata.posterior["mu"].dims == ("chain", "draw")
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata[group]["x"].dims == ("chain", "draw", "data")
        assert idata[group]["x"].shape == (1, 50, N)
    assert idata.observed_data["x"].dims == ("data",)
    np.testing.assert_array_equal(idata.observed_data["x"].values, DATA.numpy())
    # pointwise log-likelihood is log Normal(x_i | mu_s, SIGMA), exactly
    mu = torch.as_tensor(idata.posterior["mu"].values[0])
    exact = dist.Normal(mu[:, None], SIGMA).log_prob(DATA).numpy()
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], exact, rtol=1e-5)


def test_arviz_summary_and_loo_run(fitted, az):
    guide, _ = fitted
    idata = to_inference_data(model, guide, DATA, num_samples=500, seed=0)
    summary = az.summary(idata)
    assert "mu" in summary.index
    with warnings.catch_warnings():
        # a single chain of independent draws: ArviZ may note that it cannot estimate R-hat
        warnings.simplefilter("ignore", UserWarning)
        loo = az.loo(idata, pointwise=True)
    assert loo["loo_i"].shape == (N,) and np.isfinite(loo["elpd_loo"])


def test_parallel_gives_the_same_shapes_and_moments(fitted):
    guide, _ = fitted
    seq = to_inference_data(model, guide, DATA, num_samples=400, seed=0)
    par = to_inference_data(model, guide, DATA, num_samples=400, seed=0, parallel=True)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        for name, var in seq[group].data_vars.items():
            assert par[group][name].dims == var.dims and par[group][name].shape == var.shape
    # both are draws from the same q: means agree within 5 SE of a difference of two means
    diff = abs(par.posterior["mu"].values.mean() - seq.posterior["mu"].values.mean())
    assert diff < 5 * POST_SD * (2 / 400) ** 0.5


def test_elbo_trace_group_and_param_store_unchanged(fitted):
    guide, losses = fitted
    before = store_snapshot()
    rng = torch.get_rng_state()
    idata = to_inference_data(model, guide, DATA, num_samples=20, elbo_trace=losses, seed=3)
    assert idata.svi["loss"].dims == ("svi_step",)
    np.testing.assert_array_equal(idata.svi["loss"].values, np.asarray(losses))
    after = store_snapshot()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)  # seed= restores the global RNG


def test_bad_arguments(fitted):
    guide, _ = fitted
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        to_inference_data(model, guide, DATA, num_samples=0)
    with pytest.raises(ValueError, match="elbo_trace is empty"):
        to_inference_data(model, guide, DATA, num_samples=2, elbo_trace=[])


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_conv_cluster_vae_sites_are_named_after_the_images_plate(parallel):
    torch.manual_seed(0)
    vae = ConvClusterVAE(hidden_channels=8, latent_channels=2, num_classes=3)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    idata = to_inference_data(vae.model, vae.guide, x, num_samples=4, seed=0, parallel=parallel)
    assert set(idata.posterior.data_vars) == {"y", "z"}
    assert idata.posterior["y"].dims == ("chain", "draw", "images")
    assert idata.posterior["z"].dims[:3] == ("chain", "draw", "images")
    assert idata.posterior["z"].shape == (1, 4, 5, 2, 4, 4)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "images")
    assert idata.posterior_predictive["x"].shape == (1, 4, 5, 1, 8, 8)
    assert len(pyro.get_param_store()) == 0  # parameters created for the call are removed
