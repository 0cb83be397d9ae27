"""The Bernoulli toy of ``discrete_estimators.py`` with storchastic's estimators.

Run in its own process by ``discrete_estimators.py``: importing ``storch`` monkey-patches
torch (``torch.is_tensor``, ``Tensor.to``, distribution validation off), which must not
touch the Pyro runs. Prints one JSON object: per method, the gradient draws' mean and
variance per dim and the seconds per estimate. The toy is storchastic's own
``examples/bernoulli_toy.py``: ``b ~ Bernoulli(logits=eta)``, ``eta = 0``, four dims,
cost ``sum_i (b_i - t_i)^2``, ``t = (0.49, 0.499, 0.501, 0.51)``.
"""

from __future__ import annotations

import json
import sys
import time

import torch

try:
    import storch
    from storch.method import ARM, DisARM, Expect, GumbelSoftmax, ScoreFunction
except ImportError as e:  # reported by the caller
    print(json.dumps({"error": f"storchastic is not installed ({e})"}))
    sys.exit(0)

T = torch.tensor([0.49, 0.499, 0.501, 0.51])


def gradient(method) -> torch.Tensor:
    eta = torch.zeros(4, requires_grad=True)
    b = method(torch.distributions.Bernoulli(logits=eta))
    storch.add_cost(((b * 1.0 - T) ** 2).sum(-1), "cost")  # DisARM samples booleans
    storch.backward()
    return eta.grad.detach().clone()


def main(draws: int, seed: int) -> None:
    methods = {
        # two model evaluations per estimate for the sampled ones, as the Pyro rows
        "storch ScoreFunction(2, batch_average)": lambda: ScoreFunction(
            "b", n_samples=2, baseline_factory="batch_average"
        ),
        "storch DisARM": lambda: DisARM("b"),
        "storch ARM": lambda: ARM("b"),
        "storch GumbelSoftmax(2, straight-through)": lambda: GumbelSoftmax(
            "b", n_samples=2, straight_through=True
        ),
        "storch Expect (16 evaluations)": lambda: Expect("b"),
    }
    results = {}
    for name, make in methods.items():
        torch.manual_seed(seed)
        method = make()
        start = time.perf_counter()
        grads = torch.stack([gradient(method) for _ in range(draws)])
        seconds = (time.perf_counter() - start) / draws
        results[name] = {
            "mean": grads.mean(0).tolist(),
            "var": grads.var(0).tolist(),
            "seconds": seconds,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
