"""Bias of RoutedELBO's default variance reductions on adversarial models, in standard errors.

Each row is a model where a heuristic dependency or footprint would be wrong (issue 18):
control flow on a latent's value, in-place writes, a pool with ``ceil_mode``, a step, a
learnable gate, an argument that moves the pixels, leave-one-out with vectorized particles.
The reference is exact (the support summed; the closed form of a linear-Gaussian decoder
through its Jacobian) or a many-draw estimate with site-level costs (which assumes no
footprint). ``z`` is the largest ``|mean - reference| / standard error`` over the
parameters' elements; at the default 1000 draws, values above about 4.5 are bias.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soundness.py [--draws N]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from pyro_reparam_conv import RoutedELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_soundness import (  # noqa: E402  the adversarial models and exact gradients
    B, C, H, W, exact_linear_gradients, exact_poisson_gradient, poisson_guide, poisson_model,
)
from test_soundness import linear_gaussian_model as map_model  # noqa: E402
from test_soundness import score_guide as map_guide  # noqa: E402


def poisson_case(draws):
    x = torch.tensor(4.0)
    exact = exact_poisson_gradient(x)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    elbo = RoutedELBO()
    grads = []
    for _ in range(draws):
        loss = elbo.differentiable_loss(poisson_model, poisson_guide, x)
        grads.append(torch.autograd.grad(loss, [pyro.param("log_rate").unconstrained()])[0])
    grads = torch.stack(grads)
    return _z(grads.mean(0), grads.std(0) / math.sqrt(draws), torch.tensor(exact), 0.0)


def _row(case, *args) -> str:
    """A case's z as text, or the error it raised (a crash is a finding too)."""
    try:
        return f"{case(*args):.1f}"
    except Exception as error:  # noqa: BLE001
        return f"crash: {type(error).__name__}"


def _z(mean, se, ref, ref_se):
    return float(((mean - ref).abs() / (se**2 + ref_se**2).sqrt().clamp_min(1e-12)).max())


def draws_of(model, guide, x, n, seed, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo = RoutedELBO(**kwargs)
    grads = []
    for _ in range(n):
        loss = elbo.differentiable_loss(model, guide, x)
        g = torch.autograd.grad(loss, [pyro.param("m"), pyro.param("log_s")])
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(n)


def exact_linear(decoder, x, *extra):
    pyro.clear_param_store()
    return torch.cat([g.reshape(-1) for g in exact_linear_gradients(decoder, x, *extra)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.draws
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, 1, 3, padding=1)

    def shift(z):
        buf = torch.zeros_like(z)
        buf[:, :, 3:] = z[..., :-3, :]
        return conv(buf)

    def copied(z):
        buf = torch.empty(z.shape)
        buf.copy_(z.flip(-1))
        return conv(buf)

    def folded(z):
        return conv(z.reshape(-1, C, H, W)).reshape(z.shape[:-3] + (1, H, W))

    gate = torch.full((1, 1, 1, 1), -1.0)
    linear = {
        "in-place write into a buffer": (shift, {}),
        "copy_ into a buffer": (copied, {}),
        "leave-one-out, 4 vectorized particles": (
            folded, {"num_particles": 4, "vectorize_particles": True, "max_plate_nesting": 1}),
    }  # fmt: skip
    nonlinear = {
        "max_pool2d(3, 2, ceil_mode=True)": lambda z: F.interpolate(
            F.max_pool2d(conv(z), 3, 2, ceil_mode=True), size=(H, W), mode="nearest"),
        "a step 1[conv(z) > 0]": lambda z: (conv(z) > 0).float(),
        "a gate clamp(-g, min=0)": lambda z: conv(z) * torch.clamp(-gate, min=0),
    }  # fmt: skip
    x = torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(2))
    rows = []
    start = time.perf_counter()
    rows.append(("control flow on n.item() (Poisson, score)", _row(poisson_case, n)))
    for name, (decoder, kwargs) in linear.items():

        def linear_case(decoder=decoder, kwargs=kwargs):
            mean, se = draws_of(map_model(decoder), map_guide, x, n, 3, **kwargs)
            return _z(mean, se, exact_linear(decoder, x), 0.0)

        rows.append((name, _row(linear_case)))
    site = lambda x, *e: map_guide(x, *e, rao_blackwell="site")  # noqa: E731
    for name, decoder in nonlinear.items():

        def nonlinear_case(decoder=decoder):
            mean, se = draws_of(map_model(decoder), map_guide, x, n, 6)
            ref, ref_se = draws_of(map_model(decoder), site, x, 3 * n, 7)
            return _z(mean, se, ref, ref_se)

        rows.append((name + " (ref: site-level, 3x draws)", _row(nonlinear_case)))
    flip_decoder = lambda z, flip: conv(z.flip(-1) if flip else z)  # noqa: E731

    def flip_case():  # flipped steps after an unflipped one (what a cache by sites reuses)
        pyro.clear_param_store()
        pyro.set_rng_seed(4)
        elbo = RoutedELBO()
        elbo.loss(map_model(flip_decoder), map_guide, x, False)
        grads = []
        for _ in range(n):
            loss = elbo.differentiable_loss(map_model(flip_decoder), map_guide, x, True)
            g = torch.autograd.grad(loss, [pyro.param("m"), pyro.param("log_s")])
            grads.append(torch.cat([t.reshape(-1) for t in g]))
        grads = torch.stack(grads)
        exact = exact_linear(flip_decoder, x, True)
        return _z(grads.mean(0), grads.std(0) / math.sqrt(n), exact, 0.0)

    rows.append(("a flip argument after an unflipped step", _row(flip_case)))
    print(f"{'case':<58} {'z (s.e.)':>9}")
    for name, z in rows:
        print(f"{name:<58} {z:>9}")
    print(f"{n} draws per estimate, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
