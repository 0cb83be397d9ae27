"""Flipout and local reparameterization of Normal weights (``estimators/flipout.py``,
``weight_layers.py``): unbiased against the plain weight draw (many draws, standard-error
tolerance) on a small conv net and a small linear net; each example its own weight draw;
the first step checks the weight's uses, any other use falls back to the plain draw; a clear
error where the route does not apply; an AutoNormal guide on a PyroModule CNN."""

import copy
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from exact import draw_gradients, param
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample

from pyro_reparam_conv import RoutedELBO, force_estimator

CONV = (2, 1, 3, 3)  # out, in, kernel
LINEAR = (2, 3)  # out, in


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 5, 5, generator=g)
    x[1] = x[0]  # two identical examples
    return x, torch.randn(6, 2, generator=g)


def conv_model(x, y, seen=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(CONV).to_event(4))
    h = torch.tanh(F.conv2d(x, w, padding=1))
    if seen is not None:
        seen.append(h.detach())
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(h.mean((-1, -2)), 0.5).to_event(1), obs=y)


def transposed_model(x, y, seen=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand((1, 2, 2, 2)).to_event(4))
    h = torch.tanh(F.conv_transpose2d(x, w, stride=2))  # weight: (in, out, kh, kw)
    if seen is not None:
        seen.append(h.detach())
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(h.mean((-1, -2)), 0.5).to_event(1), obs=y)


def linear_model(x, y, seen=None):
    v = pyro.sample("v", dist.Normal(0.0, 1.0).expand(LINEAR).to_event(2))
    h = torch.tanh(F.linear(x.flatten(1)[:, :3], v, torch.ones(2)))
    if seen is not None:
        seen.append(h.detach())
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(h, 0.5).to_event(1), obs=y)


def guide_for(site: str, shape, estimator: str):
    def guide(x, y, seen=None):
        g = torch.Generator().manual_seed(1)
        loc = param(f"{site}_loc", 0.5 * torch.randn(shape, generator=g))
        log_scale = param(f"{site}_log_scale", torch.full(shape, math.log(0.6)))
        fn = dist.Normal(loc, log_scale.exp()).to_event(len(shape))
        pyro.sample(site, fn, infer={"estimator": estimator})

    return guide


def _gradients(model, site, shape, estimator, num_draws, seed=0, **options):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    x, y = _data()
    guide = guide_for(site, shape, estimator)
    elbo = RoutedELBO(**options)
    elbo.loss(model, guide, x, y)  # the first step checks the weight's uses
    assert elbo.routes[site].estimator == estimator
    store = pyro.get_param_store()
    params = {k: store[f"{site}_{k}"] for k in ("loc", "log_scale")}
    draws = draw_gradients(elbo, model, guide, params, num_draws, x, y)
    if estimator != "pathwise":
        assert elbo.routes[site].layers.startswith(estimator), elbo.routes[site].reason
    return draws


def _assert_same_mean(draws, reference, z_max=4.5):
    for k, d in draws.items():
        d, r = d.double(), reference[k].double()
        se = (d.var(0) / d.shape[0] + r.var(0) / r.shape[0]).sqrt()
        z = (d.mean(0) - r.mean(0)).abs() / se
        assert bool((z <= z_max).all()), f"{k}: z-scores {z.flatten().tolist()}"


@pytest.mark.parametrize(
    "model,site,shape,estimator",
    [
        (conv_model, "w", CONV, "flipout"),
        (transposed_model, "w", (1, 2, 2, 2), "flipout"),
        (linear_model, "v", LINEAR, "flipout"),
        (linear_model, "v", LINEAR, "local_reparam"),
    ],
)
def test_unbiased_against_the_plain_weight_draw(model, site, shape, estimator):
    draws = _gradients(model, site, shape, estimator, 1000, seed=1)
    plain = _gradients(model, site, shape, "pathwise", 1000, seed=2)
    _assert_same_mean(draws, plain)


@pytest.mark.parametrize(
    "model,site,shape,estimator",
    [(conv_model, "w", CONV, "flipout"), (linear_model, "v", LINEAR, "local_reparam"),
     (conv_model, "w", CONV, "pathwise")],  # fmt: skip
)
def test_vectorized_particles_batched_layers_unbiased(model, site, shape, estimator):
    """With ``vectorize_particles=True`` the weight has a particle dim: each particle's
    weight is applied to the batch (a grouped convolution), where plain Pyro fails; plain
    weight draws too (``BatchedLayers``)."""
    vectorized = {"num_particles": 4, "vectorize_particles": True, "max_plate_nesting": 1}
    draws = _gradients(model, site, shape, estimator, 300, seed=1, **vectorized)
    plain = _gradients(model, site, shape, "pathwise", 1000, seed=2)
    _assert_same_mean(draws, plain)


