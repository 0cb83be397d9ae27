"""Issue 3 benchmark: what routing costs per step, and what it buys in gradient variance.

Run (defaults take about a minute on a 2-core CPU)::

    .venv/bin/python benchmarks/routing_overhead.py [--device cpu|cuda] [--repeats 100]
        [--draws 400]

1. Time per SVI-like step (``loss_and_grads`` then zeroing the grads; no parameter update),
   median over ``--repeats`` interleaved rounds after a warm-up, of ``RoutedELBO`` vs Pyro's
   ``Trace_ELBO`` and ``TraceGraph_ELBO`` on
   (a) a pathwise-only conv latent-variable model (B=8 images, a 4x16x16 latent map drawn by
       :func:`~pyro_reparam_conv.layers.sample_elementwise_normal` from a conv encoder's
       mean/var, conv decoder, Normal likelihood, a plate over the batch), and
   (b) a model with score sites (a Bernoulli per plate element plus a Normal global latent;
       the Bernoulli site is put on the score route with ``infer={"estimator": "score"}``,
       which Pyro's ELBOs ignore, since by default RoutedELBO enumerates it).
   Target: RoutedELBO <= 1.05x Trace_ELBO on (a).
2. Gradient variance on (b): total variance (sum over elements of the per-element variance
   over ``--draws`` draws) of the gradient w.r.t. the Bernoulli logits, per estimator and
   baseline, the reduction factor vs Trace_ELBO, seconds per draw, and the variance x cost
   product relative to Trace_ELBO (multi-particle rows cost more per draw); the last row is
   RoutedELBO's default route (enumeration) for comparison.
   Target: >= 10x below Trace_ELBO on the score route.

``--profile`` adds a cProfile of RoutedELBO vs Trace_ELBO steps on model (a).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment, format_table, median, sync, time_interleaved  # noqa: E402

from pyro_reparam_conv import RoutedELBO  # noqa: E402
from pyro_reparam_conv.layers import (  # noqa: E402
    ConvDecoder,
    ConvEncoder,
    GaussianConvHead,
    sample_elementwise_normal,
)

SEED = 0
TARGET_OVERHEAD = 1.05
TARGET_REDUCTION = 10.0


# ---------------------------------------------------------------------------- models
class ConvLatentModel:
    """(a) Pathwise only: x ~ N(decoder(z), 0.1), z ~ N(0, 1) of shape (4, 16, 16) per image."""

    def __init__(self, device, batch=8, latent_channels=4, hidden=16, size=32):
        torch.manual_seed(SEED)
        self.latent_shape = (latent_channels, size // 2, size // 2)
        self.decoder = ConvDecoder(latent_channels, 1, hidden, num_upsamples=1).to(device)
        self.guide_net = nn.ModuleDict(
            {
                "encoder": ConvEncoder(1, hidden, num_downsamples=1),
                "head": GaussianConvHead(hidden, latent_channels),
            }
        ).to(device)
        gen = torch.Generator().manual_seed(SEED)
        self.data = torch.randn(batch, 1, size, size, generator=gen).to(device)
        self.zeros = torch.zeros(self.latent_shape, device=device)
        self.args = (self.data,)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("batch", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(self.zeros, 1.0).to_event(3))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.1).to_event(3), obs=x)

    def guide(self, x):
        pyro.module("guide_net", self.guide_net)
        with pyro.plate("batch", x.shape[0], dim=-1):
            mean, var = self.guide_net["head"](self.guide_net["encoder"](x))
            sample_elementwise_normal("z", mean, var)


class BernoulliModel:
    """(b) Score sites: c_i ~ Bernoulli(1/2), mu ~ N(0, 1), x_i ~ N(mu + 2 c_i - 1, 1).

    ``estimator`` is the guide site's ``infer["estimator"]`` (None: RoutedELBO's default)."""

    def __init__(self, device, n=50, estimator=None):
        self.n = n
        self.infer = {"estimator": estimator} if estimator else {}
        gen = torch.Generator().manual_seed(SEED)
        self.data = (torch.randn(n, generator=gen) + 1.0).to(device)
        self.device = device
        self.args = (self.data,)

    @property
    def logits(self) -> torch.Tensor:
        return pyro.param("logits").unconstrained()

    def model(self, x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("N", self.n, dim=-1):
            c = pyro.sample("c", dist.Bernoulli(x.new_full((), 0.5)))
            pyro.sample("x", dist.Normal(mu + 2 * c - 1, 1.0), obs=x)

    def guide(self, x):
        logits = pyro.param("logits", lambda: torch.linspace(-1.0, 1.0, self.n, device=self.device))
        m = pyro.param("m", lambda: torch.tensor(0.5, device=self.device))
        with pyro.plate("N", self.n, dim=-1):
            pyro.sample("c", dist.Bernoulli(logits=logits), infer=self.infer)
        pyro.sample("mu", dist.Normal(m, 0.5))


# ------------------------------------------------------------------------ estimators
def fast_path_supported() -> bool:
    try:
        RoutedELBO(fast_path=False)
    except TypeError:
        return False
    return True


def timing_estimators(reparameterized: bool) -> dict[str, callable]:
    rows = {
        "Trace_ELBO": lambda: Trace_ELBO(max_plate_nesting=1),
        "TraceGraph_ELBO": lambda: TraceGraph_ELBO(max_plate_nesting=1),
    }
    if reparameterized:  # TraceMeanField_ELBO refuses score sites
        rows["TraceMeanField_ELBO"] = lambda: TraceMeanField_ELBO(max_plate_nesting=1)
    rows["RoutedELBO"] = lambda: RoutedELBO(max_plate_nesting=1)
    if fast_path_supported():
        rows["RoutedELBO(fast_path=False)"] = lambda: RoutedELBO(
            max_plate_nesting=1, fast_path=False
        )
    return rows


def zero_grads():
    """What an optimizer's zero_grad does for every Pyro param (module params included)."""
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None


