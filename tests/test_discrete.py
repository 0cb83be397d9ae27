"""Discrete latents: enumeration, DisARM and straight-through Gumbel-softmax as routed
estimators, and the automatic choice among them.

Each estimator is checked against an exact gradient: brute-force enumeration of the joint
support (``exact.exact_elbo``), Pyro's ``TraceEnum_ELBO`` on the same draws (float
tolerance), or the closed-form gradient of the Bernoulli toy ``E[(b - t)^2]``
(``sigmoid'(theta) (1 - 2 t)``); Monte Carlo means within 4.5 standard errors.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact import binary_tensors, exact_elbo, param
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_reparam_conv import RoutedELBO, compare_estimators

DATA = torch.tensor([0.3, 1.8, 2.4])


def grads(elbo, model, guide, names, *args):
    loss = elbo.differentiable_loss(model, guide, *args)
    params = [pyro.param(n).unconstrained() for n in names]
    return float(loss.detach()), torch.autograd.grad(loss, params)


def draws(elbo, model, guide, names, n, *args):
    found = [grads(elbo, model, guide, names, *args)[1] for _ in range(n)]
    return [torch.stack([g[k] for g in found]) for k in range(len(names))]


def assert_mean_close(samples, exact, z_max=4.5):
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    err = (mean - exact).abs()
    assert bool(((err <= z_max * se) | (err < 1e-6)).all()), (mean, exact, err / se)


# --------------------------------------------------------------- enumeration: exact
def discrete_model(data=DATA):
    y = pyro.sample("y", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
    with pyro.plate("N", len(data)):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor([0.3, 0.5, 0.7])[y]))
        pyro.sample("x", dist.Normal(c + 0.5 * y.float(), 1.0), obs=data)


def row_of(table, y):
    """``table[y]`` for a ``y`` of shape () or enumerated, (K, 1): broadcast-safe."""
    return table.index_select(0, y.reshape(-1)).reshape(y.shape[:-1] + table.shape[1:])


def discrete_guide(data=DATA):
    logits = param("y_logits", [0.1, -0.2, 0.3])
    c_logits = param("c_logits", [[0.2, -0.5, 0.1], [0.4, 0.0, -0.3], [-0.1, 0.6, 0.2]])
    y = pyro.sample("y", dist.Categorical(logits=logits))
    with pyro.plate("N", len(data)):
        pyro.sample("c", dist.Bernoulli(logits=row_of(c_logits, y)))


def test_enumeration_is_exact_with_nested_sites_and_costs_2_evaluations_per_plate():
    """y (3 values) then c_i | y per plate element: 3 x 2 evaluations side by side, not
    3 x 2^3; loss and gradients equal the brute-force sum over all 24 joint values."""
    discrete_guide()
    params = dict(pyro.get_param_store().named_parameters())
    values = {"y": [torch.tensor(k) for k in range(3)], "c": binary_tensors((3,))}
    loss = -exact_elbo(discrete_model, discrete_guide, values)
    exact = torch.autograd.grad(loss, list(params.values()))
    elbo = RoutedELBO()
    got_loss, got = grads(elbo, discrete_model, discrete_guide, list(params))
    assert got_loss == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert {k: r.estimator for k, r in elbo.routes.items()} == {"y": "enumerate", "c": "enumerate"}
    assert "2 evaluations, no variance" in elbo.routes["c"].reason
    (table,) = elbo.site_terms(discrete_model, discrete_guide)
    c = table.guide_trace.nodes["c"]["value"]
    assert c.shape[0] == 2 and c.numel() == 2  # both values of every element at once


def mixture_model(data):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
        z = pyro.sample("z", dist.Normal(torch.tensor([-1.0, 0.0, 1.0])[y], 1.0))
        pyro.sample("x", dist.Normal(z + w, 0.5), obs=data)


def mixture_guide(data):
    pyro.sample("w", dist.Normal(param("w_loc", 0.1), 0.5))
    logits = param("logits", [[0.1, 0.4, -0.3], [0.0, 0.2, 0.5], [-0.4, 0.3, 0.1], [0.2, 0.0, 0.0]])
    z_locs = param("z_locs", [-0.5, 0.2, 0.9])
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(logits=logits))
        pyro.sample("z", dist.Normal(z_locs[y], 0.8))


MIX_DATA = torch.tensor([0.3, 1.8, 2.4, -0.5])


def test_enumeration_equals_trace_enum_elbo_with_pathwise_sites_downstream():
    names = ["w_loc", "logits", "z_locs"]
    mixture_guide(MIX_DATA)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        expected = grads(
            TraceEnum_ELBO(max_plate_nesting=1),
            mixture_model,
            config_enumerate(mixture_guide, "parallel"),
            names,
            MIX_DATA,
        )
        pyro.set_rng_seed(seed)
        elbo = RoutedELBO(fast_path=False, max_plate_nesting=1)
        got = grads(elbo, mixture_model, mixture_guide, names, MIX_DATA)
        assert got[0] == pytest.approx(expected[0], rel=1e-5)
        for a, b in zip(got[1], expected[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert elbo.routes["y"].estimator == "enumerate" and elbo.routes["z"].estimator == "pathwise"


def scored_model(data=DATA):
    y = pyro.sample("y", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
    with pyro.plate("N", len(data)):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor([0.3, 0.5, 0.7])[y]))
        pyro.sample("x", dist.Normal(c + 0.5 * y.float(), 1.0), obs=data)


def scored_guide(data=DATA):
    y = pyro.sample("y", dist.Categorical(logits=param("y_logits", [0.1, -0.2, 0.3])))
    c_logits = param("c_logits", [[0.2, -0.5, 0.1], [0.4, 0.0, -0.3], [-0.1, 0.6, 0.2]])
    with pyro.plate("N", len(data)):
        # "enumerate": None keeps config_enumerate (for TraceEnum_ELBO) off this site too
        infer = {"estimator": "score", "enumerate": None}
        pyro.sample("c", dist.Bernoulli(logits=row_of(c_logits, y)), infer=infer)


def test_enumeration_with_a_score_site_downstream_is_unbiased_and_matches_trace_enum():
    """y enumerated, c | y on the score function in each of y's branches: the loss equals
    TraceEnum_ELBO's on the same draws, the gradient the exact one in expectation."""
    scored_guide()
    names = ["y_logits", "c_logits"]
    params = [pyro.param(n) for n in names]
    values = {"y": [torch.tensor(k) for k in range(3)], "c": binary_tensors((3,))}
    exact = torch.autograd.grad(-exact_elbo(scored_model, scored_guide, values), params)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        expected = grads(
            TraceEnum_ELBO(max_plate_nesting=1),
            scored_model,
            config_enumerate(scored_guide, "parallel", expand=False),
            names,
        )
        pyro.set_rng_seed(seed)
        got = grads(RoutedELBO(max_plate_nesting=1), scored_model, scored_guide, names)
        assert got[0] == pytest.approx(expected[0], rel=1e-5)
    pyro.set_rng_seed(4)
    elbo = RoutedELBO(max_plate_nesting=1)
    samples = draws(elbo, scored_model, scored_guide, names, 1500)
    assert elbo.routes["c"].estimator == "score" and elbo.routes["y"].estimator == "enumerate"
    for s, e in zip(samples, exact):
        assert_mean_close(s, e)


