"""Issue 21 benchmark: gradient variance of a Bayesian CNN's weight means and scales per
layer and route, and time per step (plain weight draw, flipout, local reparameterization).

Run (about a minute on a 2-core CPU, one torch thread; ``--scales`` adds about two)::

    .venv/bin/python benchmarks/bayesian_conv.py [--batch 64] [--draws 300] [--steps 300]
        [--seed 0] [--particles 30] [--scales]

The network, on the embedded 8x8 digits: ``conv1`` (1 -> 8 channels, 3x3, padding 1),
ReLU, 2x2 max-pool, ``conv2`` (8 -> 16, 3x3, padding 1), ReLU, global mean, ``fc``
(16 -> 10), a Categorical likelihood scaled to the data set's size (minibatch SVI); every
weight ``N(0, 1)`` a priori with a factorized
Normal guide ``N(mu, softplus(rho))``, biases point estimates. It is first trained
``--steps`` steps (default routes, Adam 0.01) so the variances are measured at a
posterior-like point, not at the initialization. Then, per route configuration, ``--draws``
independent gradients of the loss at that fixed point (one particle, batch ``--batch``):
per layer and parameter (``mu``, ``rho``), the total variance (sum over the elements of the
per-element variance) and the ratio plain / route; and the median seconds per
``loss_and_grads`` step (interleaved rounds), so "variance x time" compares at equal cost.

``--particles ROUNDS``: seconds per step with 8 vectorized particles against 8 drawn in a
Python loop (the same network and routes; Pyro's ``Trace_ELBO`` cannot vectorize it).
``--scales``: where the conv scales' gradient variance comes from, with an independent weight
draw per example (:func:`per_example_model`: the most a per-example weight with the model's
law can reach) and with the analytic or Monte Carlo KL terms.

Configurations: ``plain`` (every weight ``pathwise``: one weight draw per batch),
``default`` (routing's own choice: flipout for the convs, local reparameterization for the
linear layer, from the second step), ``flipout everywhere`` and ``local_reparam
everywhere`` (the convs' local reparameterization changes the objective: shown for its
variance only). With ``--peers-python``, TyXe and bayesian-torch on the same point and
batch (``_bayesian_conv_peers.py``, in their own environment).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import environment, format_table, median, time_interleaved  # noqa: E402

from pyro_reparam_conv import RoutedELBO  # noqa: E402
from pyro_reparam_conv.data import load_default_images  # noqa: E402
from pyro_reparam_conv.estimators.flipout import batched_layer  # noqa: E402

SHAPES = {"conv1": (8, 1, 3, 3), "conv2": (16, 8, 3, 3), "fc": (10, 16)}
CONFIGS = {
    "plain": dict.fromkeys(SHAPES, "pathwise"),
    "default": dict.fromkeys(SHAPES),
    "flipout everywhere": dict.fromkeys(SHAPES, "flipout"),
    "local_reparam everywhere": dict.fromkeys(SHAPES, "local_reparam"),
}


#: the data set's size: each batch's likelihood is scaled to it, as with minibatch SVI
N_TOTAL = 1797


def network(x, w, conv=F.conv2d):
    """The logits of the CNN with weights ``w`` (``conv(x, weight)`` applies a conv layer)."""
    b1 = pyro.param("b1", torch.zeros(8))
    b2 = pyro.param("b2", torch.zeros(16))
    bf = pyro.param("bf", torch.zeros(10))
    # biases added outside the layers (None in the call): TyXe's handlers take a layer's
    # bias to be a sampled one, or an explicit None
    h = F.relu(conv(x, w["conv1"], None, padding=1) + b1[:, None, None])
    # pooled with any leading (particle) dims folded into the batch: max_pool2d takes 4 dims
    pooled = F.max_pool2d(h.reshape((-1,) + h.shape[-3:]), 2)
    h = pooled.reshape(h.shape[:-2] + pooled.shape[-2:])
    h = F.relu(conv(h, w["conv2"], None, padding=1) + b2[:, None, None]).mean((-1, -2))
    if w["fc"].dim() == 2:
        return F.linear(h, w["fc"], None) + bf
    return (h.unsqueeze(-2) @ w["fc"].transpose(-1, -2)).squeeze(-2) + bf


def likelihood(x, y, logits):
    with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=N_TOTAL / x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=logits), obs=y)


def model(x, y, routes=None):
    w = {
        k: pyro.sample(k, dist.Normal(0.0, 1.0).expand(s).to_event(len(s)))
        for k, s in SHAPES.items()
    }
    likelihood(x, y, network(x, w))


def per_example_model(x, y, routes=None):
    """The same objective with an independent weight draw per example (a plate of weights,
    each copy's prior scaled by 1 / batch): the variance flipout's pseudo-independent
    per-example weights approach at best."""
    n = x.shape[0]
    with pyro.plate("examples", n), pyro.poutine.scale(scale=1.0 / n):
        w = {
            k: pyro.sample(k, dist.Normal(0.0, 1.0).expand(s).to_event(len(s)))
            for k, s in SHAPES.items()
        }
    likelihood(x, y, network(x, w, functools.partial(batched_layer, F.conv2d, 2)))


def guide(x, y, routes=None, copies=None):
    """``N(mu, softplus(rho))`` per weight; ``copies``: that many independent draws of each
    (a plate, for :func:`per_example_model`)."""
    routes = routes or CONFIGS["default"]
    with contextlib.ExitStack() as stack:
        if copies:
            stack.enter_context(pyro.plate("examples", copies))
            stack.enter_context(pyro.poutine.scale(scale=1.0 / copies))
        for name, shape in SHAPES.items():
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            mu = pyro.param(f"{name}.mu", lambda: torch.randn(shape) * (2.0 / fan_in) ** 0.5)
            rho = pyro.param(f"{name}.rho", lambda: torch.full(shape, -3.0))
            infer = {"estimator": routes[name]} if routes[name] else {}
            fn = dist.Normal(mu, F.softplus(rho)).to_event(len(shape))
            pyro.sample(name, fn, infer=infer)


def per_example_guide(x, y, routes=None):
    guide(x, y, CONFIGS["plain"], copies=x.shape[0])


def gradient_draws(routes, x, y, draws: int, programs=(model, guide), **options):
    model_, guide_ = programs
    elbo = RoutedELBO(**options)
    for _ in range(2):  # the first step checks the weights' uses
        elbo.loss(model_, guide_, x, y, routes)
    store = pyro.get_param_store()
    params = {f"{k}.{p}": store[f"{k}.{p}"].unconstrained() for k in SHAPES for p in ("mu", "rho")}
    out = {k: [] for k in params}
    for _ in range(draws):
        for p in params.values():
            p.grad = None
        elbo.loss_and_grads(model_, guide_, x, y, routes)
        for k, p in params.items():
            out[k].append(p.grad.detach().clone())
    for p in params.values():
        p.grad = None
    return elbo, {k: torch.stack(v).var(0).sum().item() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--particles", type=int, default=30, metavar="ROUNDS",
                        help="time 8 vectorized particles against a loop over ROUNDS rounds "
                        "(0: skip)")  # fmt: skip
    parser.add_argument("--scales", action="store_true",
                        help="also where the conv scales' gradient variance comes from")
    parser.add_argument(
        "--peers-python",
        help="an interpreter with TyXe and bayesian-torch (and this torch and Pyro): runs "
        "_bayesian_conv_peers.py there on the same trained point and batch",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    images, labels = load_default_images(seed=args.seed)
    x, y = images[: args.batch], labels[: args.batch]

    elbo = RoutedELBO()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for step in range(args.steps):  # a posterior-like point: train on batches of the data
        start = (step * args.batch) % (len(images) - args.batch)
        svi.step(images[start : start + args.batch], labels[start : start + args.batch])

    print("\n".join(environment("cpu")))
    print(f"batch {args.batch}, {args.draws} gradient draws per configuration, "
          f"after {args.steps} training steps\n")  # fmt: skip
    variances, routes = {}, {}
    for name, config in CONFIGS.items():
        elbo, variances[name] = gradient_draws(config, x, y, args.draws)
        routes[name] = {k: elbo.routes[k].layers or elbo.routes[k].estimator for k in SHAPES}
    elbos = {name: RoutedELBO() for name in CONFIGS}
    for name, elbo in elbos.items():
        elbo.loss(model, guide, x, y, CONFIGS[name])

    def step(name):
        return lambda: elbos[name].loss_and_grads(model, guide, x, y, CONFIGS[name])

    times = time_interleaved({name: step(name) for name in CONFIGS}, repeats=100, warmup=5)
    seconds = {name: median(t) for name, t in times.items()}
    plain = variances["plain"]
    rows = []
    for name in CONFIGS:
        for param in plain:
            layer = param.split(".")[0]
            v = variances[name][param]
            rows.append([
                name, routes[name][layer], param, f"{v:.3e}", f"{plain[param] / v:.1f}x",
                f"{seconds[name] / seconds['plain']:.2f}x",
                f"{plain[param] * seconds['plain'] / (v * seconds[name]):.1f}x",
            ])  # fmt: skip
    headers = ["config", "route", "param", "grad var", "var plain/route", "time/step vs plain",
               "var x time plain/route"]  # fmt: skip
    print(format_table(headers, rows))
    print("\nseconds per step: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items()))
    if args.particles:
        particles(x, y, args.particles)
    if args.scales:
        scale_variance(x, y, args.draws)
    if args.peers_python:
        peers(args, x, y, plain)


def scale_variance(x, y, draws: int) -> None:
    """Where the conv scales' (rho) gradient variance comes from: plain weight draws, flipout,
    and an independent weight draw per example (the most flipout's pseudo-independent
    per-example weights can reach), each with the analytic KL (default) and with the Monte
    Carlo ``log p - log q`` terms (``fast_path=False``)."""
    runs = {
        "plain": (CONFIGS["plain"], (model, guide)),
        "flipout": (CONFIGS["default"], (model, guide)),
        "independent per example": (None, (per_example_model, per_example_guide)),
    }
    found = {}
    for name, (routes, programs) in runs.items():
        for kl in (True, False):
            _, found[name, kl] = gradient_draws(routes, x, y, draws, programs, fast_path=kl)
    rows = []
    for (name, kl), var in found.items():
        base = found["plain", kl]
        rows.append([name, "analytic" if kl else "Monte Carlo"] + [
            f"{var[f'{k}.{p}']:.3e} ({base[f'{k}.{p}'] / var[f'{k}.{p}']:.1f}x)"
            for k in ("conv1", "conv2") for p in ("mu", "rho")])  # fmt: skip
    print(f"\nconv gradient variance by source ({draws} draws; in brackets: plain / this, "
          "same KL terms)\n")  # fmt: skip
    headers = ["weights", "KL terms", "conv1.mu", "conv1.rho", "conv2.mu", "conv2.rho"]
    print(format_table(headers, rows))


def particles(x, y, repeats: int, n: int = 8) -> None:
    """Seconds per step with ``n`` vectorized particles against ``n`` particles drawn one at
    a time in a Python loop (the same network and routes), and plain Pyro's loop."""
    elbos = {}
    for config in ("default", "plain"):
        elbos[config, "vectorized"] = RoutedELBO(
            num_particles=n, vectorize_particles=True, max_plate_nesting=1)  # fmt: skip
        elbos[config, "loop"] = RoutedELBO(num_particles=n)
    elbos["plain", "Trace_ELBO loop"] = pyro.infer.Trace_ELBO(num_particles=n)
    for (config, _), elbo in elbos.items():
        for _ in range(2):
            elbo.loss_and_grads(model, guide, x, y, CONFIGS[config])

    def step(key):
        return lambda: elbos[key].loss_and_grads(model, guide, x, y, CONFIGS[key[0]])

    times = time_interleaved({key: step(key) for key in elbos}, repeats=repeats, warmup=2)
    seconds = {key: median(t) for key, t in times.items()}
    rows = [[f"{config}, {how}", f"{t * 1e3:.1f} ms", f"{t / n * 1e3:.2f} ms",
             f"{seconds[config, 'loop'] / t:.2f}x" if (config, "loop") in seconds else ""]
            for (config, how), t in seconds.items()]  # fmt: skip
    try:
        pyro.infer.Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1
                              ).loss(model, guide, x, y, CONFIGS["plain"])  # fmt: skip
        plain_pyro = "runs"
    except Exception as error:  # noqa: BLE001 - reported
        plain_pyro = f"fails ({type(error).__name__}: {str(error).splitlines()[0][:70]})"
    print(f"\n{n} particles per step, vectorized against a loop (one thread)\n")
    print(format_table(["routes, particles", "per step", "per particle", "loop / this"], rows))
    print(f"Pyro's Trace_ELBO(vectorize_particles=True) on this network: {plain_pyro}")