@pytest.mark.parametrize("func,shape", [
    (F.conv2d, (2, 1, 3, 3)), (F.conv_transpose2d, (1, 2, 2, 2)), (F.linear, (2, 25)),
])  # fmt: skip
def test_batched_layers_apply_each_particles_weight_to_the_batch(func, shape):
    from pyro_reparam_conv.weight_layers import BatchedLayers

    x, _ = _data()
    x = x.flatten(1) if func is F.linear else x
    weight = torch.randn((4, 1) + shape)  # particles, then a broadcast batch dim
    with BatchedLayers():
        got = func(x, weight, torch.ones(shape[1] if func is F.conv_transpose2d else shape[0]))
    for p in range(4):
        bias = torch.ones(shape[1] if func is F.conv_transpose2d else shape[0])
        assert torch.allclose(got[p], func(x, weight[p, 0], bias), atol=1e-5)


def coupled_model(x, y, seen=None):
    """A likelihood of products of neighbouring pixels, which share the kernel's draw."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(CONV).to_event(4))
    h = F.conv2d(x, w, padding=1)
    pairs = (h[..., 1:, :] * h[..., :-1, :]).mean((-1, -2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(pairs, 1.0).to_event(1), obs=y)


def test_pixels_that_share_a_kernel_flipout_unbiased_conv_local_reparam_not():
    """The same test has the power to see the objective that local reparameterization of a
    conv changes (pixels drawn independently), where flipout keeps it."""
    plain = _gradients(coupled_model, "w", CONV, "pathwise", 1000, seed=2)
    _assert_same_mean(_gradients(coupled_model, "w", CONV, "flipout", 1000, seed=1), plain)
    with pytest.raises(AssertionError, match="z-scores"):
        _assert_same_mean(_gradients(coupled_model, "w", CONV, "local_reparam", 1000), plain)


def _differ(model, site, shape, estimator) -> list:
    """Per step after the first (a plain draw), whether examples 0 and 1 (identical inputs)
    got different layer outputs."""
    torch.manual_seed(0)
    x, y = _data()
    seen = []
    elbo = RoutedELBO()
    for _ in range(6):
        elbo.loss(model, guide_for(site, shape, estimator), x, y, seen)
    return [not torch.allclose(h[0], h[1]) for h in seen[1:]]


@pytest.mark.parametrize(
    "model,site,shape",
    [(conv_model, "w", CONV), (transposed_model, "w", (1, 2, 2, 2)), (linear_model, "v", LINEAR)],
)
def test_flipout_draws_a_weight_per_example(model, site, shape):
    # flipout's weights are pseudo-independent: with 1 input and 2 output channels two
    # examples share their signs with probability 1/4 per step
    assert sum(_differ(model, site, shape, "flipout")) >= 2
    assert not any(_differ(model, site, shape, "pathwise"))  # one weight draw per batch


def test_local_reparam_of_a_linear_layer_draws_per_example():
    assert all(_differ(linear_model, "v", LINEAR, "local_reparam"))


def test_local_reparam_of_a_conv_says_it_changes_the_objective():
    x, y = _data()
    elbo = RoutedELBO(layer_estimators="auto")
    for _ in range(2):
        elbo.loss(conv_model, guide_for("w", CONV, "local_reparam"), x, y)
    route = elbo.routes["w"]
    assert route.layers == "local_reparam in conv2d" and "changes the objective" in route.reason


def _conv_model_then(then):
    """The conv model with its pooled output passed through ``then(w, h)``: another use of
    the weight, or none."""

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(CONV).to_event(4))
        h = then(w, torch.tanh(F.conv2d(x, w, padding=1)).mean((-1, -2)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(h, 0.5).to_event(1), obs=y)

    return model


def _unrouted_guide(x, y):
    pyro.sample("w", dist.Normal(param("w_loc", torch.zeros(CONV)), 0.5).to_event(4))


def _from_step(first: int, use):
    """``then`` for :func:`_conv_model_then`: ``use`` from step ``first`` on; ``step[0]``
    counts the model's runs."""
    step = [0]

    def then(w, h):
        step[0] += 1
        return h + use(w) if step[0] >= first else h

    return then, step


