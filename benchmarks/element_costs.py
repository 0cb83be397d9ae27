"""Issue 13 benchmark: element-level against site-level costs for a latent map on the
score-function route, side by side with pathwise and with Pyro's ELBOs.

Run (about two minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/element_costs.py [--draws 200] [--steps 30] [--seed 0]

Two models, each with ``z`` a map forced onto the score function:

- ``conv``: the seed workload at 32 x 32: ``z ~ N(0, 1)`` of shape (B, 16, 32, 32),
  ``x ~ N(Conv2d(16, 32, 3, padding=1)(z), 1)``, a guide with a mean and a softplus variance
  per element; every element feeds a 3 x 3 footprint of the 32 x 32 pixels;
- ``demo``: the demo's ``ConvClusterVAE`` (8 x 8 digits, a 4 x 4 latent map, a decoder with
  GroupNorm), at its initial parameters: a pixel depends on every position of the map, so
  the costs stay site-level (the route says why).

Per estimator: the total per-draw variance of the gradient of the guide's parameters (the
encoder for ``demo``), its ratio to the element-level one, and the time per SVI step
(``loss_and_grads``, median after warm-up). Rows: ``RoutedELBO`` pathwise; score with
element-level costs (the default for a map) and with site-level ones
(``infer={"rao_blackwell": "site"}``), both with the default decaying-average baseline;
Pyro's ``Trace_ELBO`` and ``TraceGraph_ELBO`` on the same guide with ``z``'s distribution
rebuilt without ``rsample`` (their score function: all terms, or per plate element). Same
seeds for every row; one torch thread; the machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.poutine.messenger import Messenger

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import environment, format_table  # noqa: E402

from pyro_reparam_conv import RoutedELBO, sample_elementwise_normal  # noqa: E402
from pyro_reparam_conv.distributions import unwrap_independent  # noqa: E402


class WithoutRsample(Messenger):
    """Rebuilds site ``z``'s Normal without ``rsample`` (never mutating the user's), so that
    Pyro's own ELBOs take the score-function route on it."""

    def _pyro_sample(self, msg):
        if msg["name"] == "z" and not msg["is_observed"]:
            fn = msg["fn"]
            base, ndims = unwrap_independent(fn)
            shape = fn.batch_shape + fn.event_shape
            plain = dist.Normal(base.loc.expand(shape), base.scale.expand(shape))
            msg["fn"] = plain.has_rsample_(False).to_event(ndims)


# --------------------------------------------------------------------------- models
class Conv:
    """The seed workload at 32 x 32 (batch 4, 16 -> 32 channels)."""

    def __init__(self, seed: int, batch: int = 4, size: int = 32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.shape = (batch, 16, size, size)
        pyro.clear_param_store()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.y = torch.randn((batch, 32, size, size), generator=g)
        pyro.param("mean", 0.1 * torch.randn(self.shape, generator=g))
        pyro.param("raw_var", torch.full(self.shape, -1.0))
        self.args = ()

    def model(self):
        pyro.module("conv", self.conv)
        with pyro.plate("batch", self.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(()), 1.0).expand(self.shape).to_event(3))
            pyro.sample("x", dist.Normal(self.conv(z), 1.0).to_event(3), obs=self.y)

    def guide(self, rao_blackwell="element"):
        infer = {"estimator": "score", "rao_blackwell": rao_blackwell}
        with pyro.plate("batch", self.shape[0]):
            var = pyro.param("raw_var")
            sample_elementwise_normal("z", pyro.param("mean"), var, "softplus", infer=infer)

    def params(self):
        return [pyro.param("mean"), pyro.param("raw_var")]


class Demo:
    """The demo's ConvClusterVAE at its initial parameters, 64 digits."""

    def __init__(self, seed: int) -> None:
        from pyro_reparam_conv.data import load_default_images
        from pyro_reparam_conv.models import ConvClusterVAE

        pyro.clear_param_store()
        torch.manual_seed(seed)
        images, _ = load_default_images(1024, seed=seed)
        self.vae = ConvClusterVAE()
        self.args = (images[:64],)
        self.kwargs = {"num_data": 1024}
        self.vae.guide(*self.args, **self.kwargs)  # create the parameters

    def model(self, x, num_data):
        return self.vae.model(x, num_data)

    def guide(self, x, num_data, rao_blackwell="element"):
        self.vae.z_infer = {"estimator": "score", "rao_blackwell": rao_blackwell}
        return self.vae.guide(x, num_data)

    def params(self):
        return [*self.vae.encoder.parameters(), *self.vae.z_head.parameters()]


