"""Exact ELBOs for tests: brute-force enumeration of discrete guide sites, and a Gaussian
model in closed form. Gradient estimators are checked against autograd of these."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch


def binary_tensors(shape) -> list[torch.Tensor]:
    """Every 0/1 tensor of ``shape``."""
    n = math.prod(shape)
    return [
        torch.tensor(bits, dtype=torch.float).reshape(shape)
        for bits in itertools.product([0.0, 1.0], repeat=n)
    ]


def exact_elbo(model, guide, site_values: dict, *args, **kwargs) -> torch.Tensor:
    """``sum_z q(z) (log p(x, z) - log q(z))`` over every joint value of the listed sites."""
    names = list(site_values)
    total = 0.0
    for combo in itertools.product(*site_values.values()):
        cond = dict(zip(names, combo))
        guide_trace = poutine.trace(poutine.condition(guide, cond)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.condition(model, cond)).get_trace(*args, **kwargs)
        log_q = guide_trace.log_prob_sum()
        total = total + log_q.exp() * (model_trace.log_prob_sum() - log_q)
    return total


def draw_gradients(elbo, model, guide, params: dict, num_draws: int, *args, **kwargs):
    """``num_draws`` independent gradient estimates of the loss (-ELBO) per param: (draws, ...)."""
    draws = {k: [] for k in params}
    for _ in range(num_draws):
        for p in params.values():
            p.grad = None
        elbo.loss_and_grads(model, guide, *args, **kwargs)
        for k, p in params.items():
            draws[k].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    return {k: torch.stack(v) for k, v in draws.items()}


def assert_unbiased(draws: dict, exact: dict, z_max: float = 4.5) -> None:
    """Each element's Monte Carlo mean is within ``z_max`` standard errors of the exact value."""
    for k, d in draws.items():
        d = d.double()
        n = d.shape[0]
        mean = d.mean(0)
        stderr = d.std(0) / math.sqrt(n)
        err = (mean - exact[k].double()).abs()
        ok = (err <= z_max * stderr) | (err < 1e-10)
        assert bool(ok.all()), (
            f"{k}: MC mean {mean.tolist()} vs exact {exact[k].tolist()}, "
            f"z-scores {(err / stderr).tolist()}"
        )


def gaussian_elbo(m: torch.Tensor, log_s: torch.Tensor, x: float) -> torch.Tensor:
    """ELBO of z ~ N(0,1), x ~ N(z,1) with q(z) = N(m, s^2), in closed form."""
    s2 = (2 * log_s).exp()
    log2pi = math.log(2 * math.pi)
    expected_lik = -0.5 * log2pi - 0.5 * ((x - m) ** 2 + s2)
    expected_prior = -0.5 * log2pi - 0.5 * (m**2 + s2)
    entropy = 0.5 * (log2pi + 1) + log_s
    return expected_lik + expected_prior + entropy


def param(name: str, value) -> torch.Tensor:
    """An unconstrained Pyro param whose store value is the leaf itself."""
    return pyro.param(name, lambda: torch.as_tensor(value, dtype=torch.float).clone())


# z ~ N(0, 1), x ~ N(z, 1); q(z) = N(m, exp(log_s)^2): its ELBO is gaussian_elbo(m, log_s, x).
def gaussian_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gaussian_guide(x):
    m = param("m", 0.4)
    log_s = param("log_s", -0.3)
    pyro.sample("z", dist.Normal(m, log_s.exp()))


def gaussian_params_and_exact_gradients(x):
    """The params of gaussian_guide (created if missing) and the exact gradient of -ELBO."""
    gaussian_guide(x)
    params = dict(pyro.get_param_store().named_parameters())
    loss = -gaussian_elbo(params["m"], params["log_s"], x)
    return params, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
