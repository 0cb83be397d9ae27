"""The network of ``bayesian_conv.py`` with TyXe's and bayesian-torch's estimators.

Run in its own environment by ``bayesian_conv.py --peers-python PYTHON`` (TyXe and
bayesian-torch installed there, from the package registry; torch and Pyro the same as
here): ``python _bayesian_conv_peers.py STATE.pt``. ``STATE.pt`` holds the trained point
(``mu``, ``rho`` per layer, the biases), the batch and the number of draws. Prints one JSON
object: per method, the total gradient variance per parameter (``conv1.mu``, ...) and the
median seconds per step, timed interleaved with ``RoutedELBO``'s plain and default routes
in this process.

- TyXe (``tyxe.poutine.flipout`` / ``local_reparameterization``) around Pyro's
  ``TraceMeanField_ELBO`` on the very model and guide of ``bayesian_conv.py`` (TyXe makes
  ``F.linear`` / ``F.conv*`` effectful and reads the guide's distribution of the weight).
- bayesian-torch: ``Conv2dFlipout`` / ``LinearFlipout`` and ``Conv2dReparameterization`` /
  ``LinearReparameterization`` (one weight draw per batch), the same ``mu`` and ``rho``
  (``sigma = softplus(rho)``, prior ``N(0, 1)``), weight-only (biases are the same point
  parameters), loss ``N / B * cross-entropy sum + KL``: the same objective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import median, time_interleaved  # noqa: E402
from bayesian_conv import CONFIGS, N_TOTAL, SHAPES, guide, model  # noqa: E402

from pyro_reparam_conv import RoutedELBO  # noqa: E402

try:
    import tyxe
    from bayesian_torch.layers import (
        Conv2dFlipout,
        Conv2dReparameterization,
        LinearFlipout,
        LinearReparameterization,
    )
except ImportError as e:  # reported by the caller
    print(json.dumps({"error": f"a peer is not installed ({e})"}))
    sys.exit(0)


def _load_params(state) -> dict:
    pyro.clear_param_store()
    store = pyro.get_param_store()
    for name, value in state["params"].items():
        store[name] = value.clone()
    return {
        k: store[k].unconstrained() for k in state["params"] if k.split(".")[-1] in ("mu", "rho")
    }


def tyxe_step(handler, x, y):
    elbo = pyro.infer.TraceMeanField_ELBO()

    def step():
        # validation off: TyXe's local reparameterization draws Normal(loc, 0) at padded
        # pixels (zero input), which Pyro's validation refuses
        with handler(), pyro.validation_enabled(False):
            return elbo.loss_and_grads(model, guide, x, y)

    return step


def routed_step(config, x, y):
    elbo = RoutedELBO()
    for _ in range(2):
        elbo.loss(model, guide, x, y, config)
    return lambda: elbo.loss_and_grads(model, guide, x, y, config)


class TorchNet(torch.nn.Module):
    def __init__(self, conv, linear, state):
        super().__init__()
        kw = {"prior_mean": 0.0, "prior_variance": 1.0, "bias": False}
        self.conv1 = conv(1, 8, 3, padding=1, **kw)
        self.conv2 = conv(8, 16, 3, padding=1, **kw)
        self.fc = linear(16, 10, **kw)
        p = state["params"]
        with torch.no_grad():
            for name in ("conv1", "conv2"):
                getattr(self, name).mu_kernel.copy_(p[f"{name}.mu"])
                getattr(self, name).rho_kernel.copy_(p[f"{name}.rho"])
            self.fc.mu_weight.copy_(p["fc.mu"])
            self.fc.rho_weight.copy_(p["fc.rho"])
        self.b = {k: p[k].clone() for k in ("b1", "b2", "bf")}

    def params(self) -> dict:
        names = {"conv1": ("mu_kernel", "rho_kernel"), "conv2": ("mu_kernel", "rho_kernel"),
                 "fc": ("mu_weight", "rho_weight")}  # fmt: skip
        return {f"{layer}.{p}": getattr(getattr(self, layer), attr)
                for layer, attrs in names.items() for p, attr in zip(("mu", "rho"), attrs)}  # fmt: skip

    def loss(self, x, y):
        h, kl1 = self.conv1(x)
        h = F.max_pool2d(F.relu(h + self.b["b1"][:, None, None]), 2)
        h, kl2 = self.conv2(h)
        h = F.relu(h + self.b["b2"][:, None, None]).mean((-1, -2))
        logits, kl3 = self.fc(h)
        nll = F.cross_entropy(logits + self.b["bf"], y, reduction="sum")
        return N_TOTAL / x.shape[0] * nll + kl1 + kl2 + kl3


def torch_step(net, x, y):
    def step():
        loss = net.loss(x, y)
        loss.backward()
        return loss.item()

    return step


def variances(step, params: dict, draws: int) -> dict:
    out = {k: [] for k in params}
    for _ in range(draws):
        for p in params.values():
            p.grad = None
        step()
        for k, p in params.items():
            out[k].append(p.grad.detach().clone())
    # NaN where a method's gradient is not finite
    return {k: torch.stack(v).var(0).sum().item() for k, v in out.items()}


def main(path: str) -> None:
    torch.set_num_threads(1)
    state = torch.load(path)
    x, y, draws = state["x"], state["y"], state["draws"]
    torch.manual_seed(state["seed"])
    results, steps = {}, {}
    for name, handler in (("TyXe flipout", tyxe.poutine.flipout),
                          ("TyXe local_reparameterization", tyxe.poutine.local_reparameterization)):  # fmt: skip
        params = _load_params(state)
        steps[name] = tyxe_step(handler, x, y)
        results[name] = {"var": variances(steps[name], params, draws)}
    for name, conv, linear in (
        ("bayesian-torch Reparameterization", Conv2dReparameterization, LinearReparameterization),
        ("bayesian-torch Flipout", Conv2dFlipout, LinearFlipout),
    ):
        net = TorchNet(conv, linear, state)
        steps[name] = torch_step(net, x, y)
        results[name] = {"var": variances(steps[name], net.params(), draws)}
    _load_params(state)
    for name in ("plain", "default"):
        steps[f"RoutedELBO {name}"] = routed_step(CONFIGS[name], x, y)
    times = time_interleaved(steps, repeats=60, warmup=5)
    for name, t in times.items():
        results.setdefault(name, {})["seconds"] = median(t)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