# ------------------------------------------------------------------------- DisARM
def vector_model(data):
    b = pyro.sample("b", dist.Bernoulli(torch.full((3,), 0.4)).to_event(1))
    loc = (b * torch.tensor([1.0, -2.0, 0.5])).sum(-1) + b[..., 0] * b[..., 1]  # not additive
    pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


def vector_guide(data):
    pyro.sample("b", dist.Bernoulli(logits=param("logits", [0.3, -0.6, 1.1])).to_event(1))


def test_disarm_is_the_default_for_a_bernoulli_vector_and_unbiased():
    data = torch.tensor(0.7)
    vector_guide(data)
    theta = pyro.param("logits")
    loss = -exact_elbo(vector_model, vector_guide, {"b": binary_tensors((3,))}, data)
    exact = torch.autograd.grad(loss, theta)[0]
    pyro.set_rng_seed(5)
    elbo = RoutedELBO()
    (samples,) = draws(elbo, vector_model, vector_guide, ["logits"], 2000, data)
    route = elbo.routes["b"]
    assert route.estimator == "disarm", route
    assert "no finite support to enumerate" in route.reason and "antithetic" in route.reason
    assert_mean_close(samples, exact)


def plate_model(data):
    with pyro.plate("N", len(data)):
        c = pyro.sample("c", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=data)
    # a term outside the plate that depends on every c_i: DisARM's pair is drawn jointly
    # (keepdim: the sum over the plate must not move the dims left of it)
    pyro.factor("count", -0.3 * c.sum(-1, keepdim=True) ** 2)