def step_fn(elbo, problem):
    def step():
        elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
        zero_grads()

    return step


# ----------------------------------------------------------------------------- timing
def timing_table(problem, label, device, repeats, warmup, reparameterized):
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    fns = {
        name: step_fn(make(), problem) for name, make in timing_estimators(reparameterized).items()
    }
    times = time_interleaved(fns, repeats=repeats, warmup=warmup, device=device)
    base = median(times["Trace_ELBO"])
    base_min = min(times["Trace_ELBO"])
    rows, ratios = [], {}
    for name, ts in times.items():
        ratios[name] = median(ts) / base
        q1, q3 = sorted(ts)[len(ts) // 4], sorted(ts)[(3 * len(ts)) // 4]
        rows.append(
            [
                name,
                f"{1e3 * median(ts):.2f}",
                f"{1e3 * q1:.2f}-{1e3 * q3:.2f}",
                f"{ratios[name]:.3f}x",
                f"{1e3 * min(ts):.2f}",
                f"{min(ts) / base_min:.3f}x",
            ]
        )
    print(f"\n{label}")
    headers = ["estimator", "ms/step (median)", "IQR ms", "vs Trace_ELBO", "min ms", "min vs Trace"]
    print(format_table(headers, rows))
    return ratios


# --------------------------------------------------------------------------- variance
def draw_logit_grads(elbo, problem, num_draws):
    """``num_draws`` gradient estimates of the loss w.r.t. the logits, and seconds per draw."""
    draws = []
    sync(problem.data.device)
    start = time.perf_counter()
    for _ in range(num_draws):
        zero_grads()
        elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
        draws.append(problem.logits.grad.detach().clone())
    sync(problem.data.device)
    seconds = (time.perf_counter() - start) / num_draws
    zero_grads()
    return torch.stack(draws), seconds


def variance_table(problem, default_problem, draws, avg_warmup, timing_repeats):
    """Rows on ``problem`` (score route forced) and one on ``default_problem`` (default route)."""
    vec = dict(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    rows_spec = [
        ("Trace_ELBO", 1, lambda: Trace_ELBO(max_plate_nesting=1), 0),
        ("TraceGraph_ELBO (no baseline)", 1, lambda: TraceGraph_ELBO(max_plate_nesting=1), 0),
        ("RoutedELBO(baseline=None)", 1, lambda: RoutedELBO(max_plate_nesting=1, baseline=None), 0),
        (
            "RoutedELBO(baseline='avg')",
            1,
            lambda: RoutedELBO(max_plate_nesting=1, baseline="avg"),
            avg_warmup,
        ),
        ("RoutedELBO(4 vec, baseline=None)", 4, lambda: RoutedELBO(baseline=None, **vec), 0),
        ("RoutedELBO(4 vec, baseline='loo')", 4, lambda: RoutedELBO(baseline="loo", **vec), 0),
    ]
    rows_spec = [(name, n, make, warm, problem) for name, n, make, warm in rows_spec]
    default = ("RoutedELBO(), default route", 1, lambda: RoutedELBO(max_plate_nesting=1), 0)
    rows_spec.append((*default, default_problem))
    results, elbos, problems = [], {}, {}
    for name, particles, make, warm, problem in rows_spec:
        pyro.clear_param_store()
        pyro.set_rng_seed(SEED)
        elbo = make()
        if warm:  # fill the decaying average; parameters are never updated
            draw_logit_grads(elbo, problem, warm)
        grads, _ = draw_logit_grads(elbo, problem, draws)
        var = grads.double().var(0).sum().item()
        results.append([name, particles, var, None, grads.double().mean(0)])
        elbos[name], problems[name] = elbo, problem
    # seconds per draw: interleaved rounds after the draws (sequential wall-clock per row
    # would charge whichever row ran while the machine was busy)
    times = time_interleaved(
        {name: step_fn(elbo, problems[name]) for name, elbo in elbos.items()},
        repeats=timing_repeats,
        warmup=2,
        device=default_problem.data.device,
    )
    for row in results:
        row[3] = median(times[row[0]])
    base_var, base_sec = results[0][2], results[0][3]
    base_mean = results[0][4]
    rows, reductions = [], {}
    for name, particles, var, seconds, mean in results:
        reductions[name] = base_var / var
        # agreement of the mean gradient with Trace_ELBO's: the L2 distance of the two mean
        # gradients over its standard error (about 1 or less for unbiased estimators)
        se = ((base_var + var) / draws) ** 0.5
        rows.append(
            [
                name,
                particles,
                f"{var:.4g}",
                f"{reductions[name]:.1f}x",
                f"{1e3 * seconds:.2f}",
                f"{(var * seconds) / (base_var * base_sec):.3f}",
                "-" if var == base_var else f"{(mean - base_mean).norm().item() / se:.2f}",
            ]
        )
    print(
        f"\n2. Gradient variance on (b), N={problem.n}: total variance of d(loss)/d(logits) over "
        f"{draws} draws (sum of per-element variances); 'avg' after {avg_warmup} warm-up steps"
    )
    print(
        format_table(
            [
                "estimator",
                "particles",
                "total var",
                "reduction vs Trace",
                "ms/draw (median)",
                "var x cost vs Trace",
                "|mean - Trace mean| / s.e.",
            ],
            rows,
        )
    )
    print(
        "note: multi-particle rows average 4 particles per draw and cost more per draw; "
        "'var x cost vs Trace' = (variance x seconds per draw) / Trace_ELBO's, lower is better "
        "(the variance of an equal-time average of draws, relative to Trace_ELBO's)."
    )
    print(
        f"note: relative standard error of each variance ~ sqrt(2/{draws}) = "
        f"{100 * (2 / draws) ** 0.5:.0f}% (Gaussian); '|mean - Trace mean| / s.e.' is the L2 "
        "distance of the mean gradient from Trace_ELBO's over sqrt((var + var_Trace) / draws): "
        "about 1 or less when both are unbiased (rows share seeds, so often less)."
    )
    return reductions


# --------------------------------------------------------------------------- profiling
def profile_conv(problem, steps=30, top=18):
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    for name, elbo in (
        ("Trace_ELBO", Trace_ELBO(max_plate_nesting=1)),
        ("RoutedELBO", RoutedELBO(max_plate_nesting=1)),
    ):
        step = step_fn(elbo, problem)
        for _ in range(5):
            step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
        print(f"\n--- cProfile, {steps} steps of {name} on (a), sorted by cumulative time ---")
        print(out.getvalue())


# -------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=100, help="timed steps per estimator")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per estimator")
    parser.add_argument("--draws", type=int, default=400, help="gradient draws per variance row")
    parser.add_argument(
        "--avg-warmup", type=int, default=100, help="steps to fill the decaying average"
    )
    parser.add_argument("--n", type=int, default=50, help="plate size of model (b)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: with 2 OpenMP threads on a shared 2-core machine "
        "any concurrent process makes small convolutions ~40x slower and the timings noise)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile RoutedELBO vs Trace_ELBO on (a)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    print("routing_overhead: RoutedELBO vs Trace_ELBO / TraceGraph_ELBO")
    for line in environment(device):
        print(line)
    print(f"pyro validation enabled: {pyro.infer.util.is_validation_enabled()}")
    print(f"RoutedELBO fast_path option: {'yes' if fast_path_supported() else 'no'}")
    print(f"repeats={args.repeats} warmup={args.warmup} draws={args.draws} seed={SEED}")

    conv = ConvLatentModel(device)
    bern = BernoulliModel(device, n=args.n, estimator="score")
    bern_default = BernoulliModel(device, n=args.n)

    print("\n1. Time per step (loss_and_grads + zero grads), median of interleaved rounds")
    ratios_a = timing_table(
        conv,
        "(a) pathwise-only conv model: B=8, x 1x32x32, z 4x16x16 (plate over batch)",
        device,
        args.repeats,
        args.warmup,
        reparameterized=True,
    )
    timing_table(
        bern,
        f"(b) score model: Bernoulli per plate element (N={args.n}, score route) + Normal "
        "global latent",
        device,
        args.repeats,
        args.warmup,
        reparameterized=False,
    )
    print(
        "note: a wide IQR means other processes shared the CPU during the run; the 'min' columns "
        "are the least disturbed steps. fast_path (if present) uses the analytic KL at "
        "pathwise sites with a matching prior, as TraceMeanField_ELBO does."
    )
    ratio = ratios_a["RoutedELBO"]
    print(
        f"\ntarget: RoutedELBO <= {TARGET_OVERHEAD:.2f}x Trace_ELBO on (a): "
        f"{'MET' if ratio <= TARGET_OVERHEAD else 'NOT MET'} ({ratio:.3f}x)"
    )

    reductions = variance_table(bern, bern_default, args.draws, args.avg_warmup, args.repeats)
    route = RoutedELBO(max_plate_nesting=1)
    route.loss_and_grads(bern_default.model, bern_default.guide, *bern_default.args)
    print(f"default route of c: {route.routes['c'].estimator} ({route.routes['c'].reason})")
    pyro.clear_param_store()
    score_rows = {k: v for k, v in reductions.items() if k.startswith("RoutedELBO(b")}
    score_rows.update({k: v for k, v in reductions.items() if k.startswith("RoutedELBO(4")})
    best = max((v, k) for k, v in score_rows.items())
    print(
        f"\ntarget: >= {TARGET_REDUCTION:.0f}x below Trace_ELBO: "
        f"{'MET' if best[0] >= TARGET_REDUCTION else 'NOT MET'} "
        f"(best: {best[1]} at {best[0]:.1f}x; "
        + ", ".join(f"{k}: {v:.1f}x" for k, v in score_rows.items())
        + ")"
    )

    if args.profile:
        profile_conv(conv)
    print(f"\ntotal time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
