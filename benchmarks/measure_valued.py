"""Issue 14 benchmark: the measure-valued gradient against the pathwise and score-function
gradients, on the settings of Mohamed et al. 2020 (JMLR), figure 2, and on a step cost.

Run (about a minute on a 2-core CPU)::

    .venv/bin/python benchmarks/measure_valued.py [--draws 20000] [--step-draws 4000]
        [--seed 0] [--out docs/measure_valued_variance.png]

1. Figure 2 of the paper: ``x ~ N(mu = 1, sigma = 1)`` and the costs ``(x - k)^2``,
   ``exp(-k x^2)`` and ``cos(k x)`` over a range of ``k``. Per estimator (pathwise; score
   function without baseline; measure-valued, coupled and not) and parameter (``mu``,
   ``sigma``): the exact per-sample variance by quadrature (``tests/quadrature.py``) and the
   variance measured through :class:`~pyro_reparam_conv.RoutedELBO`, with its standard error
   ``sqrt((m4 - var^2) / n)``. One ELBO pass gives ``n`` independent estimates: a plate of
   ``n`` copies of the site, each with its own ``mu`` and ``sigma`` (the model's prior is
   ``q`` itself, detached, so the loss is ``E[f(x)]``). A table and a PNG plot (lines:
   quadrature; markers: measured; the coupled estimate in ``mu`` of ``(x - k)^2`` is
   ``4 W (mu - k) / sqrt(2 pi)``, exactly 0 at ``k = mu = 1``, so that point is missing).
2. The step cost of issue 14: ``x ~ N(mu = 0.3, sigma = 1)``, prior ``N(0, 1)``, cost
   ``1[x > 0]``; the gradient of the loss ``Phi(mu / sigma) + KL`` is ``phi(0.3) + 0.3 =
   0.681`` in ``mu`` and ``-0.3 phi(0.3) = -0.114`` in ``sigma``. Per estimator, from
   ``--step-draws`` independent SVI-style estimates: mean, |mean - exact| in standard errors,
   variance, model evaluations and milliseconds per estimate.

Timings use one torch thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import environment, format_table  # noqa: E402
from quadrature import measure_valued_moments, pathwise_moments, score_moments  # noqa: E402

from pyro_reparam_conv import RoutedELBO  # noqa: E402

MU, SIGMA = 1.0, 1.0

#: name -> (cost f(x, k) for NumPy and torch alike, its derivative in x, the k grid)
COSTS = {
    "(x - k)^2": (
        lambda x, k: (x - k) ** 2,
        lambda x, k: 2 * (x - k),
        [-3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
    ),
    "exp(-k x^2)": (
        lambda x, k: (-k * x**2).exp() if torch.is_tensor(x) else np.exp(-k * x**2),
        lambda x, k: -2 * k * x * np.exp(-k * x**2),
        [0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0],
    ),
    "cos(k x)": (
        lambda x, k: (k * x).cos() if torch.is_tensor(x) else np.cos(k * x),
        lambda x, k: -k * np.sin(k * x),
        [0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0],
    ),
}

#: label -> the guide site's infer dict, the RoutedELBO's options
ESTIMATORS = {
    "pathwise": ({"estimator": "pathwise"}, {}),
    "score": ({"estimator": "score", "baseline": None}, {}),
    "MVD coupled": ({"estimator": "measure_valued", "coupled": True}, {}),
    "MVD uncoupled": ({"estimator": "measure_valued", "coupled": False}, {}),
}


# ------------------------------------------------------------------ 1. figure 2
def plate_model(cost, k, n, infer=None):
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    with pyro.plate("copies", n):
        x = pyro.sample("x", dist.Normal(loc, scale))  # prior = q: log p - log q = 0
        pyro.factor("cost", -cost(x, k))


def plate_guide(cost, k, n, infer):
    loc = pyro.param("loc", lambda: torch.full((n,), MU, dtype=torch.float64))
    scale = pyro.param("scale", lambda: torch.full((n,), SIGMA, dtype=torch.float64))
    with pyro.plate("copies", n):
        pyro.sample("x", dist.Normal(loc, scale), infer=dict(infer))


def measured(cost, k, n, infer) -> list[tuple[float, float]]:
    """(variance, its standard error) of n estimates of d E f / d mu and d E f / d sigma."""
    pyro.clear_param_store()
    loss = RoutedELBO().differentiable_loss(plate_model, plate_guide, cost, k, n, infer)
    grads = torch.autograd.grad(loss, [pyro.param("loc"), pyro.param("scale")])
    found = []
    for g in grads:
        centered = g - g.mean()
        var = float(centered.square().mean())
        m4 = float(centered.pow(4).mean())
        found.append((var * n / (n - 1), math.sqrt(max(m4 - var**2, 0.0) / n)))
    return found


def exact(name, cost, d_cost, k, label):
    f = lambda x: cost(x, k)  # noqa: E731
    if label == "pathwise":
        return pathwise_moments(lambda x: d_cost(x, k), MU, SIGMA)
    if label == "score":
        return score_moments(f, MU, SIGMA)
    return measure_valued_moments(f, MU, SIGMA, coupled=label == "MVD coupled")


def figure_2(n: int):
    rows, series, worst = [], {}, 0.0
    for name, (cost, d_cost, ks) in COSTS.items():
        for k in ks:
            for label, (infer, _) in ESTIMATORS.items():
                got = measured(cost, k, n, infer)
                for param, (var_m, se), (_, var_q, _) in zip(
                    ("mu", "sigma"), got, exact(name, cost, d_cost, k, label)
                ):
                    if var_q < 1e-20 and var_m < 1e-20:  # no variance at all (mu = k: exactly 0)
                        var_q = var_m = se = z = 0.0
                    else:
                        z = abs(var_m - var_q) / se
                    worst = max(worst, z)
                    series.setdefault((name, param, label), []).append((k, var_q, var_m))
                    rows.append([
                        name, f"{k:g}", param, label, f"{var_q:.4g}", f"{var_m:.4g}",
                        f"{se:.2g}", f"{z:.1f}",
                    ])  # fmt: skip
    return rows, series, worst


def plot(series, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"pathwise": "C0", "score": "C1", "MVD coupled": "C2", "MVD uncoupled": "C3"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), constrained_layout=True)
    for col, name in enumerate(COSTS):
        for row, param in enumerate(("mu", "sigma")):
            ax = axes[row, col]
            for label, color in colors.items():
                points = series[(name, param, label)]
                k = [p[0] for p in points]
                # a variance of exactly 0 (mu = k for the square) has no place on a log axis
                ax.plot(k, [p[1] if p[1] > 0 else math.nan for p in points], color=color,
                        label=label)  # fmt: skip
                ax.plot(k, [p[2] if p[2] > 0 else math.nan for p in points], "o", color=color,
                        ms=4)  # fmt: skip
            ax.set_yscale("log")
            if name != "(x - k)^2":
                ax.set_xscale("log")
            ax.set_title(f"{name}: gradient in {param}")
            ax.set_xlabel("k")
            ax.set_ylabel("per-sample variance")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4,
               title="line: quadrature, o: measured through RoutedELBO")  # fmt: skip
    fig.suptitle("Variance of d/d theta E_N(x | 1, 1)[f(x; k)] (Mohamed et al. 2020, figure 2)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ 2. the step cost
STEP_MU = 0.3
PHI = math.exp(-(STEP_MU**2) / 2) / math.sqrt(2 * math.pi)
STEP_EXACT = {"mu": PHI + STEP_MU, "sigma": -STEP_MU * PHI}


def step_model():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("cost", -(x > 0).to(x.dtype))


def step_guide(infer):
    mu = pyro.param("mu", lambda: torch.tensor(STEP_MU))
    sigma = pyro.param("sigma", lambda: torch.tensor(1.0))
    pyro.sample("x", dist.Normal(mu, sigma), infer=dict(infer))


STEP_ESTIMATORS = {
    "pathwise + analytic KL (default)": ({}, {}, 1),
    "pathwise, Monte Carlo KL": ({}, {"fast_path": False}, 1),
    "score, decaying average": ({"estimator": "score"}, {}, 1),
    "score, 2 particles, leave-one-out": (
        {"estimator": "score"}, {"num_particles": 2, "baseline": "leave_one_out"}, 2),
    "measure_valued, coupled": ({"estimator": "measure_valued"}, {}, 4),
    "measure_valued, uncoupled": ({"estimator": "measure_valued", "coupled": False}, {}, 4),
}  # fmt: skip


def step_rows(draws: int, seed: int):
    rows, worst = [], {}
    for label, (infer, options, evaluations) in STEP_ESTIMATORS.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        elbo = RoutedELBO(**options)
        guide = lambda i=infer: step_guide(i)  # noqa: E731
        guide()
        params = [pyro.param("mu"), pyro.param("sigma")]
        grads = []
        start = time.perf_counter()
        for _ in range(draws):
            loss = elbo.differentiable_loss(step_model, guide)
            grads.append(torch.stack(torch.autograd.grad(loss, params)))
        seconds = (time.perf_counter() - start) / draws
        grads = torch.stack(grads).double()
        mean, var = grads.mean(0), grads.var(0)
        for i, param in enumerate(("mu", "sigma")):
            se = math.sqrt(var[i] / draws)
            error = abs(float(mean[i]) - STEP_EXACT[param])
            z = "exact" if error < 1e-6 else ("inf" if se == 0 else f"{error / se:.1f}")
            worst[(label, param)] = z
            rows.append([
                label if i == 0 else "", param, f"{STEP_EXACT[param]:.4f}", f"{mean[i]:.4f}",
                f"{se:.4f}", z, f"{var[i]:.4g}", evaluations if i == 0 else "",
                f"{1e3 * seconds:.2f}" if i == 0 else "",
            ])  # fmt: skip
    return rows, worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=20000, help="estimates per figure-2 cell")
    parser.add_argument("--step-draws", type=int, default=4000, help="estimates per step row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "measure_valued_variance.png",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pyro.set_rng_seed(args.seed)
    print("\n".join(environment("cpu")))

    print(
        f"\n1. Mohamed et al. 2020, figure 2: x ~ N({MU:g}, {SIGMA:g}^2); per-sample variance of "
        f"each estimator of d E f / d theta, exact (quadrature) and measured ({args.draws} "
        "estimates in one RoutedELBO pass), with the measured value's standard error\n"
    )
    rows, series, worst = figure_2(args.draws)
    headers = ["cost", "k", "param", "estimator", "exact var", "measured var", "se", "|z|"]
    print(format_table(headers, rows))
    print(f"(largest |measured - exact| / se: {worst:.1f})")
    plot(series, args.out)
    print(f"wrote {args.out}")

    print(
        f"\n2. Step cost: x ~ N({STEP_MU}, 1), prior N(0, 1), cost 1[x > 0]; gradient of the "
        f"loss, {args.step_draws} estimates per estimator\n"
    )
    rows, _ = step_rows(args.step_draws, args.seed)
    headers = ["estimator", "param", "exact", "mean", "se", "|bias|/se", "variance",
               "model evals", "ms/estimate"]  # fmt: skip
    print(format_table(headers, rows))
    print(
        "(|bias|/se above ~4 is a bias, not noise; 'inf': a constant estimate that is wrong. "
        "The pathwise gradient sees the step's derivative, 0.)"
    )


if __name__ == "__main__":
    main()
