"""Enumeration as ``TraceEnum_ELBO`` does it (:mod:`pyro_reparam_conv.enumeration`).

Model-side enumerated sites are summed out by Pyro's variable elimination: the loss equals
``TraceEnum_ELBO``'s to float precision on the same draws, and so does every gradient where
the rest of the guide is pathwise (the same draw, the same exact sum). Combined with a
score-function guide site, the mean of gradient draws is within 4.5 standard errors of the
exact gradient (the score site enumerated in the guide by ``TraceEnum_ELBO``, the model
being otherwise exact). ``compute_marginals`` and ``sample_posterior`` equal
``TraceEnum_ELBO``'s on the same seed; zero-probability values give finite losses; no
warning tells the user to use another ELBO.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_reparam_conv import RoutedELBO

DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


@config_enumerate
def mixture(data, weights=(0.5, 0.5)):
    w = pyro.param("w", torch.tensor(weights), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([1.0, 5.0]))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        a = pyro.sample("a", dist.Categorical(w))
        pyro.sample("obs", dist.Normal(locs[a], scale), obs=data)


def scale_guide(data, weights=None):
    m = pyro.param("m", torch.tensor(0.2))
    pyro.sample("scale", dist.LogNormal(m, 0.3))


@config_enumerate
def hmm(data, k=3):
    trans = pyro.param("trans", torch.ones(k, k) + 2 * torch.eye(k),
                       constraint=dist.constraints.simplex)  # fmt: skip
    locs = pyro.param("locs", torch.arange(k).float())
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    x = 0
    for t in pyro.markov(range(len(data))):
        x = pyro.sample(f"x_{t}", dist.Categorical(trans[x]))
        pyro.sample(f"y_{t}", dist.Normal(locs[x], scale), obs=data[t])


def loss_and_grads(elbo, model, guide, names, *args):
    loss = elbo.differentiable_loss(model, guide, *args)
    params = [pyro.param(n).unconstrained() for n in names]
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def same_draw(model, guide, names, *args, nesting=1, seed=0):
    """(RoutedELBO's, TraceEnum_ELBO's) loss and gradient on the same seed."""
    found = []
    for elbo in (RoutedELBO(max_plate_nesting=nesting), TraceEnum_ELBO(max_plate_nesting=nesting)):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        found.append(loss_and_grads(elbo, model, guide, names, *args))
    return found


@pytest.mark.parametrize("seed", [0, 1])
def test_mixture_summed_in_model_equals_traceenum(seed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "vars in model but not guide", no other ELBO
        (loss, grad), (enum_loss, enum_grad) = same_draw(
            mixture, scale_guide, ["w", "locs", "m"], DATA, seed=seed
        )
    assert loss == pytest.approx(enum_loss, rel=1e-6)
    assert torch.allclose(grad, enum_grad, rtol=1e-5, atol=1e-6), (grad, enum_grad)


def test_hmm_chain_summed_in_model_equals_traceenum():
    data = torch.tensor([0.1, 1.2, 2.1, 1.9, 0.2, 0.0, 1.1, 2.5] * 4)
    (loss, grad), (enum_loss, enum_grad) = same_draw(
        hmm, scale_guide, ["trans", "locs", "m"], data, nesting=0
    )
    assert loss == pytest.approx(enum_loss, rel=1e-6)
    assert torch.allclose(grad, enum_grad, rtol=1e-5, atol=1e-6)
    elbo = RoutedELBO(max_plate_nesting=0)
    particle = elbo.site_terms(hmm, scale_guide, data)[0]
    summed = [row.site for row in particle.rows if row.site.endswith("(summed)")]
    assert summed == ["x_0 .. y_31 (summed)"]  # one factor: the whole chain, linear cost


def test_zero_probability_values_contribute_nothing():
    (loss, grad), (enum_loss, enum_grad) = same_draw(
        lambda d: mixture(d, (1.0, 0.0)), scale_guide, ["locs", "m"], DATA
    )
    assert math.isfinite(loss) and loss == pytest.approx(enum_loss, rel=1e-6)
    assert torch.isfinite(grad).all() and torch.allclose(grad, enum_grad, rtol=1e-5, atol=1e-6)


def test_unknown_plate_nesting_is_guessed():
    def model(data):  # no guide latent: the loss is not random
        pyro.sample("scale", dist.Delta(torch.tensor(1.5)))
        with pyro.plate("data", len(data)):
            a = pyro.sample("a", dist.Categorical(torch.tensor([0.3, 0.7])),
                            infer={"enumerate": "parallel"})  # fmt: skip
            pyro.sample("obs", dist.Normal(pyro.param("locs", torch.zeros(2))[a], 2.0), obs=data)

    def guide(data):
        pyro.sample("scale", dist.Delta(torch.tensor(1.5)))

    elbo = RoutedELBO()
    loss = elbo.loss(model, guide, DATA)
    assert elbo.max_plate_nesting == 1
    assert loss == pytest.approx(TraceEnum_ELBO().loss(model, guide, DATA), rel=1e-6)


@config_enumerate
def global_and_local(data):
    """A global cluster ``c`` (the guide's) and local assignments ``a`` summed in the model."""
    p = pyro.param("p", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
    c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])))
    locs = pyro.param("locs", torch.tensor([[0.0, 10.0], [1.0, 11.0]]))
    with pyro.plate("data", len(data)):
        a = pyro.sample("a", dist.Categorical(p))
        pyro.sample("obs", dist.Normal(locs[c, a], 1.0), obs=data)