def test_another_use_of_the_weight_falls_back_to_the_plain_draw():
    x, y = _data()
    then, step = _from_step(3, lambda w: w.sum())  # from the third step on, read elsewhere
    model = _conv_model_then(then)
    elbo = RoutedELBO()
    guide = guide_for("w", CONV, "flipout")
    elbo.loss(model, guide, x, y)
    assert "first step" in elbo.routes["w"].reason
    elbo.loss(model, guide, x, y)
    assert elbo.routes["w"].layers == "flipout in conv2d"
    elbo.loss(model, guide, x, y)  # raised inside the model, recomputed with the plain draw
    assert step[0] == 4
    assert elbo.routes["w"].layers == (
        "plain weight draw: its value is used by sum (besides as a layer's weight)"
    )
    elbo.loss(model, guide, x, y)
    assert step[0] == 5 and "plain weight draw" in elbo.routes["w"].reason


@pytest.mark.parametrize(
    "use",
    [
        lambda w: w.detach().sum(),
        lambda w: copy.deepcopy(w).sum(),
        lambda w: w.view(-1)[0],
        lambda w: torch.cat([w, w]).mean(),
        lambda w: w[0, 0, 0, 0],
        lambda w: w.clone().sum(),
        lambda w: w.data.sum(),
    ],
    ids=["detach", "deepcopy", "view", "cat", "getitem", "clone", "data"],
)
def test_any_other_use_keeps_the_plain_draw(use):
    x, y = _data()
    # shape and dim read no value
    model = _conv_model_then(lambda w, h: h + use(w) * 0 + w.shape[0] * 0 + w.dim() * 0)
    elbo = RoutedELBO(layer_estimators="auto")
    for _ in range(2):
        elbo.loss(model, _unrouted_guide, x, y)
        assert elbo.routes["w"].estimator == "pathwise"
    for _ in range(2):
        elbo.loss(model, guide_for("w", CONV, "flipout"), x, y)
        assert elbo.routes["w"].layers.startswith("plain weight draw: its value is used by")


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_in_training_mode_after_the_layer_keeps_the_plain_draw(training):
    """Batch statistics mix the layer's examples: per-example weights would change them."""
    x, y = _data()
    running = torch.zeros(2), torch.ones(2)

    def then(w, h):
        return F.batch_norm(h, *running, training=training)

    elbo = RoutedELBO(layer_estimators="auto")
    for _ in range(2):
        elbo.loss(_conv_model_then(then), _unrouted_guide, x, y)
    route = elbo.routes["w"]
    if training:
        assert route.estimator == "pathwise" and "batch_norm" in route.layers
    else:  # running statistics: each example normalized alone
        assert route.estimator == "flipout"