def plate_guide(data, estimator="disarm"):
    logits = param("logits", [0.3, -0.4, 0.8])
    with pyro.plate("N", len(data)):
        pyro.sample("c", dist.Bernoulli(logits=logits), infer={"estimator": estimator})


def test_disarm_per_plate_element_with_a_term_outside_the_plate_is_unbiased():
    plate_guide(DATA)
    theta = pyro.param("logits")
    loss = -exact_elbo(plate_model, plate_guide, {"c": binary_tensors((3,))}, DATA)
    exact = torch.autograd.grad(loss, theta)[0]
    pyro.set_rng_seed(6)
    (samples,) = draws(RoutedELBO(), plate_model, plate_guide, ["logits"], 2000, DATA)
    assert_mean_close(samples, exact)


# the Bernoulli toy of the RELAX and ARM papers:
# minimize E_q[(b - t)^2], q = Bernoulli(sigmoid(theta))
def toy_model(t):
    theta = pyro.param("theta").detach()
    b = pyro.sample("b", dist.Bernoulli(logits=theta))  # prior = q: log p - log q = 0
    pyro.factor("loss", -((b - t) ** 2))


def toy_guide(t, estimator=None, temperature=None):
    infer = {} if estimator is None else {"estimator": estimator}
    if temperature is not None:
        infer["temperature"] = temperature
    pyro.sample("b", dist.Bernoulli(logits=pyro.param("theta", torch.tensor(0.0))), infer=infer)


def toy_exact(t, theta=0.0):
    p = 1 / (1 + math.exp(-theta))
    return p * (1 - p) * (1 - 2 * t)  # d/dtheta E[(b - t)^2]


def toy_draws(estimator, n, t=0.499, particles=1, **kw):
    elbo = RoutedELBO(num_particles=particles, vectorize_particles=particles > 1)
    guide = lambda t: toy_guide(t, estimator, **kw)  # noqa: E731
    (samples,) = draws(elbo, toy_model, guide, ["theta"], n, t)
    return samples, elbo


@pytest.mark.parametrize("estimator", ["disarm", "enumerate", "score"])
def test_the_toy_gradient_is_unbiased(estimator):
    pyro.set_rng_seed(7)
    samples, elbo = toy_draws(estimator, 3000, t=0.45, particles=2 if estimator == "score" else 1)
    assert elbo.routes["b"].estimator == estimator
    assert_mean_close(samples, torch.tensor(toy_exact(0.45)))
    if estimator == "enumerate":
        assert samples.std() < 1e-7  # exact


def test_disarm_variance_is_below_the_score_function_at_equal_evaluations():
    """Two model evaluations each: DisARM's antithetic pair against the score function with
    two particles and a leave-one-out baseline. Measured (t = 0.499): 0 variance for DisARM
    whenever b = b~ (never both differ at p = 1/2: it is exact there), 0.0156 for score."""
    pyro.set_rng_seed(8)
    disarm, _ = toy_draws("disarm", 1000)
    score, _ = toy_draws("score", 1000, particles=2)
    assert disarm.var() < 0.01 * score.var(), (disarm.var(), score.var())


# ------------------------------------------------------------- straight-through Gumbel
def straight_through_mean(theta: float, t: float, tau: float) -> float:
    """E[d loss / d theta] of straight-through Gumbel-softmax on the toy, by quadrature over
    the logistic noise l: 2 (1[theta + l > 0] - t) s (1 - s) / tau, s = sigmoid((theta + l)
    / tau) (the log p - log q part has mean 0)."""
    noise = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    density = torch.sigmoid(noise) * torch.sigmoid(-noise)
    s = torch.sigmoid((theta + noise) / tau)
    g = 2 * ((theta + noise > 0).double() - t) * s * (1 - s) / tau
    return float((g * density).sum() * (noise[1] - noise[0]))


