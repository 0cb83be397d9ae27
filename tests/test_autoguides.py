"""Effect-based guides (Pyro's ``GuideMessenger`` autoguides, which run the model themselves)
train the posterior ``Trace_ELBO`` trains, and ``RoutedELBO`` takes every constructor
argument of Pyro's ELBOs."""

import inspect

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import ELBO, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoHierarchicalNormalMessenger,
    AutoNormal,
    AutoNormalMessenger,
    AutoRegressiveMessenger,
)
from pyro.ops.provenance import ProvenanceTensor
from torch.distributions import kl_divergence
from pyro.optim import Adam
from pyro.poutine.guide import GuideMessenger

from pyro_reparam_conv import RoutedELBO

MESSENGERS = [AutoNormalMessenger, AutoHierarchicalNormalMessenger, AutoRegressiveMessenger]
TRUE_W = torch.tensor([1.0, -2.0, 0.5])


def regression_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=generator)
    y = x @ TRUE_W + 0.5 * torch.randn(100, generator=generator)
    return x, y


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("N", len(x)):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


@pytest.mark.parametrize("guide_class", MESSENGERS, ids=lambda c: c.__name__)
def test_messenger_autoguide_recovers_regression_weights(guide_class):
    x, y = regression_data()
    pyro.set_rng_seed(0)
    guide = guide_class(regression)
    svi = SVI(regression, guide, Adam({"lr": 0.05}), RoutedELBO())
    for _ in range(500):
        loss = svi.step(x, y)
    with torch.no_grad():
        w = torch.stack([guide(x, y)["w"] for _ in range(200)]).mean(0)
    assert (w - TRUE_W).abs().max() < 0.15, w
    assert loss < 200  # -ELBO near 112; a guide that ignores the data stays near 2,400


def factor_model(data):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.factor("f", -0.3 * (z - 1.0) ** 2)
    with pyro.plate("N", len(data)):
        u = pyro.sample("u", dist.Normal(z, 1.0))
        pyro.sample("x", dist.Normal(u, 0.5), obs=data)


class NormalMessenger(GuideMessenger):
    """A hand-written effect-based guide: Normal posteriors (the analytic KL applies to z)."""

    def get_posterior(self, name, prior):
        loc = pyro.param(f"{name}_loc", torch.full(prior.batch_shape, 0.2))
        scale = pyro.param(
            f"{name}_scale",
            torch.full(prior.batch_shape, 0.7),
            constraint=dist.constraints.positive,
        )
        return dist.Normal(loc, scale)


DATA = torch.tensor([0.3, 1.8, 2.4])


def _loss_and_grads(elbo, guide_class, seed):
    pyro.clear_param_store()
    guide = guide_class(factor_model)
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(factor_model, guide, DATA)
    params = dict(sorted(pyro.get_param_store().named_parameters()))
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss, dict(zip(params, grads))


@pytest.mark.parametrize("guide_class", [NormalMessenger, *MESSENGERS], ids=lambda c: c.__name__)
@pytest.mark.parametrize("vectorize", [False, True])
def test_messenger_guide_loss_and_gradients_equal_trace_elbo(guide_class, vectorize):
    """The model's factor and observed site run inside the guide: they count once, in the
    model, as Trace_ELBO counts them (same draws, ``fast_path=False``)."""
    options = dict(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1)
    for seed in range(3):
        expected, expected_grads = _loss_and_grads(Trace_ELBO(**options), guide_class, seed)
        routed = RoutedELBO(fast_path=False, **options)
        loss, grads = _loss_and_grads(routed, guide_class, seed)
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected_grads[name], rtol=1e-4, atol=1e-5), name
        assert set(routed.routes) == {"z", "u"}  # the observed and factor sites are no routes


def test_messenger_guide_gets_the_analytic_kl_where_its_prior_depends_on_no_latent():
    """z's prior depends on no latent: its -KL replaces log p - log q, found through the
    provenance of the messenger's own traces; the loss keeps Trace_ELBO's expectation."""
    elbo = RoutedELBO()
    particle = elbo.site_terms(factor_model, NormalMessenger(factor_model), DATA)[0]
    assert elbo.routes["z"].analytic_kl
    assert not elbo.routes["u"].analytic_kl  # its prior depends on z
    for trace in (particle.model_trace, particle.guide_trace):  # tracked step: values untagged
        assert not isinstance(trace.nodes["z"]["value"], ProvenanceTensor)
    pyro.set_rng_seed(0)
    # one estimate's standard deviation is about 0.15 at 4,000 particles: 0.07 here
    many = dict(num_particles=20000, vectorize_particles=True, max_plate_nesting=1)
    routed = RoutedELBO(**many).loss(factor_model, NormalMessenger(factor_model), DATA)
    plain = Trace_ELBO(**many).loss(factor_model, NormalMessenger(factor_model), DATA)
    assert routed == pytest.approx(plain, abs=0.4)