def test_a_weight_used_twice_stays_a_plain_draw():
    x, y = _data()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand((1, 1, 3, 3)).to_event(4))
        h = F.conv2d(F.conv2d(x, w, padding=1), w, padding=1).mean((1, 2, 3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(h, 0.5), obs=y[:, 0])

    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss(model, guide_for("w", (1, 1, 3, 3), "flipout"), x, y)
    assert "second layer call" in elbo.routes["w"].layers


@pytest.mark.parametrize("estimator", ["flipout", "local_reparam"])
def test_a_forced_route_that_does_not_apply_names_the_site(estimator):
    x, y = _data()

    def guide(x, y):
        fn = dist.Laplace(torch.zeros(CONV), 1.0).to_event(4)
        pyro.sample("w", fn, infer={"estimator": estimator})

    with pytest.raises(ValueError, match=rf"site 'w'.*{estimator} needs a factorized Normal"):
        RoutedELBO().loss(conv_model, guide, x, y)


class BayesianCNN(PyroModule):
    def __init__(self):
        super().__init__()
        self.conv = PyroModule[torch.nn.Conv2d](1, 2, 3, padding=1)
        self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 1, 3, 3]).to_event(4))
        self.fc = PyroModule[torch.nn.Linear](2, 3)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 2]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([3]).to_event(1))  # same call

    def forward(self, x, y=None):
        h = torch.relu(self.conv(x)).mean((-1, -2))
        logits = self.fc(h)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def test_autonormal_on_a_pyro_module_cnn():
    torch.manual_seed(0)
    x, _ = _data()
    y = torch.randint(0, 3, (6,))
    model = BayesianCNN()
    # AutoNormal draws "<name>_unconstrained" from a Normal and passes it on as "<name>"
    guide = force_estimator(AutoNormal(model), "flipout", sites=["conv.weight_unconstrained"])
    guide = force_estimator(guide, "local_reparam", sites=["fc.weight_unconstrained"])
    elbo = RoutedELBO(num_particles=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    losses = [svi.step(x, y) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    routes = elbo.routes
    assert routes["conv.weight_unconstrained"].layers == "flipout in conv2d"
    assert routes["fc.weight_unconstrained"].layers == "local_reparam in linear"


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDiagonalNormal])
def test_autoguide_weights_are_routed_with_and_without_vectorized_particles(autoguide, vectorize):
    """AutoNormal's Delta passes the draw on (expanded by the particle plate when
    vectorized); AutoDiagonalNormal's slices of its flat latent are weight sites of their
    own. The slow tests below check the gradients."""
    torch.manual_seed(0)
    x, _ = _data()
    model = BayesianCNN()
    options = {"num_particles": 2, "vectorize_particles": True, "max_plate_nesting": 1}
    elbo = RoutedELBO(**(options if vectorize else {}))
    guide = autoguide(model)
    for _ in range(2):
        assert math.isfinite(elbo.loss(model, guide, x, torch.randint(0, 3, (6,))))
    suffix = "_unconstrained" if autoguide is AutoNormal else ""
    routes = elbo.routes
    assert routes[f"conv.weight{suffix}"].layers == "flipout in conv2d"
    assert routes[f"fc.weight{suffix}"].layers == "local_reparam in linear"
    if autoguide is AutoDiagonalNormal:
        latent = routes["_AutoDiagonalNormal_latent"].layers
        assert "slices (conv.weight, fc.weight, fc.bias)" in latent
        assert routes["fc.bias"].layers.startswith("plain weight draw: its value is used by")