def test_gumbel_st_is_opt_in_biased_and_says_so():
    """Its mean is the straight-through gradient's (quadrature), not the exact one: at
    t = 0.1, temperature 1, 0.133 against 0.2 (measured: 0.138 +- 0.005)."""
    pyro.set_rng_seed(9)
    samples, elbo = toy_draws("gumbel_st", 200, t=0.1, temperature=1.0, particles=100)
    assert "biased: straight-through Gumbel-softmax at temperature 1" in elbo.routes["b"].reason
    assert_mean_close(samples, torch.tensor(straight_through_mean(0.0, 0.1, 1.0)))
    se = samples.std() / math.sqrt(len(samples))
    assert abs(samples.mean() - toy_exact(0.1)) > 6 * se  # biased, unlike the others
    with pytest.raises(ValueError, match=r"site 'b': infer\['temperature'\] must be a number > 0"):
        RoutedELBO().loss(toy_model, lambda t: toy_guide(t, "gumbel_st", temperature=0.0), 0.45)


def test_gumbel_st_values_are_exactly_discrete():
    logits = torch.tensor([[0.3, -1.0, 2.0]] * 5, requires_grad=True)

    def guide():
        with pyro.plate("N", 5):
            infer = {"estimator": "gumbel_st"}
            pyro.sample("y", dist.OneHotCategorical(logits=logits), infer=infer)

    def model():
        with pyro.plate("N", 5):
            pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(5, 3)))

    (table,) = RoutedELBO().site_terms(model, guide)
    value = table.guide_trace.nodes["y"]["value"]
    assert value.shape == (5, 3) and set(value.unique().tolist()) <= {0.0, 1.0}
    assert (value.sum(-1) == 1).all()
    table.elbo().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# -------------------------------------------------------------- the automatic choice
@pytest.mark.parametrize(
    "fn, max_enumerate, estimator, reason",
    [
        (dist.Bernoulli(0.3), 16, "enumerate", "support of 2 <= max_enumerate"),
        (dist.Categorical(logits=torch.zeros(5)), 16, "enumerate", "support of 5"),
        (dist.OneHotCategorical(logits=torch.zeros(5)), 16, "enumerate", "support of 5"),
        (dist.Categorical(logits=torch.zeros(40)), 16, "score", "support of 40 > max_enumerate=16"),
        (dist.Bernoulli(0.3), 0, "disarm", "support of 2 > max_enumerate=0"),
        (dist.Bernoulli(torch.full((4,), 0.3)).to_event(1), 16, "disarm", "an antithetic pair"),
        (dist.OneHotCategorical(logits=torch.zeros(5)), 0, "score", "is not a Bernoulli"),
        (dist.Normal(0.0, 1.0), 16, "pathwise", "Normal has rsample"),
        (dist.Poisson(3.0), 16, "score", "Poisson has no finite support"),
    ],
)  # fmt: skip
def test_the_routing_table_and_its_reasons(fn, max_enumerate, estimator, reason):
    def guide():
        pyro.sample("s", fn)

    def model():
        pyro.sample("s", fn)

    elbo = RoutedELBO(max_enumerate=max_enumerate)
    elbo.loss(model, guide)
    route = elbo.routes["s"]
    assert route.estimator == estimator and reason in route.reason, route
    assert route.estimator != "gumbel_st" and not route.forced


# ---------------------------------------- values side by side: verified, or avoided
def nonlocal_model(data):
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(y.float(), 1.0), obs=data)
    total = y.float().sum(-1, keepdim=True)  # keepdim: the dims left of the plate stay put
    pyro.sample("total", dist.Normal(total, 1.0), obs=torch.tensor([3.0]))


def nonlocal_guide(data, infer=None):
    logits = param("logits", torch.zeros(len(data), 3))
    with pyro.plate("N", len(data)):
        pyro.sample("y", dist.Categorical(logits=logits), infer=infer or {})


def test_enumeration_of_a_site_used_outside_its_plate_falls_back_or_is_refused():
    """'total' sums y over the plate: per-element enumeration would be wrong. Chosen
    automatically, y falls back to the score function and the route says why; requested,
    it is an error naming the site and the term."""
    elbo = RoutedELBO()
    loss = elbo.loss(nonlocal_model, nonlocal_guide, DATA)
    assert math.isfinite(loss)
    route = elbo.routes["y"]
    assert route.estimator == "score", route
    assert "enumerate needs values side by side" in route.reason
    assert "'total'" in route.reason
    assert elbo.state_dict()["avoid"]["y"]["enumerate"] == route.reason.split("; ")[1]
    with pytest.raises(ValueError, match=r"site 'y'.*'total' \(model\) differs"):
        RoutedELBO().loss(
            nonlocal_model, lambda d: nonlocal_guide(d, {"estimator": "enumerate"}), DATA
        )


