"""Issue 22 benchmark: implicit reparameterization gradients for guides without rsample.

Run (about 25 s on a 2-core CPU, one torch thread; `--dim 64` about 40 s)::

    .venv/bin/python benchmarks/implicit.py [--draws 400] [--vae-draws 40] [--seed 0] [--dim 8]

Per model and estimator, from ``--draws`` independent gradient estimates of the loss
(``compare_estimators``, the same seed for every row): the total variance of the gradient
in the guide's parameters (the sum over their elements of the per-draw variance), the time
per estimate (model, guide and backward pass), and the ratios to the implicit row:

1. **Mixture guide**: ``z ~ N(0, I_D)`` (``--dim``, 8), ``x ~ N(z, 0.5^2 I)`` observed, a guide
   that is a mixture of 3 diagonal Gaussians on ``R^D`` (separated means, unequal weights).
   ``implicit``: torch's ``MixtureSameFamily`` (no rsample), routed automatically to the
   implicit gradient (its 3 components side by side, one draw each, weighted by the
   mixture's weights: 3 evaluations of the model per step; "one draw": the weights by the
   distributional transform, the components by their responsibilities,
   ``infer={"implicit_mixture": "responsibilities"}``; "all by the transform":
   ``infer={"implicit_mixture": "transform"}``); the variance is also shown for the
   components' parameters and the weights apart; ``MixtureOfDiagNormals pathwise``: Pyro's
   ``MixtureOfDiagNormals`` with the same parameters (its own rsample, Jankowiak & Obermeyer
   2018); the score function on the same ``MixtureSameFamily`` with a decaying-average
   baseline, and with leave-one-out over 2 particles (each estimate averages 2 particles,
   so it costs about 2 steps). Every row is one particle per step (leave-one-out: 2) and
   the same model; ``implicit`` evaluates the model at 3 values side by side in it. The
   goal lines compare each group of parameters (all, components, weights) with
   ``MixtureOfDiagNormals`` and with the best score-function row for that group.
2. **Von Mises**: 8 angles, prior ``VonMises(0, 1)``, ``x_d ~ VonMises(z_d, 4)`` observed,
   guide ``VonMises(loc_d, kappa_d)``: implicit (the von Mises CDF) against the score
   function with both baselines (torch's von Mises has no rsample: no other pathwise
   gradient).
3. **Real use**: the demo's conv cluster VAE (8x8 digits) with a mixture of 2 Gaussians per
   element of its latent map as the guide of ``z`` (components at the encoder's mean plus
   and minus a learned offset map, learned weights per element); ``y`` is summed exactly in
   both rows. Implicit (automatic) against ``z`` on the score function (default baseline).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import environment, format_table, median, time_interleaved  # noqa: E402

from pyro_reparam_conv import RoutedELBO, compare_estimators, force_estimator  # noqa: E402
from pyro_reparam_conv.data import load_default_images  # noqa: E402
from pyro_reparam_conv.models import ConvClusterVAE  # noqa: E402

D, K = 8, 3


# ------------------------------------------------------------------- 1. mixture guide
def _mixture_params():
    g = torch.Generator().manual_seed(0)
    logits = pyro.param("logits", torch.tensor([0.5, 0.0, -0.5]))
    locs = pyro.param("locs", lambda: torch.randn(K, D, generator=g))
    log_scales = pyro.param("log_scales", lambda: -0.5 + 0.2 * torch.randn(K, D, generator=g))
    return logits, locs, log_scales


def mixture_model():
    z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=torch.linspace(-1.5, 1.5, D))


def mixture_guide(infer=None):
    logits, locs, log_scales = _mixture_params()
    components = dist.Normal(locs, log_scales.exp()).to_event(1)
    mix = dist.MixtureSameFamily(dist.Categorical(logits=logits), components)
    pyro.sample("z", mix, infer=dict(infer or {}))


def transform_guide():
    mixture_guide({"implicit_mixture": "transform"})


def one_draw_guide():
    mixture_guide({"implicit_mixture": "responsibilities"})


def diag_normals_guide():
    logits, locs, log_scales = _mixture_params()
    pyro.sample("z", dist.MixtureOfDiagNormals(locs, log_scales.exp(), logits))


# ----------------------------------------------------------------------- 2. von Mises
ANGLES = 8
X_VM = torch.linspace(-2.0, 2.5, ANGLES)


def von_mises_model():
    z = pyro.sample("z", dist.VonMises(torch.zeros(ANGLES), 1.0).to_event(1))
    pyro.sample("x", dist.VonMises(z, 4.0).to_event(1), obs=X_VM)


def von_mises_guide():
    loc = pyro.param("vm_loc", lambda: torch.linspace(-1.5, 2.0, ANGLES))
    log_kappa = pyro.param("vm_log_kappa", lambda: torch.full((ANGLES,), 1.0))
    pyro.sample("z", dist.VonMises(loc, log_kappa.exp()).to_event(1))


# ------------------------------------------------------------------- 3. the demo's VAE
def vae_mixture_guide(vae: ConvClusterVAE):
    """The VAE's guide with ``z`` a mixture of 2 Gaussians per latent element."""

    def guide(x):
        pyro.module("vae", vae)
        y_logits, z_mean, z_var = vae.encode(x)
        shape = z_mean.shape
        offset = pyro.param("z_offset", lambda: torch.full(shape[1:], 0.5))
        w_logits = pyro.param("z_weight_logits", lambda: torch.zeros(shape[1:] + (2,)))
        locs = torch.stack([z_mean - F.softplus(offset), z_mean + F.softplus(offset)], -1)
        scale = z_var.sqrt().unsqueeze(-1)
        logits = w_logits.expand(shape + (2,))
        mix = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(locs, scale))
        with pyro.plate("images", x.shape[0], dim=-1):
            pyro.sample("y", dist.Categorical(logits=y_logits))
            pyro.sample("z", mix.to_event(3))

    return guide


