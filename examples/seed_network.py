"""Do gradients reach mean, var and the layers before them when z = mean + sqrt(var) * eps?

The question as first asked: a network gets two (batch, channels, H, W) tensors, the means
and variances of elementwise normals, samples z and convolves it. Yes: the sample is
reparameterized (pathwise), so d conv(z) / d mean and / d var exist; only eps gets none.
This script shows the gradient norms, the clear error for a negative variance built with
torch.randn, and the fix (the softplus parameterization).

Run:  python examples/seed_network.py [--size 64]
"""

import argparse

import torch
from torch import nn

from pyro_reparam_conv import StochasticConv2d


def main(size: int = 64, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x = torch.randn(1, 3, size, size)
    upstream = nn.Conv2d(3, 32, 3, padding=1)  # produces 16 mean + 16 variance channels
    layer = StochasticConv2d(16, 32, 3, padding=1, name="z", parameterization="softplus")

    h = upstream(x)
    x_mean, x_var_raw = h[:, :16], h[:, 16:]
    x_mean.retain_grad()
    x_var_raw.retain_grad()
    out = layer(x_mean, x_var_raw)
    out.pow(2).mean().backward()

    print("Gradient norms after one backward pass through the sampled z:")
    for name, g in [
        ("x_mean", x_mean.grad),
        ("x_var (raw, softplus)", x_var_raw.grad),
        ("upstream conv weight", upstream.weight.grad),
        ("stochastic conv weight", layer.conv.weight.grad),
    ]:
        print(f"  {name:24s} {g.norm().item():.4g}   finite: {bool(torch.isfinite(g).all())}")

    print("\nThe original snippet: variances from torch.randn (half of them negative)")
    bad_var = torch.randn(1, 16, size, size)
    try:
        StochasticConv2d(16, 32, 3, padding=1, name="z")(torch.randn(1, 16, size, size), bad_var)
    except ValueError as err:
        print(f"  ValueError: {err}")

    print("\nThe fix: treat that tensor as unconstrained (parameterization='softplus')")
    fixed = StochasticConv2d(16, 32, 3, padding=1, name="z", parameterization="softplus")
    y = fixed(torch.randn(1, 16, size, size), bad_var)
    print(f"  output NaN fraction: {torch.isnan(y).float().mean().item():.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.size, args.seed)