def test_messenger_guide_with_an_enumerated_site_matches_trace_elbo_in_expectation():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("N", 3):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.4)))
            pyro.sample("x", dist.Normal(z + c, 1.0), obs=DATA)

    class Guide(GuideMessenger):
        def get_posterior(self, name, prior):
            if name == "z":
                return dist.Normal(pyro.param("m", torch.tensor(0.5)), 0.8)
            return dist.Bernoulli(logits=pyro.param("l", torch.tensor([0.3, -0.2, 0.1])))

    many = dict(num_particles=5000, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    elbo = RoutedELBO(**many)
    routed = elbo.loss(model, Guide(model))
    assert elbo.routes["c"].estimator == "enumerate"
    plain = Trace_ELBO(**many).loss(model, Guide(model))
    assert routed == pytest.approx(plain, abs=0.15)  # standard deviations: 0.03 and 0.01


def test_constructor_takes_every_argument_of_pyros_elbo_in_its_order():
    pyro_params = list(inspect.signature(ELBO.__init__).parameters)
    ours = list(inspect.signature(RoutedELBO.__init__).parameters)
    assert ours[: len(pyro_params)] == pyro_params
    elbo = RoutedELBO(
        num_particles=2,
        max_plate_nesting=1,
        vectorize_particles=True,
        strict_enumeration_warning=False,
        ignore_jit_warnings=True,
        jit_options={"check_trace": False},
        retain_graph=True,
        tail_adaptive_beta=-0.5,
    )
    assert elbo.max_plate_nesting == 2  # one more for the vectorized particles, as Pyro's
    assert elbo.jit_options == {"check_trace": False} and elbo.tail_adaptive_beta == -0.5
    assert elbo.ignore_jit_warnings and elbo.retain_graph
    with pytest.warns(DeprecationWarning, match="max_iarange_nesting"):
        assert RoutedELBO(max_iarange_nesting=3).max_plate_nesting == 3


def test_jit_options_change_nothing():
    def run(**options):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        return RoutedELBO(**options).loss(factor_model, NormalMessenger(factor_model), DATA)

    assert run(jit_options={"check_trace": True}, ignore_jit_warnings=True) == run()


def test_routing_options_are_keyword_only():
    with pytest.raises(TypeError):
        RoutedELBO(1, float("inf"), None, False, True, False, None, None, -1.0, "auto")



def _prior_only(positive=True):
    pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))  # real support
    if positive:  # AutoNormal: an exp transform
        pyro.sample("s", dist.HalfNormal(torch.ones(2)).to_event(1))


def test_autonormal_real_sites_get_the_exact_analytic_kl():
    """AutoNormal passes "w_unconstrained" on as the Delta "w" through the identity: the
    analytic KL(q(w_u) || p(w)) replaces log p(w) - log q(w_u) and is exact (a prior-only
    model's loss is the KL itself, the same on every draw, and so is its gradient); a
    positive site's Delta carries the log-Jacobian of exp and keeps its Monte Carlo terms."""
    pyro.clear_param_store()
    guide = AutoNormal(_prior_only, init_scale=0.3)
    elbo = RoutedELBO()
    elbo.loss(_prior_only, guide, False)  # the params
    q = dist.Normal(guide.locs.w, guide.scales.w)
    exact = kl_divergence(q, dist.Normal(torch.zeros(3), 2.0)).sum()
    loc_grad = torch.autograd.grad(exact, guide.locs.w)[0]
    for _ in range(3):
        guide.locs.w.grad = None
        assert abs(elbo.loss_and_grads(_prior_only, guide, False) - exact.item()) < 1e-5
        assert torch.allclose(guide.locs.w.grad, loc_grad, atol=1e-6)
    route = elbo.routes["w_unconstrained"]
    assert route.analytic_kl and route.kl.through == "w"
    assert "analytic KL of 'w_unconstrained'" in str(elbo.routes["w"].kl)
    assert RoutedELBO(fast_path=False).loss(_prior_only, guide, False) != exact.item()
    elbo.loss(_prior_only, AutoNormal(_prior_only))
    assert not elbo.routes["s_unconstrained"].analytic_kl


def test_a_delta_with_a_log_density_of_its_own_keeps_the_monte_carlo_terms():
    def model(log_density):
        pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))

    def guide(log_density):
        u = pyro.sample(
            "u", dist.Normal(torch.zeros(3), 1.0).to_event(1), infer={"is_auxiliary": True}
        )
        pyro.sample("w", dist.Delta(u, log_density=log_density, event_dim=1))

    elbo = RoutedELBO()
    elbo.loss(model, guide, 0.0)
    assert elbo.routes["u"].analytic_kl and elbo.routes["u"].kl.through == "w"
    elbo.loss(model, guide, torch.tensor(0.5))
    assert str(elbo.routes["u"].kl) == "no analytic KL: no model site"