@pytest.mark.slow
@pytest.mark.parametrize(
    "autoguide,vectorize", [(AutoNormal, True), (AutoDiagonalNormal, False),
                            (AutoDiagonalNormal, True)],
)  # fmt: skip
def test_autoguide_layer_estimators_unbiased_against_plain_weight_draws(autoguide, vectorize):
    """The gradients of the routes above match plain weight draws one particle at a time:
    AutoNormal's weights applied per particle (a grouped convolution, where plain Pyro
    fails); AutoDiagonalNormal's slices, each a factorized Normal independent of the
    others, each a weight site of its own (the bias slice, used as a bias, stays plain)."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    x, _ = _data()
    y = torch.randint(0, 3, (6,))
    model = BayesianCNN()
    guide = autoguide(model, init_scale=0.5)
    options = {"num_particles": 4, "vectorize_particles": True, "max_plate_nesting": 1}
    elbo = RoutedELBO(**(options if vectorize else {}))
    elbo.loss(model, guide, x, y)
    store = pyro.get_param_store()
    names = (["AutoNormal.locs.conv.weight", "AutoNormal.locs.fc.weight"]
             if autoguide is AutoNormal else ["AutoDiagonalNormal.loc", "AutoDiagonalNormal.scale"])
    params = {k: store[k].unconstrained() for k in names}
    draws = draw_gradients(elbo, model, guide, params, 250 if vectorize else 1000, x, y)
    assert sum(r.layers in ("flipout in conv2d", "local_reparam in linear")
               for r in elbo.routes.values()) == 2  # fmt: skip
    plain = draw_gradients(RoutedELBO(layer_estimators="requested"), model, guide, params, 1000,
                           x, y)  # fmt: skip
    _assert_same_mean(draws, plain)


def _auto_guide(x, y, seen=None):
    for site, shape in (("w", CONV), ("v", LINEAR)):
        loc = param(f"{site}_loc", torch.zeros(shape))
        pyro.sample(site, dist.Normal(loc, 0.5).to_event(len(shape)))


def _both(x, y, seen=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(CONV).to_event(4))
    v = pyro.sample("v", dist.Normal(0.0, 1.0).expand(LINEAR).to_event(2))
    h = torch.tanh(F.conv2d(x, w, padding=1)).mean((-1, -2))
    out = F.linear(torch.cat([h, h[:, :1]], -1), v)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(out, 0.5).to_event(1), obs=y)


def test_plain_weight_draws_unless_requested_with_layer_estimators_requested():
    x, y = _data()
    elbo = RoutedELBO(layer_estimators="requested")
    for _ in range(3):
        elbo.loss(_both, _auto_guide, x, y)
    assert {n: r.estimator for n, r in elbo.routes.items()} == {"w": "pathwise", "v": "pathwise"}
    with pytest.raises(ValueError, match="layer_estimators must be"):
        RoutedELBO(layer_estimators="always")


def test_auto_routes_weights_of_conv_to_flipout_and_of_linear_to_local_reparam():
    x, y = _data()
    elbo = RoutedELBO()  # layer_estimators="auto" is the default
    elbo.loss(_both, _auto_guide, x, y)
    assert {n: r.estimator for n, r in elbo.routes.items()} == {"w": "pathwise", "v": "pathwise"}
    assert "so flipout from the next step" in elbo.routes["w"].reason
    assert "so local_reparam from the next step" in elbo.routes["v"].reason
    for _ in range(2):
        elbo.loss(_both, _auto_guide, x, y)
    w, v = elbo.routes["w"], elbo.routes["v"]
    assert (w.estimator, w.layers) == ("flipout", "flipout in conv2d")
    assert (v.estimator, v.layers) == ("local_reparam", "local_reparam in linear")
    assert "weight used only by one conv2d call" in w.reason and not w.forced


def test_a_normal_site_that_is_no_weight_keeps_its_pathwise_route():
    x, y = _data()

    def model(x, y):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([6, 1, 5, 5]).to_event(4))
        h = F.conv2d(z, torch.ones(2, 1, 3, 3), padding=1).mean((-1, -2))
        with pyro.plate("data", 6):
            pyro.sample("y", dist.Normal(h, 1.0).to_event(1), obs=y)

    def guide(x, y):
        pyro.sample("z", dist.Normal(param("m", torch.zeros(6, 1, 5, 5)), 1.0).to_event(4))

    elbo = RoutedELBO(layer_estimators="auto")
    for _ in range(2):
        elbo.loss(model, guide, x, y)
        assert elbo.routes["z"].estimator == "pathwise" and elbo.routes["z"].layers is None


def test_an_automatic_weight_used_otherwise_goes_back_to_pathwise():
    x, y = _data()
    then, step = _from_step(3, lambda w: w.mean())
    model, guide = _conv_model_then(then), _unrouted_guide
    elbo = RoutedELBO(layer_estimators="auto")
    for _ in range(2):
        elbo.loss(model, guide, x, y)
    assert elbo.routes["w"].estimator == "flipout"
    elbo.loss(model, guide, x, y)
    route = elbo.routes["w"]
    assert route.estimator == "pathwise" and step[0] == 4
    assert (
        route.layers == "not a layer estimator: plain weight draw: its value is used by mean "
        "(besides as a layer's weight)"
    )


def test_autonormal_weights_are_routed_with_auto_layer_estimators():
    torch.manual_seed(0)
    x, _ = _data()
    y = torch.randint(0, 3, (6,))
    model = BayesianCNN()
    elbo = RoutedELBO(layer_estimators="auto")
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(3):
        svi.step(x, y)
    assert elbo.routes["conv.weight_unconstrained"].layers == "flipout in conv2d"
    assert elbo.routes["fc.weight_unconstrained"].layers == "local_reparam in linear"
    assert elbo.routes["fc.bias_unconstrained"].estimator == "pathwise"  # the call's bias


def _attention(h):
    flat = h.flatten(1)
    return (torch.softmax(flat @ flat.T, -1) @ flat).reshape(h.shape)


@pytest.mark.parametrize(
    "mix,why",
    [
        (lambda h: h.mean(0, keepdim=True) + h * 0, "depends on 6 examples"),
        (lambda h: h - h.mean(0), "depends on 6 examples"),
        (lambda h: F.batch_norm(h, None, None, training=True), "batch_norm"),
        (lambda h: h.cumsum(0), "depends on 6 examples"),
        (lambda h: h.sort(0).values, "depends on 6 examples"),
        (_attention, "depends on 6 examples"),
        (lambda h: F.softmax(h, dim=0), "depends on 6 examples"),
        (lambda h: h.roll(1, 0) + h, "depends on 6 examples"),
        (lambda h: h * float(h.sum()), "leaves the tensor graph"),
        (lambda h: h[h[:, 0, 0, 0].argsort()], "an index computed from the map"),
        (lambda h: torch.einsum("nchw->nchw", h), "not on the allowlist"),
    ],
    ids=["mean", "centre", "batch_norm", "cumsum", "sort", "attention",
         "softmax_dim0", "roll", "item", "index", "unknown_op"],  # fmt: skip
)
def test_a_layer_whose_examples_mix_before_the_likelihood_keeps_the_plain_draw(mix, why):
    """A weight drawn per example is unbiased only where each example reaches the terms
    alone; whatever mixes examples (or cannot be followed) keeps the plain draw, and says so
    in the route, by default and on request alike."""
    x, y = _data()
    model = _conv_model_then(lambda w, h: mix(h.reshape(6, 2, 1, 1)).reshape(6, 2))
    for guide in (_unrouted_guide, guide_for("w", CONV, "flipout")):
        pyro.clear_param_store()
        elbo = RoutedELBO()
        for _ in range(3):
            elbo.loss(model, guide, x, y)
        route = elbo.routes["w"]
        assert route.layers is not None and "plain weight draw" in route.layers, route.layers
        assert why in route.layers, route.layers
    assert route.estimator == "flipout"  # requested, but its layer kept plain


def test_arguments_of_a_new_fingerprint_check_the_examples_again():
    """The proof holds for the code path it ran: a step with new arguments follows the
    examples of the rewritten layer again, and recomputes the step with the plain draw
    where they mix."""
    x, y = _data()
    calls = []

    def then(w, h):
        calls.append(None)
        return h - h.mean(0) if mix[0] else h

    model, guide, mix = _conv_model_then(then), _unrouted_guide, [False]
    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss(model, guide, x, y)
    assert elbo.routes["w"].layers == "flipout in conv2d"
    elbo.loss(model, guide, x[:5], y[:5])  # new shapes, same code path: still flipout
    assert elbo.routes["w"].layers == "flipout in conv2d" and len(calls) == 3
    mix[0] = True
    elbo.loss(model, guide, x[:4], y[:4])  # new shapes, examples mixed: recomputed plain
    route = elbo.routes["w"]
    assert len(calls) == 5 and route.estimator == "pathwise"
    assert "depends on 4 examples" in route.layers


def test_dependency_tracking_always_checks_the_examples_on_every_step():
    """Python state the arguments do not show (a global switch) can make the examples mix
    on a later step with the same arguments: ``dependency_tracking="always"`` checks them
    on every step, as it finds dependencies on every step."""
    x, y = _data()
    mix = [False]
    model = _conv_model_then(lambda w, h: h - h.mean(0) if mix[0] else h)
    elbo = RoutedELBO(dependency_tracking="always")
    for _ in range(2):
        elbo.loss(model, _unrouted_guide, x, y)
    assert elbo.routes["w"].layers == "flipout in conv2d"
    mix[0] = True
    elbo.loss(model, _unrouted_guide, x, y)  # same arguments, examples mixed: plain
    route = elbo.routes["w"]
    assert route.estimator == "pathwise" and "depends on 6 examples" in route.layers


@pytest.mark.parametrize("tracking", ["cached", "order"])
def test_a_weight_another_guide_site_depends_on_keeps_the_plain_draw(tracking):
    """A guide site computed from the weight's draw sees the shared draw, the model's layer
    per-example ones: their joint law would not be the guide's."""
    x, y = _data()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand(CONV).to_event(4))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        h = torch.tanh(F.conv2d(x, w, padding=1)).mean((-1, -2)) + z
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(h, 0.5).to_event(1), obs=y)

    def guide(x, y, coupled):
        w = pyro.sample("w", dist.Normal(param("m", torch.zeros(CONV)), 0.5).to_event(4))
        pyro.sample("z", dist.Normal(w.sum() if coupled else 0.0, 1.0))

    for coupled in (True, False):
        elbo = RoutedELBO(dependency_tracking=tracking)
        for _ in range(3):
            elbo.loss(lambda x, y, _: model(x, y), guide, x, y, coupled)
        route = elbo.routes["w"]
        if coupled or tracking == "order":  # "order": the guide's dependents are unknown
            assert route.estimator == "pathwise" and "in the guide" in route.layers or (
                "by guide site 'z'" in route.layers), route.layers
        else:
            assert route.layers == "flipout in conv2d"