def cluster_guide(data, how="parallel"):
    q = pyro.param("q", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    infer = {"enumerate": how} if how else {"estimator": "score"}
    pyro.sample("c", dist.Categorical(q), infer=infer)


def test_guide_and_model_enumeration_equal_traceenum():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pyro's "you need to use TraceEnum_ELBO" is not raised
        (loss, grad), (enum_loss, enum_grad) = same_draw(
            global_and_local, cluster_guide, ["p", "locs", "q"], DATA
        )
    assert loss == pytest.approx(enum_loss, rel=1e-6)
    assert torch.allclose(grad, enum_grad, rtol=1e-5, atol=1e-6)


def test_score_and_pathwise_sites_with_model_enumeration():
    """A score-function guide site (``c``, forced) and a pathwise one (``scale``) with local
    assignments summed in the model: the mean gradient against the exact one (``c`` summed
    in the guide as well, ``scale`` then the only draw: the same on both sides per seed)."""

    @config_enumerate
    def model(data, how=None):
        p = pyro.param("p", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        locs = pyro.param("locs", torch.tensor([[0.0, 10.0], [1.0, 11.0]]))
        with pyro.plate("data", len(data)):
            a = pyro.sample("a", dist.Categorical(p))
            pyro.sample("obs", dist.Normal(locs[c, a], scale), obs=data)

    def guide(data, how=None):
        cluster_guide(data, how)
        scale_guide(data)

    names, n = ["p", "locs", "q", "m"], 300
    draws, exact = [], []
    for seed in range(n):
        for how, found in ((None, draws), ("parallel", exact)):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            elbo = RoutedELBO(max_plate_nesting=1) if how is None else TraceEnum_ELBO(
                max_plate_nesting=1)  # fmt: skip
            found.append(loss_and_grads(elbo, model, guide, names, DATA, how)[1])
    draws, exact = torch.stack(draws), torch.stack(exact)
    diff = draws - exact  # the same scale draw: only the score site's noise is left
    err, se = diff.mean(0).abs(), diff.std(0) / math.sqrt(n)
    assert bool(((err <= 4.5 * se) | (err < 1e-6)).all()), (err, se)
    assert bool((diff.std(0) > 0).any())  # the score site's gradient does vary


def test_compute_marginals_and_sample_posterior_equal_traceenum():
    found = []
    for elbo in (RoutedELBO(max_plate_nesting=1), TraceEnum_ELBO(max_plate_nesting=1)):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        probs = elbo.compute_marginals(mixture, scale_guide, DATA)["a"].probs
        pyro.set_rng_seed(4)
        trace = poutine.trace(elbo.sample_posterior).get_trace(mixture, scale_guide, DATA)
        found.append((probs.detach(), trace.nodes["a"]["value"]))
    assert torch.allclose(found[0][0], found[1][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(found[0][1], found[1][1])


def test_marginals_refuse_guide_enumeration_and_particles():
    with pytest.raises(NotImplementedError, match="guide enumeration"):
        RoutedELBO(max_plate_nesting=1).compute_marginals(global_and_local, cluster_guide, DATA)
    with pytest.raises(NotImplementedError, match="multiple particles"):
        RoutedELBO(num_particles=2).sample_posterior(mixture, scale_guide, DATA)


def test_sequential_markup():
    """Guide-side sequential markup: summed exactly (values side by side, checked one at a
    time); model-side: Pyro's error naming the site."""
    pyro.set_rng_seed(0)
    loss = RoutedELBO(max_plate_nesting=1).loss(
        global_and_local, lambda d: cluster_guide(d, "sequential"), DATA
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    assert loss == pytest.approx(
        TraceEnum_ELBO(max_plate_nesting=1).loss(global_and_local, cluster_guide, DATA), rel=1e-6
    )

    def one_at_a_time(d):  # code for one value at a time: a clear error, not the score route
        global_and_local(d)
        float(pyro.sample("b", dist.Bernoulli(0.5)))

    def sequential_guide(d):
        cluster_guide(d, "sequential")
        pyro.sample("b", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})

    with pytest.raises(ValueError, match="site 'b': infer\\['enumerate'\\]='sequential'"):
        RoutedELBO(max_plate_nesting=1).loss(one_at_a_time, sequential_guide, DATA)
    model = config_enumerate(mixture.__wrapped__, "sequential")
    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="'a'.*sequential"):
        RoutedELBO(max_plate_nesting=1).loss(model, scale_guide, DATA)


def simplex(name, rows):
    return pyro.param(name, torch.tensor(rows), constraint=dist.constraints.simplex)


def markov_chain(length, transition, observe=None):
    """``x_0 ~ Uniform{0, 1}``, ``x_i ~ transition[x_{i-1}]`` in ``pyro.markov``; ``observe``
    gives each ``x_i``'s observation site."""
    x = None
    for i in pyro.markov(range(length)):
        probs = torch.tensor([0.5, 0.5]) if x is None else transition[x]
        x = pyro.sample(f"x_{i}", dist.Categorical(probs))
        if observe is not None:
            observe(i, x)


def chain_model(data):
    tp = simplex("tp", [[0.75, 0.25], [0.25, 0.75]])
    ep = simplex("ep", [[0.75, 0.25], [0.25, 0.75]])
    markov_chain(len(data), tp, lambda i, x: pyro.sample(f"y_{i}", dist.Categorical(ep[x]),
                                                         obs=data[i]))  # fmt: skip


@config_enumerate
def chain_guide(data):
    markov_chain(len(data), simplex("tq", [[0.6, 0.4], [0.3, 0.7]]))


@pytest.mark.parametrize("steps", [4, 30])
def test_chain_enumerated_in_guide_equals_traceenum(steps):
    """A ``pyro.markov`` chain enumerated in the guide: each term weighed by the marginal of
    the values it carries (T = 30, K = 2 was killed for memory when every site had a dim of
    its own and the weights were multiplied out)."""
    data = torch.tensor([1.0, 0.0, 1.0] * 10)[:steps]
    (loss, grad), (enum_loss, enum_grad) = same_draw(
        chain_model, chain_guide, ["tp", "ep", "tq"], data, nesting=0
    )
    assert loss == pytest.approx(enum_loss, rel=1e-5)
    assert torch.allclose(grad, enum_grad, rtol=1e-4, atol=1e-5), (grad, enum_grad)


def assert_score_agrees_with_traceenum(model, guide, names, n):
    """The mean of ``n`` RoutedELBO gradient draws (``guide("score")``) against the mean of
    ``n`` TraceEnum_ELBO draws (``guide(None)``: pathwise there), within 4.5 standard errors
    of the difference."""
    found = {}
    for name, elbo, estimator in (
        ("routed", RoutedELBO(max_plate_nesting=0), "score"),
        ("enum", TraceEnum_ELBO(max_plate_nesting=0), None),
    ):
        draws = []
        for seed in range(n):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            draws.append(loss_and_grads(elbo, model, guide, names, estimator)[1])
        found[name] = torch.stack(draws)
    r, e = found["routed"], found["enum"]
    err = (r.mean(0) - e.mean(0)).abs()
    se = (r.var(0) / len(r) + e.var(0) / len(e)).sqrt()
    assert bool((err <= 4.5 * se).all()), (r.mean(0), e.mean(0), err / se)


def test_score_site_downstream_of_an_enumerated_guide_site():
    """``z ~ q(z | k)`` (score function, forced) drawn per value of ``k`` (enumerated in the
    guide): its cost is the expectation given ``k``, its score weighed by ``q(k)``. The mean
    gradient against ``TraceEnum_ELBO``'s (``z`` pathwise there), both Monte Carlo: within
    4.5 standard errors of the difference."""

    def model(estimator):
        k = pyro.sample("k", dist.Categorical(torch.tensor([0.3, 0.7])))
        z = pyro.sample("z", dist.Normal(torch.tensor([-1.0, 2.0])[k], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=torch.tensor(1.5))

    def guide(estimator):
        q = pyro.param("q", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
        k = pyro.sample("k", dist.Categorical(q), infer={"enumerate": "parallel"})
        mu = pyro.param("mu", torch.tensor([0.0, 0.5]))
        infer = {"estimator": estimator} if estimator else {}
        pyro.sample("z", dist.Normal(mu[k], 1.0), infer=infer)

    assert_score_agrees_with_traceenum(model, guide, ["q", "mu"], 400)


class UnsafeBernoulli(dist.Bernoulli):
    """``log p(0) = -inf`` exactly (no clamping), as in Pyro's ``test_avoid_nan``."""

    def log_prob(self, value):
        return torch.where(value == 1, self.probs.log(), (-self.probs).log1p())


@pytest.mark.parametrize("markup", ["parallel", None])
def test_impossible_guide_values_contribute_nothing(markup):
    """Pyro's ``test_avoid_nan``: enumerated guide values of probability 0 (``0 * -inf``)."""

    def model():
        with pyro.plate("batch", 3):
            pyro.sample("z", UnsafeBernoulli(torch.tensor([0.0, 0.5, 1.0])))

    def guide():
        p = pyro.param("p", torch.tensor([0.0, 0.5, 1.0]))
        with pyro.plate("batch", 3):
            pyro.sample("z", UnsafeBernoulli(p), infer={"enumerate": markup} if markup else {})

    elbo = RoutedELBO()
    assert elbo.loss(model, guide) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(elbo.differentiable_loss(model, guide))
    assert elbo.routes["z"].estimator == "enumerate"


def test_routes_say_what_is_summed_jointly_and_at_what_cost():
    elbo = RoutedELBO(max_plate_nesting=0)
    elbo.loss(chain_model, chain_guide, torch.ones(3))
    summed = elbo.routes["x_1"].summed
    assert (summed.side, summed.jointly, summed.largest_factor) == ("guide", ("x_0", "x_2"), 4)
    elbo = RoutedELBO(max_plate_nesting=1)
    elbo.loss(mixture, scale_guide, DATA)
    route = elbo.routes["a"]  # a model-side site has a route too
    assert route.estimator == "enumerate" and route.summed.side == "model"
    assert route.summed.jointly == () and route.summed.largest_factor == 10  # 5 points x 2
    assert "on its own" in route.reason


def test_score_site_upstream_of_an_enumerated_guide_site():
    """``k ~ q(k | z)`` enumerated, ``z`` on the score function: a term that carries ``k``
    depends on ``z`` through ``k``'s marginal, so ``z``'s cost counts it (without that the
    mean gradient was 0.60 against -2.54)."""

    def model(estimator):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        k = pyro.sample("k", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(3.0 * k, 0.5), obs=torch.tensor(2.5))

    def guide(estimator):
        mu = pyro.param("mu", torch.tensor(0.5))
        infer = {"estimator": estimator} if estimator else {}
        z = pyro.sample("z", dist.Normal(mu, 1.0), infer=infer)
        pyro.sample("k", dist.Bernoulli(logits=2.0 * z), infer={"enumerate": "parallel"})

    assert_score_agrees_with_traceenum(model, guide, ["mu"], 600)


def test_a_model_found_plain_that_later_enumerates():
    """The first step shows no site to sum out (later steps run the model without Pyro's
    enumeration); a later step that meets one runs again under it, from the same draws."""

    def model(data, enumerated):
        if enumerated:
            mixture(data)
        else:
            pyro.sample("scale", dist.LogNormal(0.0, 1.0))

    elbo = RoutedELBO(max_plate_nesting=1)
    elbo.loss(model, scale_guide, DATA, False)
    assert elbo._learned.model_plain
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = elbo.loss(model, scale_guide, DATA, True)
    assert not elbo._learned.model_plain
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    expected = TraceEnum_ELBO(max_plate_nesting=1).loss(model, scale_guide, DATA, True)
    assert loss == pytest.approx(expected, rel=1e-6)


@config_enumerate
def gated_subsampled_mixture(data):
    """Model enumeration on a model it was not built for: a subsampled plate, a gate and an
    in-place write on the enumerated values, data whose size changes between steps."""
    w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([1.0, 5.0]))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data), subsample_size=min(3, len(data))) as i:
        a = pyro.sample("a", dist.Categorical(w))
        loc = locs[a].clone()
        loc.mul_(torch.where(a > 0, 1.0, 0.5))  # a gate, written in place
        pyro.sample("obs", dist.Normal(loc, scale), obs=data[i])


def test_model_enumeration_equals_traceenum_under_subsampling_gates_and_changing_arguments():
    """Step by step, on the same seeds, with a new data size every other step: the same
    loss and gradients as TraceEnum_ELBO's (the subsample drawn alike, the sum exact)."""
    sizes = [5, 4, 5, 2]
    names = ["w", "locs", "m"]
    runs = []
    for elbo in (RoutedELBO(max_plate_nesting=1), TraceEnum_ELBO(max_plate_nesting=1)):
        pyro.clear_param_store()
        found = []
        for step, n in enumerate(sizes):
            pyro.set_rng_seed(step)
            found.append(loss_and_grads(elbo, gated_subsampled_mixture, scale_guide, names,
                                        DATA[:n]))  # fmt: skip
        runs.append(found)
    for (loss, grad), (enum_loss, enum_grad) in zip(*runs):
        assert loss == pytest.approx(enum_loss, rel=1e-6)
        assert torch.allclose(grad, enum_grad, rtol=1e-5, atol=1e-6), (grad, enum_grad)