# ------------------------------------------------------------------------------ run
def _measure(model, guide, estimators, args, draws, seed, params=None):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    df = compare_estimators(
        model, guide, *args, estimators=estimators, num_draws=draws, seed=seed, params=params
    )
    rows = {}
    for label, group in df.groupby("estimator", sort=False):
        rows[label] = (
            dict(zip(group.param, group.variance.astype(float))),
            float(group.seconds_per_draw.iloc[0]),
            str(group.routes.iloc[0]),
            bool(group.agrees.fillna(True).all()),
        )
    return rows


def _table(title, rows, groups=None, reference="implicit"):
    """One row per estimator: total variance (and per group of parameters), time, ratios."""
    groups = groups or {}
    var0, sec0 = sum(rows[reference][0].values()), rows[reference][1]
    body = []
    for label, (variances, sec, routes, agrees) in rows.items():
        var = sum(variances.values())
        parts = [f"{sum(variances[p] for p in ps):.4g}" for ps in groups.values()]
        body.append([
            label,
            f"{var:.4g}",
            *parts,
            f"{var / var0:.3g}x",
            f"{1e3 * sec:.2f}",
            f"{sec / sec0:.2f}x",
            f"{var * sec / (var0 * sec0):.3g}x",
            "yes" if agrees else "NO",
            routes,
        ])  # fmt: skip
    headers = ["estimator", "grad variance", *groups, "vs implicit", "ms/step", "vs implicit",
               "var x time", "agrees", "routes"]  # fmt: skip
    return f"{title}\n" + format_table(headers, body)