def test_examples_that_stay_apart_get_the_layer_estimators_by_default():
    """A permutation of the batch and per-example reductions keep each term on one example;
    ``pyro.deterministic`` (a masked Delta) adds no term."""
    x, y = _data()
    model = _conv_model_then(
        lambda w, h: pyro.deterministic("h", h).flip(0).flip(0) * h.softmax(-1)
        + F.layer_norm(h, h.shape[1:])
    )
    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss(model, _unrouted_guide, x, y)
    assert elbo.routes["w"].layers == "flipout in conv2d"


class _PixelCNN(PyroModule):
    """A CNN whose likelihood is a Normal per example and pixel (an image-to-image map)."""

    def __init__(self):
        super().__init__()
        self.conv = PyroModule[torch.nn.Conv2d](1, 2, 3, padding=1)
        self.conv.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 1, 3, 3]).to_event(4))
        self.out = PyroModule[torch.nn.Conv2d](2, 1, 1)
        self.out.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2, 1, 1]).to_event(4))

    def forward(self, x, y=None):
        mean = self.out(torch.relu(self.conv(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, 0.1).to_event(3), obs=y)


@pytest.mark.parametrize("net", ["classifier", "pixels"])
def test_a_cnn_gets_flipout_and_local_reparam_by_default(net):
    torch.manual_seed(0)
    x, _ = _data()
    model, y = (BayesianCNN(), torch.randint(0, 3, (6,))) if net == "classifier" else (
        _PixelCNN(), torch.randn(6, 1, 5, 5))  # fmt: skip
    elbo = RoutedELBO()
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))
    found = {n: r.layers for n, r in elbo.routes.items() if r.layers}
    if net == "classifier":
        assert found == {"conv.weight_unconstrained": "flipout in conv2d",
                         "fc.weight_unconstrained": "local_reparam in linear"}  # fmt: skip
    else:
        assert found == {"conv.weight_unconstrained": "flipout in conv2d",
                         "out.weight_unconstrained": "flipout in conv2d"}  # fmt: skip