def routes(problem):
    """label -> (ELBO, guide) on the same model."""
    site = lambda *a, **k: problem.guide(*a, rao_blackwell="site", **k)  # noqa: E731
    element = problem.guide

    def pathwise(*args, **kwargs):
        # the same guide, z left on its automatic (pathwise) route
        infer = getattr(problem, "vae", None)
        if infer is not None:
            infer.z_infer = {}
            return infer.guide(*args, **kwargs)
        with pyro.plate("batch", problem.shape[0]):
            var = pyro.param("raw_var")
            sample_elementwise_normal("z", pyro.param("mean"), var, "softplus")

    no_rsample = WithoutRsample()(lambda *a, **k: problem.guide(*a, rao_blackwell="site", **k))
    return {
        "RoutedELBO pathwise": (RoutedELBO(), pathwise),
        "RoutedELBO score, element-level costs": (RoutedELBO(), element),
        "RoutedELBO score, site-level costs": (RoutedELBO(), site),
        "Pyro Trace_ELBO (score)": (Trace_ELBO(), no_rsample),
        "Pyro TraceGraph_ELBO (score, per plate)": (TraceGraph_ELBO(), no_rsample),
    }


def measure(problem, draws: int, steps: int, seed: int):
    args, kwargs = problem.args, getattr(problem, "kwargs", {})
    params = problem.params()
    rows = {}
    for label, (elbo, guide) in routes(problem).items():
        pyro.set_rng_seed(seed)
        for _ in range(5):  # warm-up: tracking, footprints, decaying average
            elbo.loss_and_grads(problem.model, guide, *args, **kwargs)
            for p in params:
                p.grad = None
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            elbo.loss_and_grads(problem.model, guide, *args, **kwargs)
            times.append(time.perf_counter() - start)
            for p in params:
                p.grad = None
        pyro.set_rng_seed(seed + 1)
        grads = []
        for _ in range(draws):
            elbo.loss_and_grads(problem.model, guide, *args, **kwargs)
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
            for p in params:
                p.grad = None
        variance = torch.stack(grads).double().var(0).sum().item()
        reason = getattr(elbo, "routes", {}).get("z")
        rows[label] = (variance, statistics.median(times), reason.reason if reason else "")
    return rows


def train_and_evaluate(problem, guide, steps: int, seed: int, lr: float = 0.05) -> float:
    """ELBO (TraceMeanField_ELBO, 20 particles) after ``steps`` of Adam with RoutedELBO, from
    the problem's initial parameters (restored after)."""
    from pyro.infer import SVI, TraceMeanField_ELBO

    store = pyro.get_param_store()
    saved = {k: v.detach().clone() for k, v in store.items()}
    conv = {k: v.detach().clone() for k, v in problem.conv.state_dict().items()}
    pyro.set_rng_seed(seed)
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": lr}), RoutedELBO())
    for _ in range(steps):
        svi.step()
    with torch.no_grad():
        elbo = -TraceMeanField_ELBO(num_particles=20).loss(problem.model, problem.guide)
    with torch.no_grad():
        for k, v in saved.items():
            store[k].copy_(v) if k in store else None
    problem.conv.load_state_dict(conv)
    return elbo / problem.shape[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=200, help="gradient draws per row")
    parser.add_argument("--steps", type=int, default=30, help="timed SVI steps per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=300, help="SVI steps (conv model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    print("\n".join(environment("cpu")))
    for name, make in (("conv", Conv), ("demo", Demo)):
        problem = make(args.seed)
        rows = measure(problem, args.draws, args.steps, args.seed)
        element_var, element_time, _ = rows["RoutedELBO score, element-level costs"]
        site_var, site_time, _ = rows["RoutedELBO score, site-level costs"]
        table = [
            [label, f"{var:.3g}", f"{var / element_var:.3g}", f"{1e3 * t:.2f}",
             f"{t / site_time:.2f}"]
            for label, (var, t, _) in rows.items()
        ]  # fmt: skip
        print(f"\n{name}: {args.draws} gradient draws, {args.steps} timed steps per row")
        headers = ["estimator", "grad variance", "/ element-level", "ms/step", "/ site-level"]
        print(format_table(headers, table))
        print(f"z's route: {rows['RoutedELBO score, element-level costs'][2]}")
        print(
            f"element-level: {site_var / element_var:.3g}x lower variance than site-level, "
            f"{element_time / site_time:.2f}x its time per step"
        )
        if name == "conv":
            trained = {
                label: train_and_evaluate(problem, guide, args.train_steps, args.seed)
                for label, (_, guide) in routes(problem).items()
                if label.startswith("RoutedELBO")
            }
            pathwise = trained["RoutedELBO pathwise"]
            print(f"\nELBO per image after {args.train_steps} SVI steps (Adam, lr 0.05):")
            print(format_table(
                ["route of z", "ELBO/image", "vs pathwise"],
                [[k, f"{v:.1f}", f"{(v - pathwise) / abs(pathwise):+.1%}"]
                 for k, v in trained.items()],
            ))  # fmt: skip


if __name__ == "__main__":
    main()
