"""RoutedELBO: routes, loss values equal to Trace_ELBO's, unbiased gradients against exact
ones (enumeration / closed form), clear errors."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from exact import (
    assert_unbiased,
    binary_tensors,
    draw_gradients,
    exact_elbo,
    gaussian_guide,
    gaussian_model,
    gaussian_params_and_exact_gradients,
    param,
)
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_reparam_conv import RoutedELBO, force_estimator
from pyro_reparam_conv.elbo import NonFiniteLossError

DATA = torch.tensor([0.3, 1.8, 2.4])


# A global Categorical y with a plate of Bernoulli c_i that depend on it: one score site
# upstream of another, a plate, and observations. The guide routes both to the score
# function (the estimator these tests are about; by default they would be enumerated).
SCORE = {"estimator": "score"}


def discrete_model(data=DATA, baseline=None):
    y = pyro.sample("y", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
    with pyro.plate("N", len(data)):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor([0.3, 0.5, 0.7])[y]))
        pyro.sample("x", dist.Normal(c + 0.5 * y.float(), 1.0), obs=data)


def discrete_guide(data=DATA, baseline=None):
    logits = param("y_logits", [0.1, -0.2, 0.3])
    c_logits = param("c_logits", [[0.2, -0.5, 0.1], [0.4, 0.0, -0.3], [-0.1, 0.6, 0.2]])
    y = pyro.sample("y", dist.Categorical(logits=logits), infer=SCORE)
    infer = dict(SCORE) if baseline is None else {"baseline": baseline, **SCORE}
    with pyro.plate("N", len(data)):
        # vectorization-safe c_logits[y]: y is () or (particles, 1)
        logits_c = c_logits.index_select(0, y.reshape(-1)).reshape(y.shape[:-1] + (3,))
        pyro.sample("c", dist.Bernoulli(logits=logits_c), infer=infer)


def discrete_exact():
    pyro.get_param_store().clear()
    discrete_guide()  # create params
    params = dict(pyro.get_param_store().named_parameters())
    values = {"y": [torch.tensor(k) for k in range(3)], "c": binary_tensors((3,))}
    loss = -exact_elbo(discrete_model, discrete_guide, values)
    grads = torch.autograd.grad(loss, list(params.values()))
    return params, dict(zip(params, grads)), loss.item()


def test_routes_of_score_sites_and_reasons():
    elbo = RoutedELBO()
    elbo.loss(discrete_model, discrete_guide)
    assert (
        elbo.routes["y"].estimator == "score"
        and "infer['estimator']='score' set on the site" in elbo.routes["y"].reason
    )
    assert elbo.routes["c"].estimator == "score" and elbo.routes["c"].baseline.startswith(
        "decaying_avg"
    )
    assert set(elbo.routes) == {"y", "c"}


@pytest.mark.parametrize(
    "elbo_kwargs, baseline",
    [
        (dict(baseline=None), None),
        (dict(), None),  # decaying average by default with one particle
        pytest.param(dict(num_particles=4), None, marks=pytest.mark.slow),  # loo, sequential
        (dict(num_particles=4, vectorize_particles=True, max_plate_nesting=1), None),
        (dict(), {"use_decaying_avg_baseline": True, "baseline_beta": 0.5}),
    ],
    ids=["none", "avg", "loo-seq", "loo-vec", "pyro-keys"],
)
def test_score_gradient_is_unbiased_against_enumeration(elbo_kwargs, baseline):
    params, exact, _ = discrete_exact()
    pyro.set_rng_seed(0)
    elbo = RoutedELBO(**elbo_kwargs)
    draws = draw_gradients(elbo, discrete_model, discrete_guide, params, 1500, DATA, baseline)
    assert_unbiased(draws, exact)


def test_loss_equals_exact_elbo_in_expectation():
    _, _, exact_loss = discrete_exact()
    pyro.set_rng_seed(1)
    elbo = RoutedELBO()
    losses = torch.tensor([elbo.loss(discrete_model, discrete_guide) for _ in range(2000)])
    assert abs(losses.mean() - exact_loss) < 4.5 * losses.std() / math.sqrt(len(losses))


@pytest.mark.parametrize("estimator", ["pathwise", "score"])
def test_gaussian_gradient_is_unbiased_against_closed_form(estimator):
    x = torch.tensor(1.3)
    params, exact = gaussian_params_and_exact_gradients(x)
    pyro.set_rng_seed(2)
    elbo = RoutedELBO()
    guide = force_estimator(gaussian_guide, estimator)
    draws = draw_gradients(elbo, gaussian_model, guide, params, 2000, x)
    assert elbo.routes["z"].estimator == estimator
    assert_unbiased(draws, exact)


def test_score_gradient_is_unbiased_under_subsampling():
    """Plate of 4 data points subsampled 2 at a time: the gradient of the full-data ELBO."""
    data = torch.tensor([0.2, 1.5, -0.3, 0.9])

    def model(data, subsample_size=None):
        with pyro.plate("N", 4, subsample_size=subsample_size) as idx:
            c = pyro.sample("c", dist.Bernoulli(0.4))
            pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=data[idx])

    def guide(data, subsample_size=None):
        logits = param("logits", [0.3, -0.4, 0.8, 0.0])
        with pyro.plate("N", 4, subsample_size=subsample_size) as idx:
            pyro.sample("c", dist.Bernoulli(logits=logits[idx]))

    guide(data)
    params = dict(pyro.get_param_store().named_parameters())
    loss = -exact_elbo(model, guide, {"c": binary_tensors((4,))}, data)
    exact = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    pyro.set_rng_seed(3)
    draws = draw_gradients(RoutedELBO(), model, guide, params, 3000, data, 2)
    assert_unbiased(draws, exact)


def test_nn_baseline_is_unbiased_and_trained():
    params, exact, _ = discrete_exact()
    net = torch.nn.Linear(1, 1)
    # one baseline per element of the plate N (the site's cost shape, as Pyro requires)
    baseline = {"nn_baseline": lambda x: net(x).squeeze(-1), "nn_baseline_input": torch.ones(3, 1)}
    pyro.set_rng_seed(4)
    draws = draw_gradients(
        RoutedELBO(), discrete_model, discrete_guide, params, 1500, DATA, baseline
    )
    assert_unbiased(draws, exact)
    assert net.weight.grad is not None and net.weight.grad.abs() > 0  # the fit loss reaches it


# ---------------------------------------------------------------- loss values
def mixed_model(data):
    rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("groups", 2, dim=-2):
        mix = pyro.sample("mix", dist.Beta(2.0, 2.0))
        with pyro.plate("N", data.shape[-1], subsample_size=3, dim=-1) as idx:
            c = pyro.sample("c", dist.Bernoulli(mix))
            k = pyro.sample("k", dist.Categorical(logits=torch.zeros(3)))
            loc = w[..., 0] * c + w[..., 1] * k.float()
            pyro.sample("x", dist.Normal(loc, rate.rsqrt()), obs=data[..., idx])
    pyro.factor("penalty", -0.1 * w.pow(2).sum(-1))


def mixed_guide(data):
    a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
    loc = pyro.param("loc", torch.zeros(2))
    pm = pyro.param("pm", torch.full((2, 1), 0.5), constraint=dist.constraints.unit_interval)
    logits = pyro.param("logits", torch.zeros(3))
    pc = pyro.param("pc", torch.full((2, 6), 0.5), constraint=dist.constraints.unit_interval)
    pyro.sample("rate", dist.Gamma(a, 2.0))
    pyro.sample("w", dist.Normal(loc, 1.0).to_event(1))
    with pyro.plate("groups", 2, dim=-2):
        pyro.sample("mix", dist.Beta(pm * 4, 2.0))
        with pyro.plate("N", data.shape[-1], subsample_size=3, dim=-1) as idx:
            pyro.sample("c", dist.Bernoulli(pc[:, idx]), infer=SCORE)
            pyro.sample("k", dist.Categorical(logits=logits), infer=SCORE)


MIXED_DATA = torch.randn(2, 6)


@pytest.mark.parametrize("num_particles, vectorize", [(1, False), (3, False), (3, True)])
def test_mixed_model_routes_and_finite_gradients(num_particles, vectorize):
    pyro.set_rng_seed(5)
    elbo = RoutedELBO(
        num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=2
    )
    loss = elbo.loss_and_grads(mixed_model, mixed_guide, MIXED_DATA)
    assert math.isfinite(loss)
    expected = {"rate": "pathwise", "w": "pathwise", "mix": "pathwise", "c": "score", "k": "score"}
    assert {k: r.estimator for k, r in elbo.routes.items()} == expected
    for name, p in pyro.get_param_store().named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("num_particles, vectorize", [(1, False), (4, False), (4, True)])
def test_loss_equals_trace_elbo_on_the_same_draws(num_particles, vectorize):
    kw = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=2)
    mixed_guide(MIXED_DATA)
    pyro.set_rng_seed(6)
    expected = Trace_ELBO(**kw).loss(mixed_model, mixed_guide, MIXED_DATA)
    pyro.set_rng_seed(6)
    got = RoutedELBO(fast_path=False, **kw).loss(mixed_model, mixed_guide, MIXED_DATA)
    pyro.set_rng_seed(6)
    got_grads = RoutedELBO(fast_path=False, **kw).loss_and_grads(
        mixed_model, mixed_guide, MIXED_DATA
    )
    pyro.set_rng_seed(6)
    got_diff = RoutedELBO(fast_path=False, **kw).differentiable_loss(
        mixed_model, mixed_guide, MIXED_DATA
    )
    assert got == pytest.approx(expected, rel=1e-6)
    assert got_grads == pytest.approx(expected, rel=1e-6)
    assert got_diff.item() == pytest.approx(expected, rel=1e-6)


def test_drop_in_for_svi():
    pyro.set_rng_seed(7)
    svi = SVI(gaussian_model, gaussian_guide, Adam({"lr": 0.05}), RoutedELBO())
    for _ in range(300):
        svi.step(torch.tensor(1.0))
    m = pyro.param("m").item()
    assert abs(m - 0.5) < 0.15, m  # exact posterior mean is x / 2


# --------------------------------------------------------- forcing the route
def test_forced_score_under_plate_expand_to_event_leaves_the_distribution_alone():
    loc = torch.zeros(3, requires_grad=True)

    def guide():
        with pyro.plate("N", 4):
            d = dist.Normal(loc, 1.0).expand([4, 3]).to_event(1)
            pyro.sample("z", d, infer={"estimator": "score"})

    def model():
        with pyro.plate("N", 4):
            pyro.sample("z", dist.Normal(torch.zeros(4, 3), 1.0).to_event(1))

    elbo = RoutedELBO()
    guide_trace = poutine.trace(force_estimator(guide, "score")).get_trace()
    assert guide_trace.nodes["z"]["fn"].has_rsample  # untouched
    elbo.loss_and_grads(model, guide)
    assert elbo.routes["z"].estimator == "score"
    assert loc.grad is not None and torch.isfinite(loc.grad).all()


def test_forced_score_value_carries_no_pathwise_gradient():
    loc = torch.tensor(0.5, requires_grad=True)
    seen = {}

    def guide():
        seen["z"] = pyro.sample("z", dist.Normal(loc, 1.0), infer={"estimator": "score"})

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    RoutedELBO().loss_and_grads(model, guide)
    assert seen["z"].grad_fn is None


def test_forcing_pathwise_on_a_discrete_site_names_site_and_distribution():
    with pytest.raises(ValueError, match=r"site 'c'.*pathwise.*Bernoulli has no rsample"):
        RoutedELBO().loss(discrete_model, force_estimator(discrete_guide, "pathwise", sites=["c"]))


def test_unknown_estimator_lists_valid_ones():
    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0), infer={"estimator": "magic"})

    with pytest.raises(
        ValueError, match=r"site 'z': unknown estimator 'magic'.*'pathwise', 'score'"
    ):
        RoutedELBO().loss(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)), guide)


def test_unknown_baseline_option_names_the_site():
    with pytest.raises(ValueError, match=r"site 'c': unknown baseline options \['use_magic'\]"):
        RoutedELBO().loss_and_grads(discrete_model, discrete_guide, DATA, {"use_magic": True})


def test_leave_one_out_needs_particles():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        RoutedELBO(baseline="loo")


def test_non_finite_loss_names_the_sites():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(float("nan")))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(False):
        with pytest.raises(NonFiniteLossError, match=r"non-finite log-density at: x \(model\)"):
            RoutedELBO().loss_and_grads(model, guide)


def test_baseline_state_round_trips():
    elbo = RoutedELBO()
    for _ in range(3):
        elbo.loss_and_grads(discrete_model, discrete_guide)
    state = elbo.state_dict()
    assert set(state["decaying_averages"]) == {"y", "c"}
    other = RoutedELBO()
    other.load_state_dict(state)
    for k, v in other.state_dict()["decaying_averages"].items():
        assert torch.equal(v, state["decaying_averages"][k])


@pytest.mark.parametrize("tracking", [pytest.param("always", marks=pytest.mark.slow), "order"])
def test_dependency_tracking_modes_are_unbiased(tracking):
    params, exact, _ = discrete_exact()
    pyro.set_rng_seed(8)
    elbo = RoutedELBO(dependency_tracking=tracking)
    draws = draw_gradients(elbo, discrete_model, discrete_guide, params, 1500)
    assert_unbiased(draws, exact)


def test_cached_dependencies_equal_provenance_on_every_step():
    """The cached map gives the same surrogate as tracking provenance every step."""
    discrete_guide()
    grads = {}
    for tracking in ("cached", "always"):
        pyro.set_rng_seed(9)
        elbo = RoutedELBO(dependency_tracking=tracking, baseline=None)
        grads[tracking] = [
            torch.autograd.grad(
                elbo.differentiable_loss(discrete_model, discrete_guide), [pyro.param("y_logits")]
            )[0]
            for _ in range(5)
        ]
    for a, b in zip(grads["cached"], grads["always"]):
        torch.testing.assert_close(a, b)
