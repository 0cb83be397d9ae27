"""BernoulliVAE: the protocol's sizes, plain Pyro (Pyro's own ELBOs train it), values side by
side, and its importance-weighted bound against brute force on a tiny instance."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.models import BernoulliVAE

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=6, pixels=784, seed=0):
    return torch.bernoulli(torch.rand(n, pixels, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("arch, sizes", [("linear", [(200, 784)]),
                                         ("nonlinear", [(200, 784), (200, 200), (200, 200)])])
def test_the_protocol_sizes(arch, sizes):
    vae = BernoulliVAE(arch)
    weights = [m.weight.shape for m in vae.encoder if isinstance(m, torch.nn.Linear)]
    assert sorted(weights) == sorted(sizes)
    assert vae.prior_logits.shape == (200,)
    if arch == "nonlinear":
        assert isinstance(vae.encoder[1], torch.nn.LeakyReLU)
        assert vae.encoder[1].negative_slope == 0.3
    with pytest.raises(ValueError, match="arch must be one of"):
        BernoulliVAE("conv")


@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceGraph_ELBO(), RoutedELBO()])
def test_pyro_and_routed_elbos_train_it_unchanged(elbo):
    pyro.set_rng_seed(0)
    vae = BernoulliVAE("nonlinear", num_latents=8, hidden=16)
    x = batch()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(x) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("infer, estimator", [({}, "disarm"), ({"evaluations": 4}, "arms"),
                                              ({"estimator": "double_cv", "evaluations": 3},
                                               "double_cv"),
                                              ({"estimator": "rodeo", "evaluations": 3},
                                               "rodeo")])  # fmt: skip
def test_routes_and_values_side_by_side(infer, estimator):
    vae = BernoulliVAE(num_latents=8, b_infer=infer)
    elbo = RoutedELBO()
    (table,) = elbo.site_terms(vae.model, vae.guide, batch())
    assert elbo.routes["b"].estimator == estimator
    k = infer.get("evaluations", 2)
    assert table.guide_trace.nodes["b"]["value"].shape == (k, 6, 8)
    assert table.model_trace.nodes["x"]["log_prob"].shape == (k, 6)


def test_the_bound_against_brute_force():
    """3 latents and 4 pixels: log p(x) by summing over the 8 latent values; the 1-sample
    bound's mean is the ELBO (below), the K-sample bound rises towards log p(x)."""
    torch.manual_seed(1)
    vae = BernoulliVAE(num_latents=3, num_pixels=4)
    x = batch(2, 4)
    with torch.no_grad():
        prior = dist.Bernoulli(logits=vae.prior_logits).to_event(1)
        values = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
        lik = dist.Bernoulli(logits=vae.decoder(values[:, None])).to_event(1)
        log_px = torch.logsumexp(prior.log_prob(values)[:, None] + lik.log_prob(x), 0)
    one = vae.bound(x.expand(4000, 2, 4).reshape(-1, 4), 1).reshape(4000, 2)
    many = vae.bound(x, 20000)
    assert bool((one.mean(0) < log_px).all())
    assert torch.allclose(many, log_px, atol=0.01), (many, log_px)
