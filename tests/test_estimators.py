"""The estimator interface: the registry, routing among registered estimators, and a new
estimator added as one class (the worked example of docs/architecture.md, "sticking the
landing"), checked against the closed-form gradient of a Gaussian model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import (
    assert_unbiased,
    draw_gradients,
    gaussian_guide,
    gaussian_model,
    gaussian_params_and_exact_gradients,
)
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask

from pyro_reparam_conv import ESTIMATORS, RoutedELBO, force_estimator
from pyro_reparam_conv.estimators import Estimator, get, register, unregister
from pyro_reparam_conv.distributions import unwrap_independent


class StickingTheLanding(Estimator):
    """Pathwise, without the score-function part of ``log q`` (Roeder, Wu & Duvenaud 2017):
    ``-log q(z)`` is differentiated through ``z`` only, with ``q``'s parameters held fixed.
    The dropped part, ``grad_phi log q_phi(z)`` at fixed ``z``, has expectation 0; at a guide
    equal to the posterior the remaining gradient is 0 for every draw."""

    name = "stl"
    automatic = False  # opt-in: away from the optimum its variance can be higher

    def why_not(self, fn):
        base, _ = unwrap_independent(fn)
        return None if type(base) is dist.Normal else "sticking the landing is written for Normal"

    def has_score_function(self, fn):
        return False

    def score_parts(self, site):
        base, ndims = unwrap_independent(site["fn"])
        fixed = dist.Normal(base.loc.detach(), base.scale.detach())
        log_q = fixed.log_prob(site["value"])
        log_q = log_q.sum(list(range(-ndims, 0))) if ndims else log_q
        log_q = scale_and_mask(log_q, site["scale"], site["mask"])
        return ScoreParts(site["log_prob"], 0.0, log_q)


@pytest.fixture
def stl():
    estimator = register(StickingTheLanding())
    yield estimator
    unregister("stl")


def test_registry_lists_the_builtin_estimators_in_order():
    assert tuple(ESTIMATORS)[:2] == ("pathwise", "score")
    assert "score" in ESTIMATORS and "magic" not in ESTIMATORS
    assert get("pathwise").why_not(dist.Bernoulli(0.5)) == "Bernoulli has no rsample"
    with pytest.raises(KeyError, match="unknown estimator 'magic'; valid estimators are"):
        get("magic")


def test_a_registered_estimator_is_routable_and_listed(stl):
    assert "stl" in ESTIMATORS
    elbo = RoutedELBO()
    x = torch.tensor(1.3)
    elbo.loss_and_grads(gaussian_model, force_estimator(gaussian_guide, "stl"), x)
    route = elbo.routes["z"]
    assert route.estimator == "stl" and "infer['estimator']='stl'" in route.reason
    assert not route.analytic_kl  # the fast path is the pathwise estimator's
    # never chosen by itself: automatic=False
    elbo.loss(gaussian_model, gaussian_guide, x)
    assert elbo.routes["z"].estimator == "pathwise"


def test_a_registered_estimator_refuses_what_it_does_not_apply_to(stl):
    def guide():
        pyro.sample("z", dist.Gamma(2.0, 1.0), infer={"estimator": "stl"})

    with pytest.raises(ValueError, match=r"site 'z'.*'stl'.*written for Normal"):
        RoutedELBO().loss(lambda: pyro.sample("z", dist.Gamma(2.0, 1.0)), guide)


def test_registering_a_taken_name_is_refused():
    class Other(Estimator):
        name = "score"

    with pytest.raises(ValueError, match="an estimator named 'score' is registered already"):
        register(Other())


def test_sticking_the_landing_is_unbiased_and_exact_at_the_optimum(stl):
    x = torch.tensor(1.3)
    params, exact = gaussian_params_and_exact_gradients(x)
    pyro.set_rng_seed(20)
    draws = draw_gradients(
        RoutedELBO(), gaussian_model, force_estimator(gaussian_guide, "stl"), params, 1500, x
    )
    assert_unbiased(draws, exact)
    # at q = p(z | x) = N(x / 2, 1 / 2) every draw's gradient is 0; pathwise's is not
    with torch.no_grad():
        params["m"].fill_(x.item() / 2)
        params["log_s"].fill_(-0.5 * math.log(2.0))
    stl_draws = draw_gradients(
        RoutedELBO(), gaussian_model, force_estimator(gaussian_guide, "stl"), params, 50, x
    )
    mc_draws = draw_gradients(
        RoutedELBO(fast_path=False), gaussian_model, gaussian_guide, params, 50, x
    )
    for k in params:
        assert stl_draws[k].abs().max() < 1e-5, k
        assert mc_draws[k].var() > 0.01, k