def _step_times(rounds: int, seed: int) -> dict[str, float]:
    """Seconds per gradient step (loss and backward, one particle) of the mixture guide's
    routes, the median of ``rounds`` interleaved rounds (drift in the shared machine's load
    hits each alike; ``compare_estimators`` times each route in one block)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    routes = {
        "implicit": (RoutedELBO(), mixture_guide),
        "implicit, one draw": (RoutedELBO(), one_draw_guide),
        "MixtureOfDiagNormals pathwise": (RoutedELBO(), diag_normals_guide),
        "score + decaying avg": (
            RoutedELBO(baseline="decaying_avg"), force_estimator(mixture_guide, "score")
        ),
    }

    def step(elbo, guide):
        return lambda: [elbo.loss_and_grads(mixture_model, guide) for _ in range(5)]

    fns = {label: step(*route) for label, route in routes.items()}
    times = time_interleaved(fns, repeats=rounds, warmup=2)
    return {label: median(t) / 5 for label, t in times.items()}


def _total(row, params=None):
    return sum(v for p, v in row[0].items() if params is None or p in params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--vae-draws", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=8, help="dimension of the mixture's z")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    global D
    D = args.dim
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    start = time.perf_counter()
    print("\n".join(environment("cpu")))

    same = {"implicit": "auto", "score + decaying avg": "score+avg", "score + leave-one-out (2)":
            "score+loo"}  # fmt: skip
    rows = _measure(mixture_model, mixture_guide, same, (), args.draws, args.seed)
    modn = _measure(
        mixture_model, diag_normals_guide, {"MixtureOfDiagNormals pathwise": "auto"}, (),
        args.draws, args.seed,
    )  # fmt: skip
    variants = {}
    for label, guide in (("implicit, one draw", one_draw_guide),
                         ("implicit, all by the transform", transform_guide)):
        variants.update(_measure(mixture_model, guide, {label: "auto"}, (), args.draws, args.seed))
    rows = {"implicit": rows.pop("implicit"), **variants, **modn, **rows}  # fmt: skip
    print()
    groups = {"components": ("locs", "log_scales"), "weights": ("logits",)}
    title = f"1. mixture guide (K={K} diagonal Gaussians on R^{D}), {args.draws} draws"
    print(_table(title, rows, groups))
    implicit, pathwise = rows["implicit"], rows["MixtureOfDiagNormals pathwise"]
    for label, params in (("all parameters", None), *groups.items()):
        best = min(_total(v, params) for k, v in rows.items() if k.startswith("score"))
        ours = _total(implicit, params)
        print(
            f"goal ({label}): variance implicit / MixtureOfDiagNormals = "
            f"{ours / _total(pathwise, params):.3g} (<= 2), best score / implicit = "
            f"{best / ours:.3g} (>= 100)"
        )
    print(f"goal: time implicit / MixtureOfDiagNormals = {implicit[1] / pathwise[1]:.3g} (<= 2)")
    times = _step_times(args.rounds, args.seed)
    print(
        f"time per step, median of {args.rounds} interleaved rounds of 5 steps: "
        + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in times.items())
        + f"; implicit / MixtureOfDiagNormals = "
        f"{times['implicit'] / times['MixtureOfDiagNormals pathwise']:.3g} (goal <= 2), "
        f"implicit / score = {times['implicit'] / times['score + decaying avg']:.3g}"
    )

    rows = _measure(von_mises_model, von_mises_guide, same, (), args.draws, args.seed)
    print()
    print(_table(f"2. von Mises guide ({ANGLES} angles), {args.draws} draws", rows))

    torch.manual_seed(args.seed)
    vae = ConvClusterVAE(latent_channels=4, num_classes=10, hidden_channels=16)
    x, _ = load_default_images(32, seed=args.seed)
    guide = vae_mixture_guide(vae)
    estimators = {"implicit": {}, "z by score": {"z": "score"}}
    rows = _measure(vae.model, guide, estimators, (x,), args.vae_draws, args.seed)
    print()
    title = (
        f"3. the demo's conv cluster VAE, 32 digits, z: a mixture of 2 Gaussians per latent "
        f"element {tuple(vae.latent_shape)}, {args.vae_draws} draws"
    )
    print(_table(title, rows))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