def peers(args, x, y, plain: dict) -> None:
    """The peers' table: their variances against this script's plain weight draws, their
    times against ``RoutedELBO``'s plain route timed in the same (peer) process."""
    import json
    import subprocess
    import tempfile

    store = pyro.get_param_store()
    names = [f"{k}.{p}" for k in SHAPES for p in ("mu", "rho")] + ["b1", "b2", "bf"]
    state = {"params": {k: store[k].detach().clone() for k in names}, "x": x, "y": y,
             "draws": args.draws, "seed": args.seed}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.pt"
        torch.save(state, path)
        script = Path(__file__).resolve().parent / "_bayesian_conv_peers.py"
        done = subprocess.run([args.peers_python, str(script), str(path)], capture_output=True,
                              text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        print(f"\npeers failed: {done.stderr[-2000:]}")
        return
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in results:
        print(f"\npeers: {results['error']}")
        return
    base = results["RoutedELBO plain"]["seconds"]
    rows = []
    for name, found in results.items():
        time = f"{found['seconds'] * 1e3:.2f} ms ({found['seconds'] / base:.2f}x)"
        if "var" not in found:
            rows.append([name, "", "", "", time])
            continue
        for param, v in found["var"].items():
            rows.append([name, param, f"{v:.3e}", f"{plain[param] / v:.1f}x", time])
    print(f"\npeers, same point and batch ({args.draws} draws; times in their process, "
          "against RoutedELBO plain there)\n")  # fmt: skip
    print(format_table(["method", "param", "grad var", "var plain/route", "time/step"], rows))


if __name__ == "__main__":
    main()