def test_the_bayesian_cnn_example_runs(capsys):
    import runpy

    path = Path(__file__).resolve().parents[1] / "examples" / "bayesian_cnn.py"
    found = runpy.run_path(str(path))["main"](steps=3, num_samples=4)
    assert found["routes"]["conv2.weight_unconstrained"].estimator == "flipout"
    assert found["routes"]["fc.weight_unconstrained"].estimator == "local_reparam"
    assert 0 <= found["ece"] <= 1 and "posterior_predictive" in found["data"].groups()
    assert "expected calibration error" in capsys.readouterr().out


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no fashion-mnist package"
)
def test_the_bayesian_cnn_example_runs_on_fashion_mnist(capsys):
    import runpy

    path = Path(__file__).resolve().parents[1] / "examples" / "bayesian_cnn.py"
    found = runpy.run_path(str(path))["main"](steps=2, num_samples=2, fashion_mnist=True)
    assert found["routes"]["conv1.weight_unconstrained"].estimator == "flipout"
    assert found["data"].posterior["conv1.weight"].sizes["draw"] == 2
    assert "1000 images" in capsys.readouterr().out


def _on_device(device: str, estimator: str) -> None:
    x, y = (t.to(device) for t in _data())

    def model(x, y):
        prior = dist.Normal(torch.zeros(CONV, device=device), 1.0).to_event(4)
        w = pyro.sample("w", prior)
        h = torch.tanh(F.conv2d(x, w, padding=1)).mean((-1, -2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(h, 0.5).to_event(1), obs=y)

    def guide(x, y):
        loc = pyro.param("loc", lambda: torch.zeros(CONV, device=device))
        pyro.sample("w", dist.Normal(loc, 0.5).to_event(4), infer={"estimator": estimator})

    elbo = RoutedELBO()
    for _ in range(2):
        assert math.isfinite(elbo.loss_and_grads(model, guide, x, y))
    assert elbo.routes["w"].layers == f"{estimator} in conv2d"
    grad = pyro.param("loc").unconstrained().grad
    assert grad.device.type == device and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("estimator", ["flipout", "local_reparam"])
def test_on_cpu_tensors_made_there(estimator):
    _on_device("cpu", estimator)


@pytest.mark.cuda
@pytest.mark.parametrize("estimator", ["flipout", "local_reparam"])
def test_on_cuda(estimator):
    _on_device("cuda", estimator)
