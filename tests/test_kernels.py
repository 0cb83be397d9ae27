"""Each fast kernel equals its plain reference (pyro_reparam_conv.kernels): log-densities
and score parts on the same traces, KL terms, and whole ELBO steps (values and gradients)."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.enum import get_importance_trace

from pyro_reparam_conv import RoutedELBO, sample_elementwise_normal
from pyro_reparam_conv.kernels import (
    FAST,
    REFERENCE,
    analytic_kl,
    fast_log_densities,
    reference_kl,
    reference_log_densities,
)


def conv_model(y, conv):
    pyro.module("conv", conv)
    with pyro.plate("batch", y.shape[0], dim=-1):
        z = pyro.sample(
            "z", dist.Normal(torch.zeros(()), 1.0).expand([y.shape[0], 3, 5, 5]).to_event(3)
        )
        pyro.sample("y", dist.Normal(conv(z), 0.7).to_event(3), obs=y)


def conv_guide(y, conv):
    mean = pyro.param("mean", 0.1 * torch.arange(2 * 75.0).reshape(2, 3, 5, 5).sin())
    raw_var = pyro.param("raw_var", torch.full((2, 3, 5, 5), -1.0))
    with pyro.plate("batch", y.shape[0], dim=-1):
        sample_elementwise_normal("z", mean, raw_var, "softplus")


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 5, 5), torch.nn.Conv2d(3, 4, 3, padding=1)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("skip", [frozenset(), frozenset({"z"})])
def test_fast_log_densities_equal_pyro_get_importance_trace(validate, skip):
    args = _inputs()
    with pyro.validation_enabled(validate):
        pyro.set_rng_seed(1)
        expected_model, expected_guide = get_importance_trace(
            "flat", 1, conv_model, conv_guide, args, {}
        )
        pyro.set_rng_seed(1)
        guide_trace = poutine.trace(conv_guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(conv_model, guide_trace)).get_trace(*args)
        fast_log_densities(model_trace, guide_trace, skip, 1)
    for got, expected in ((model_trace, expected_model), (guide_trace, expected_guide)):
        for name, site in expected.nodes.items():
            if site["type"] != "sample":
                continue
            if name in skip:
                assert "log_prob" not in got.nodes[name]
                continue
            torch.testing.assert_close(got.nodes[name]["log_prob"], site["log_prob"])
            torch.testing.assert_close(got.nodes[name]["log_prob_sum"], site["log_prob_sum"])
    for got, expected in zip(
        guide_trace.nodes["z"].get("score_parts", ()), expected_guide.nodes["z"]["score_parts"]
    ):
        torch.testing.assert_close(got, expected)


def test_reference_log_densities_are_get_importance_trace():
    args = _inputs()
    pyro.set_rng_seed(2)
    expected_model, _ = get_importance_trace("flat", 1, conv_model, conv_guide, args, {})
    pyro.set_rng_seed(2)
    guide_trace = poutine.trace(conv_guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(conv_model, guide_trace)).get_trace(*args)
    reference_log_densities(model_trace, guide_trace, frozenset({"z"}), 1)
    for name in ("z", "y"):
        torch.testing.assert_close(
            model_trace.nodes[name]["log_prob"], expected_model.nodes[name]["log_prob"]
        )


@pytest.mark.parametrize(
    "q, p",
    [
        (dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5).to_event(1),
         dist.Normal(0.0, 1.0).expand([3, 4]).to_event(1)),
        (dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5),
         dist.Normal(torch.randn(4), torch.rand(4) + 0.5)),
        (dist.Gamma(torch.rand(3) + 1, 2.0), dist.Gamma(2.0, torch.rand(3) + 1)),
    ],
)  # fmt: skip
def test_analytic_kl_equals_kl_divergence(q, p):
    torch.testing.assert_close(analytic_kl(q, p), reference_kl(q, p))
    assert analytic_kl(q, p).shape == q.batch_shape


class ReferenceELBO(RoutedELBO):
    kernels = REFERENCE


@pytest.mark.parametrize("validate", [True, False])
def test_an_elbo_step_with_fast_kernels_equals_the_reference_kernels(validate):
    y, conv = _inputs()
    results = []
    with pyro.validation_enabled(validate):
        for elbo in (RoutedELBO(), ReferenceELBO()):
            assert elbo.kernels is (FAST if type(elbo) is RoutedELBO else REFERENCE)
            pyro.clear_param_store()
            steps = []
            for seed in (3, 4):  # the tracked first step and a cached one
                pyro.set_rng_seed(seed)
                loss = elbo.differentiable_loss(conv_model, conv_guide, y, conv)
                params = [pyro.param("mean"), pyro.param("raw_var").unconstrained(), conv.weight]
                steps.append((loss.detach(), torch.autograd.grad(loss, params)))
            assert elbo.routes["z"].analytic_kl
            results.append(steps)
    for (l1, g1), (l2, g2) in zip(*results):
        torch.testing.assert_close(l1, l2)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
