"""Issue 12 benchmark: gradient estimators for discrete sites, side by side, and the table
behind the automatic choice.

Run (about a minute on a 2-core CPU)::

    .venv/bin/python benchmarks/discrete_estimators.py [--draws 2000] [--seed 0]
        [--storch-python PATH]

1. The Bernoulli toy of storchastic's ``examples/bernoulli_toy.py`` (after Yin & Zhou 2019;
   Tucker et al. 2017 use t = 0.499): ``b ~ Bernoulli(sigmoid(eta))``, ``eta = 0``, four
   dims, minimize ``E[sum_i (b_i - t_i)^2]`` with ``t = (0.49, 0.499, 0.501, 0.51)``. The
   exact gradient is ``d/d eta_i = sigmoid'(0) (1 - 2 t_i)``. Every estimator spends two
   model evaluations per estimate where it can (two particles, the antithetic pair, the two
   values of the enumeration); per estimator the table gives the largest |mean - exact| in
   standard errors, the total variance, the SNR (|exact| / sd, averaged over the dims) and
   the time per estimate. Plain Pyro (``Trace_ELBO``, ``TraceEnum_ELBO``) and storchastic
   (run in its own process: importing it patches torch) are in the same table.
2. What enumeration costs: a Categorical site of ``K`` values per data point whose value
   feeds an MLP decoder; per ``K``, the time per step of the exact sum against the score
   function (one particle, decaying average) and the score function's gradient variance.
   The default ``RoutedELBO(max_enumerate=16)`` comes from this table (see the printout).

Timings use one torch thread (``torch.set_num_threads(1)``); the machine is shared, so
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import environment, format_table  # noqa: E402

from pyro_reparam_conv import RoutedELBO  # noqa: E402

T = torch.tensor([0.49, 0.499, 0.501, 0.51])
EXACT = 0.25 * (1 - 2 * T)  # sigmoid'(0) (1 - 2 t)


# --------------------------------------------------------------------------- the toy
def toy_model(eta):
    with pyro.plate("dims", 4):
        # prior = q, so log p - log q = 0 and the loss is E[(b - t)^2] alone
        b = pyro.sample("b", dist.Bernoulli(logits=eta.detach()))
        pyro.factor("cost", -((b - T) ** 2))


def toy_guide(eta, infer=None):
    with pyro.plate("dims", 4):
        pyro.sample("b", dist.Bernoulli(logits=eta), infer=dict(infer or {}))


def joint_model(eta):
    b = pyro.sample("b", dist.Bernoulli(logits=eta.detach()).to_event(1))
    pyro.factor("cost", -((b - T) ** 2).sum(-1))


def joint_guide(eta, infer=None):
    pyro.sample("b", dist.Bernoulli(logits=eta).to_event(1), infer=dict(infer or {}))


def pyro_rows():
    """label -> (elbo, model, guide, evaluations per estimate)."""
    score = {"estimator": "score"}
    st = {"estimator": "gumbel_st"}
    return {
        "RoutedELBO enumerate (default here)": (RoutedELBO(), toy_model, toy_guide, 2),
        "RoutedELBO disarm, per dim": (
            RoutedELBO(), toy_model, lambda e: toy_guide(e, {"estimator": "disarm"}), 2),
        "RoutedELBO disarm, joint (to_event)": (RoutedELBO(), joint_model, joint_guide, 2),
        "RoutedELBO score, 2 particles, leave-one-out": (
            RoutedELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
            toy_model, lambda e: toy_guide(e, score), 2),
        "RoutedELBO score, 1 particle, decaying avg": (
            RoutedELBO(), toy_model, lambda e: toy_guide(e, score), 1),
        "RoutedELBO gumbel_st, 2 particles (biased)": (
            RoutedELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
            toy_model, lambda e: toy_guide(e, st), 2),
        "Pyro Trace_ELBO, 2 particles": (
            Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
            toy_model, toy_guide, 2),
        "Pyro TraceEnum_ELBO (parallel)": (
            TraceEnum_ELBO(max_plate_nesting=1), toy_model,
            config_enumerate(toy_guide, "parallel"), 2),
    }  # fmt: skip


def draw(elbo, model, guide, draws: int, seed: int):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    grads = []
    start = time.perf_counter()
    for _ in range(draws):
        eta = torch.zeros(4, requires_grad=True)
        loss = elbo.differentiable_loss(model, guide, eta)
        grads.append(torch.autograd.grad(loss, eta)[0])
    return torch.stack(grads), (time.perf_counter() - start) / draws


def toy_row(label, evaluations, mean, var, seconds, draws):
    mean, var = torch.as_tensor(mean), torch.as_tensor(var)
    se = (var / draws).sqrt()
    error = (mean - EXACT).abs()
    if bool((se == 0).all()):  # no variance: exact, or a bias of any size
        z = "exact" if bool((error < 1e-6).all()) else "inf"
    else:
        z = f"{(error / se.clamp_min(1e-12)).max().item():.1f}"
    snr = (EXACT.abs() / var.sqrt()).mean().item() if bool((var > 0).all()) else float("inf")
    return [
        label,
        evaluations,
        z,
        f"{var.sum().item():.3g}",
        f"{snr:.3g}",
        f"{1e3 * seconds:.2f}",
    ]


def storchastic_rows(python: str, draws: int, seed: int) -> tuple[list, str]:
    script = Path(__file__).resolve().parent / "_storchastic_toy.py"
    try:
        done = subprocess.run(
            [python, str(script), str(draws), str(seed)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as e:
        return [], f"storchastic not run ({type(e).__name__}: {e})"
    if "error" in result:
        return [], result["error"] + f" for {python}: `{python} -m pip install storchastic`"
    rows = []
    for label, r in result.items():
        evaluations = 16 if "Expect" in label else 2
        rows.append(toy_row(label, evaluations, r["mean"], r["var"], r["seconds"], draws))
    return rows, f"storchastic run with {python}"


# ------------------------------------------------------------ what enumeration costs
N, D, HIDDEN = 64, 64, 128


class MLPDecoder(torch.nn.Module):
    """(one-hot y, a code per data point) -> D outputs through one hidden layer: every data
    point's decoder sees every value of y."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(k, HIDDEN)
        self.register_buffer("code", torch.randn(N, HIDDEN))
        self.out = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(HIDDEN, D))

    def forward(self, one_hot):
        return self.out(self.embed(one_hot) + self.code)