def max_model(data):
    """A term outside the plate (the largest y) that one value at a time cannot tell from
    side by side: only the per-element weights show it is not local."""
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(y.float(), 1.0), obs=data)
    top = y.float().max(-1, keepdim=True).values
    pyro.sample("top", dist.Normal(top, 1.0), obs=torch.tensor([2.0]))


@pytest.mark.parametrize("tracking", ["cached", "order"])
def test_a_term_outside_the_plate_is_caught_by_the_per_element_weights(tracking):
    elbo = RoutedELBO(dependency_tracking=tracking)
    elbo.loss(max_model, nonlocal_guide, DATA)
    assert elbo.routes["y"].estimator == "score"
    assert "the term of 'top' (model) depends on it outside its plate" in elbo.routes["y"].reason
    explicit = lambda d: nonlocal_guide(d, {"estimator": "enumerate"})  # noqa: E731
    with pytest.raises(ValueError, match=r"site 'y' is evaluated per element.*'top'"):
        RoutedELBO(dependency_tracking=tracking).loss(max_model, explicit, DATA)


def shape_bound_guide(data):
    """A guide written for one value at a time (it checks the shape of its draw)."""
    logits = param("logits", torch.zeros(len(data), 3))
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(logits=logits))
        assert y.shape == (len(data),), "this guide expects one y per data point"


def shape_bound_model(data):
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(y.float(), 1.0), obs=data)


def test_code_that_does_not_broadcast_keeps_working_on_the_score_function():
    elbo = RoutedELBO()
    for _ in range(3):
        elbo.loss_and_grads(shape_bound_model, shape_bound_guide, DATA)
    route = elbo.routes["y"]
    assert route.estimator == "score"
    assert "evaluating them side by side failed (AssertionError" in route.reason


def silent_model(data):
    """Mixes the values side by side without an error: y.float().mean() over all of them."""
    with pyro.plate("N", len(data)):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(y.float().mean(), 1.0), obs=data)


def silent_guide(data, infer=None):
    with pyro.plate("N", len(data)):
        pyro.sample(
            "y",
            dist.Categorical(logits=param("logits", torch.zeros(len(data), 3))),
            infer=infer or {},
        )


def test_code_that_mixes_the_values_silently_is_caught_by_the_one_at_a_time_check():
    elbo = RoutedELBO()
    elbo.loss(silent_model, silent_guide, DATA)
    assert elbo.routes["y"].estimator == "score"
    assert "differs between the values side by side and one at a time" in elbo.routes["y"].reason
    with pytest.raises(ValueError, match=r"site 'y': infer\['estimator'\]='enumerate' evaluates"):
        RoutedELBO().loss(silent_model, lambda d: silent_guide(d, {"estimator": "enumerate"}), DATA)


def test_avoided_routes_are_state_that_round_trips():
    elbo = RoutedELBO()
    elbo.loss(silent_model, silent_guide, DATA)
    other = RoutedELBO()
    other.load_state_dict(elbo.state_dict())
    other.loss(silent_model, silent_guide, DATA)
    assert other.routes["y"].reason == elbo.routes["y"].reason


# ---------------------------------------------------------------- compare_estimators
def test_compare_estimators_takes_every_discrete_estimator():
    df = compare_estimators(
        toy_model, toy_guide, 0.499, estimators=("enumerate", "disarm", "score", "gumbel_st"),
        num_draws=50,
    )  # fmt: skip
    rows = df.set_index("estimator")
    assert rows.loc["enumerate", "variance"] < 1e-12
    assert rows.loc["disarm", "variance"] < rows.loc["score", "variance"]
    assert "b:gumbel_st" in rows.loc["gumbel_st", "routes"]
    per_site = compare_estimators(
        toy_model, toy_guide, 0.499, estimators={"auto": {}, "b by score": {"b": "score"}},
        num_draws=20,
    )  # fmt: skip
    assert set(per_site["estimator"]) == {"auto", "b by score"}
    assert "b:score" in per_site.set_index("estimator").loc["b by score", "routes"]
