"""ConvClusterVAE: site structure, routes, gradient flow, minibatch scaling, input checks.

The checks are structural and exact (site types, routes, a scale equal to N / B, identical
log-densities), no Monte Carlo tolerances are involved.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.models import ConvClusterVAE

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_channels=8, latent_channels=2, num_classes=3)


def images(n=6, shape=(1, 8, 8), seed=0, dtype=torch.float32):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def traces(vae, x, **kwargs):
    guide_trace = poutine.trace(vae.guide).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, **kwargs)
    return guide_trace, model_trace


def test_guide_and_model_sites():
    torch.manual_seed(0)
    vae = ConvClusterVAE(**SMALL)
    x = images()
    guide_trace, model_trace = traces(vae, x)
    y, z = guide_trace.nodes["y"], guide_trace.nodes["z"]

    def base(fn):
        return fn.base_dist if isinstance(fn, dist.Independent) else fn

    assert isinstance(y["fn"], dist.Categorical) and not y["fn"].has_rsample
    assert y["value"].shape == (6,) and y["fn"].event_shape == ()
    assert z["fn"].has_rsample and isinstance(base(z["fn"]), dist.Normal)
    assert z["value"].shape == (6, 2, 4, 4) and z["fn"].event_shape == (2, 4, 4)
    assert model_trace.nodes["x"]["is_observed"]
    assert isinstance(base(model_trace.nodes["x"]["fn"]), dist.ContinuousBernoulli)
    for trace in (guide_trace, model_trace):
        for name in ("y", "z"):
            assert [f.name for f in trace.nodes[name]["cond_indep_stack"]] == ["images"]


def test_routes_default_and_forced_score():
    torch.manual_seed(0)
    x = images()
    elbo = RoutedELBO()
    vae = ConvClusterVAE(**SMALL)
    elbo.loss(vae.model, vae.guide, x)
    # y: a support of 3 is summed exactly (the model broadcasts over the values side by side)
    assert {n: r.estimator for n, r in elbo.routes.items()} == {"y": "enumerate", "z": "pathwise"}

    pyro.clear_param_store()
    forced = ConvClusterVAE(**SMALL, z_infer={"estimator": "score"}, y_infer={"estimator": "score"})
    elbo.loss(forced.model, forced.guide, x)
    assert {n: r.estimator for n, r in elbo.routes.items()} == {"y": "score", "z": "score"}


@pytest.mark.parametrize("z_infer", [None, {"estimator": "score"}], ids=["z-pathwise", "z-score"])
def test_every_parameter_is_registered_and_gets_a_finite_nonzero_gradient(z_infer):
    """All of encoder, its head, decoder and class_maps reach the param store (what SVI
    optimizes) and receive a finite gradient that is not identically zero."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    vae = ConvClusterVAE(**SMALL, z_infer=z_infer)
    x = images()
    RoutedELBO().loss_and_grads(vae.model, vae.guide, x)
    store = pyro.get_param_store()
    names = set(store.keys())
    module_params = {n for n, _ in vae.named_parameters()}
    # every module parameter is in the store under its pyro name ("encoder$$$0.0.weight", ...)
    assert len(names) == len(module_params)
    for prefix in ("encoder", "z_head", "decoder", "class_maps"):
        group = [n for n in names if n.startswith(prefix)]
        assert group, prefix
        for name in group:
            grad = store.get_param(name).grad
            assert grad is not None, name
            assert torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, name


def test_minibatch_scaling_is_num_data_over_batch():
    torch.manual_seed(0)
    vae = ConvClusterVAE(**SMALL)
    x = images(4)
    full_g, full_m = traces(vae, x)
    pyro.set_rng_seed(0)
    g, m = traces(vae, x, num_data=100)
    for trace in (g, m):
        for name in ("y", "z", "x") if trace is m else ("y", "z"):
            assert trace.nodes[name]["scale"] == 25.0, name  # N / B = 100 / 4
    for trace in (full_g, full_m):
        assert trace.nodes["y"]["scale"] == 1.0
    # the scaled log-density sum is exactly 25 times the unscaled one on the same draws
    unscaled = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x)
    assert torch.allclose(m.log_prob_sum(), 25.0 * unscaled.log_prob_sum(), rtol=1e-5)
    # num_data equal to the batch is no subsampling
    g_eq, _ = traces(vae, x, num_data=4)
    assert g_eq.nodes["y"]["scale"] == 1.0


@pytest.mark.parametrize(
    "shape",
    [(4, 8, 8), (4, 1, 8, 6), (4, 3, 8, 8), (2, 4, 1, 8, 8)],
    ids=["no-channel", "width", "channels", "5d"],
)
def test_bad_image_shape_raises(shape):
    vae = ConvClusterVAE(**SMALL)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        vae.guide(torch.rand(shape))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        vae.model(torch.rand(shape))


def test_image_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match=r"9x8 must be divisible by 2\*\*num_downsamples = 2"):
        ConvClusterVAE((1, 9, 8))


def test_float64_end_to_end():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    vae = ConvClusterVAE(**SMALL).double()
    x = images(dtype=torch.float64)
    guide_trace, model_trace = traces(vae, x)
    assert guide_trace.nodes["z"]["value"].dtype == torch.float64
    assert model_trace.nodes["x"]["fn"].base_dist.logits.dtype == torch.float64
    loss = RoutedELBO().loss_and_grads(vae.model, vae.guide, x)
    assert isinstance(loss, float) and torch.isfinite(torch.tensor(loss))
    grad = pyro.get_param_store().get_param("class_maps").grad
    assert grad.dtype == torch.float64 and torch.isfinite(grad).all()
    assert vae.reconstruct(x).dtype == torch.float64


def test_reconstruct_is_a_mean_image_in_unit_interval():
    torch.manual_seed(0)
    vae = ConvClusterVAE(**SMALL)
    r = vae.reconstruct(images())
    assert r.shape == (6, 1, 8, 8) and ((r >= 0) & (r <= 1)).all()