class ConvDecoder(MLPDecoder):
    """(one-hot y, a code per data point) -> an 8 x 4 x 4 map -> the package's conv decoder
    -> an 8 x 8 image (D = 64)."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        from pyro_reparam_conv.layers import ConvDecoder as Body

        self.body = Body(HIDDEN // 16, 1, hidden_channels=32, num_upsamples=1)

    def forward(self, one_hot):
        h = self.embed(one_hot) + self.code
        lead = h.shape[:-1]
        return self.body(h.reshape(-1, HIDDEN // 16, 4, 4)).reshape(*lead, D)


def cost_model(data, k, encoder, decoder):
    with pyro.plate("N", N):
        y = pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(k)))
        pyro.sample("x", dist.Normal(decoder(y), 1.0).to_event(1), obs=data)


def cost_guide(data, k, encoder, decoder, infer=None):
    with pyro.plate("N", N):
        pyro.sample("y", dist.OneHotCategorical(logits=encoder(data)), infer=dict(infer or {}))


def enumeration_cost(decoder_class, ks, draws: int, seed: int):
    rows = []
    data = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
    for k in ks:
        torch.manual_seed(seed)
        decoder, encoder = decoder_class(k), torch.nn.Linear(D, k)
        results = {}
        for label, infer in (("enumerate", {}), ("score", {"estimator": "score"})):
            elbo = RoutedELBO(max_enumerate=max(ks), max_plate_nesting=1)
            guide = lambda *args, i=infer: cost_guide(*args, infer=i)  # noqa: E731
            grads = []
            for _ in range(5):  # first steps: tracking, checks, decaying average
                elbo.differentiable_loss(cost_model, guide, data, k, encoder, decoder)
            start = time.perf_counter()
            for _ in range(draws):
                loss = elbo.differentiable_loss(cost_model, guide, data, k, encoder, decoder)
                grads.append(torch.autograd.grad(loss, encoder.weight)[0].reshape(-1))
            seconds = (time.perf_counter() - start) / draws
            results[label] = (torch.stack(grads).var(0).sum().item(), seconds, elbo.routes["y"])
        var_s, sec_s, _ = results["score"]
        var_e, sec_e, route = results["enumerate"]
        assert route.estimator == "enumerate", route
        rows.append([
            k, f"{1e3 * sec_e:.2f}", f"{1e3 * sec_s:.2f}", f"{sec_e / sec_s:.2f}",
            f"{var_e:.3g}", f"{var_s:.3g}", f"{var_s * sec_s / sec_e:.3g}",
        ])  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=2000, help="gradient draws per toy row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--storch-python",
        default=sys.executable,
        help="python with storchastic installed (default: this one)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    print("\n".join(environment("cpu")))
    print(
        f"\n1. Bernoulli toy: eta = 0, t = {T.tolist()}, exact gradient {EXACT.tolist()}; "
        f"{args.draws} estimates per row\n"
    )
    rows = []
    for label, (elbo, model, guide, evaluations) in pyro_rows().items():
        grads, seconds = draw(elbo, model, guide, args.draws, args.seed)
        rows.append(toy_row(label, evaluations, grads.mean(0), grads.var(0), seconds, args.draws))
    more, note = storchastic_rows(args.storch_python, args.draws, args.seed)
    headers = ["estimator", "model evals", "max |bias|/se", "total var", "SNR", "ms/estimate"]
    print(format_table(headers, rows + more))
    print(f"({note}; max |bias|/se above ~4 is a bias, not noise)")

    ks = (2, 4, 8, 16, 32, 64)
    draws = max(50, args.draws // 20)
    print(
        f"\n2. What the exact sum costs: OneHotCategorical(K) per data point (N = {N}) into an "
        f"MLP decoder ({HIDDEN} hidden, {D} outputs); {draws} draws per cell; gradient "
        "variance of the encoder's weight (summed over elements)\n"
    )
    headers = ["K", "enumerate ms", "score ms", "time ratio", "enumerate var", "score var",
               "score var at enumerate's time"]  # fmt: skip
    ratios = {}
    for label, decoder_class in (("MLP decoder", MLPDecoder), ("conv decoder", ConvDecoder)):
        table = enumeration_cost(decoder_class, ks, draws, args.seed)
        ratios[label] = {row[0]: row[3] for row in table}
        print(f"{label}:\n{format_table(headers, table)}\n")
    print(
        "Enumeration has no variance for the site and costs K evaluations of what depends on "
        "it; the score function's variance stays far above 0 even given enumeration's time. "
        "The default max_enumerate=16 bounds that cost (time ratio at K = 16: "
        + ", ".join(f"{r[16]}x with the {label}" for label, r in ratios.items())
        + "); above it the score function with a baseline (DisARM for Bernoulli) is chosen."
    )


if __name__ == "__main__":
    main()
