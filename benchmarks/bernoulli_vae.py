"""Bernoulli VAEs on dynamically binarized Fashion-MNIST: the discrete-estimator yardstick.

The protocol of DisARM (Dong, Mnih & Tucker, NeurIPS 2020), reused by ARMS (Dimitriev &
Zhou 2021), double control variates (Titsias & Shi 2022) and RODEO (Shi et al. 2022): a VAE
with 200 Bernoulli latents (:class:`~pyro_reparam_conv.models.BernoulliVAE`, linear
784-200-784 or nonlinear with two hidden layers of 200 LeakyReLU(0.3) units), batches of
50 dynamically binarized images, Adam at 1e-4, every estimator at an equal number of model
evaluations per step (``--evaluations``, 2 and 4). Rows, each trained from the same
initialization on the same batches:

- ``auto``: :class:`~pyro_reparam_conv.RoutedELBO`'s own choice (``infer={"evaluations": K}``
  only says how many evaluations the site may use);
- ``disarm`` (K/2 antithetic pairs), ``arms``, ``double_cv``, ``rodeo`` (discrete Stein
  control variates), ``loo`` (leave-one-out REINFORCE): the site's
  ``infer={"estimator": name, "evaluations": K}`` (``arms`` with
  K = 2 is DisARM, so it is run at K >= 3 only);
- ``gumbel_st``: straight-through Gumbel-softmax, K vectorized particles (BIASED);
- ``pyro TraceGraph_ELBO``: Pyro's own, K vectorized particles, its decaying-average baseline.

Reported per architecture and K: the training ELBO (10 draws per image on a fixed set of
training images, fixed binarization) at every ``--eval-every`` steps, the 100-sample
importance-weighted test bound (fixed binarization), the variance of the encoder's gradient
(sum over its parameters of the per-element variance of ``--var-draws`` estimates on one
fixed batch, after ``var_draws / 2`` draws that warm up the decaying-average baselines) at
fixed parameters (those the ``auto`` row reached at the end, the same for every row), and
the median seconds per step measured round-robin after training (``--timing-rounds``
rounds of one step of every row of one K, so that a shared machine's load falls on all rows
alike; ratios to DisARM's at the same K). storchastic's rows come from
``_storchastic_vae.py``, run in a venv of its own (``pip install --no-deps storchastic
entmax`` over the project's torch), and join the table with ``--render ... --peers``.

Fashion-MNIST comes from Debian's package: ``apt-get install dataset-fashion-mnist``.
Usage (one torch thread)::

    OMP_NUM_THREADS=1 python benchmarks/bernoulli_vae.py --steps 100 --eval-every 50 \\
        --train-eval 200 --test-size 200 --var-draws 10 --out /tmp/smoke   # ~2 minutes
    OMP_NUM_THREADS=1 python benchmarks/bernoulli_vae.py --arch linear --out /tmp/linear &
    OMP_NUM_THREADS=1 python benchmarks/bernoulli_vae.py --arch nonlinear --out /tmp/nonlinear
    # 8000 steps: about 19 and 26 minutes side by side on two cores; join the two JSON
    # lists into one file and --render it

writes ``OUT.md`` (the table), ``OUT.png`` (the curves) and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, TraceGraph_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyro_reparam_conv import RoutedELBO  # noqa: E402
from pyro_reparam_conv.data import binarize, binarized_batches, load_fashion_mnist  # noqa: E402
from pyro_reparam_conv.models import BernoulliVAE  # noqa: E402

ESTIMATORS = ("auto", "disarm", "arms", "double_cv", "rodeo", "loo", "gumbel_st", "tracegraph")
BIASED = {"gumbel_st"}


@dataclass
class Run:
    """One row: an estimator at K evaluations on one architecture."""

    arch: str
    estimator: str
    evaluations: int
    steps: list = field(default_factory=list)
    train_elbo: list = field(default_factory=list)
    test_bound: float = float("nan")
    grad_variance: float = float("nan")
    seconds_per_step: float = float("nan")
    seconds_fast: float = float("nan")
    route: str = ""

    @property
    def label(self) -> str:
        names = {"tracegraph": "pyro TraceGraph_ELBO", "gumbel_st": "gumbel_st (BIASED)"}
        return names.get(self.estimator, self.estimator)


def make_elbo(estimator: str, k: int):
    """``(elbo, b_infer)`` for one row."""
    if estimator == "tracegraph":
        elbo = TraceGraph_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        return elbo, {"baseline": {"use_decaying_avg_baseline": True}}
    if estimator == "gumbel_st":
        elbo = RoutedELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        return elbo, {"estimator": "gumbel_st"}
    infer = {"evaluations": k}
    if estimator != "auto":
        infer["estimator"] = estimator
    return RoutedELBO(max_plate_nesting=1), infer


def learning_rate(name: str, param) -> dict:
    """The networks' 1e-4; the estimators' own params (double_cv's coefficient, rodeo's a, b
    and network) 1e-1: they have to follow a model that changes. In 2000-step pilots on the
    linear VAE at K = 2, rodeo's ELBO at 1e-1 led those at 3e-2, 1e-2 and the paper's 1e-3
    at every reported step (-306.9, -307.7, -308.8, -311.9 at step 2000), double_cv's at
    1e-1 led 1e-2 (-305.6 against -307.8)."""
    return {"lr": 1e-1 if estimator_param(name) else 1e-4}


def estimator_param(name: str) -> bool:
    """Whether param ``name`` is an estimator's own (not the networks': PyroModule's names
    have ``$$$`` in them)."""
    return name.endswith("$double_cv") or "$rodeo." in name


def encoder_gradients(vae, elbo, x) -> torch.Tensor:
    params = list(vae.encoder.parameters())
    for p in params:
        p.grad = None
    elbo.loss_and_grads(vae.model, vae.guide, x)
    return torch.cat([p.grad.reshape(-1) for p in params]).clone()


def train(run: Run, args, data, init_state) -> dict:
    """Train one row; returns the final param-store state."""
    train_x, mean, fixed_train, test_x = data
    pyro.clear_param_store()
    elbo, infer = make_elbo(run.estimator, run.evaluations)
    vae = BernoulliVAE(run.arch, mean, b_infer=infer)
    vae.load_state_dict(init_state)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam(learning_rate), elbo)
    torch.manual_seed(args.seed + 1)
    seconds = []
    batches = binarized_batches(train_x, args.batch, args.seed, args.steps)
    for step, x in enumerate(batches, 1):
        start = time.perf_counter()
        svi.step(x)
        seconds.append(time.perf_counter() - start)
        if step == 1 and hasattr(elbo, "routes"):
            run.route = str(elbo.routes["b"])
        if step % args.eval_every == 0 or step == args.steps:
            run.steps.append(step)
            run.train_elbo.append(float(vae.log_weights(fixed_train, 10).mean()))
    run.seconds_per_step = float(torch.tensor(seconds).median())  # robust to a shared CPU
    run.test_bound = float(torch.cat([vae.bound(t, 100) for t in test_x.split(500)]).mean())
    print(f"{run.arch:9s} K={run.evaluations} {run.label:22s} train ELBO {run.train_elbo[-1]:9.2f}"
          f"  test bound {run.test_bound:9.2f}  {1e3 * run.seconds_per_step:6.1f} ms/step",
          flush=True)  # fmt: skip
    store = pyro.get_param_store()
    own = {k: v.detach().clone() for k, v in store.items() if estimator_param(k)}
    if own:
        print("   the estimator's own coefficients at the end:",
              {k: round(float(v), 4) for k, v in own.items() if v.dim() == 0})  # fmt: skip
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}, own


def variance_at(run: Run, args, state, own, x) -> None:
    """The encoder's gradient variance at the parameters ``state`` (the estimator's own
    params, the control variates' coefficients and networks, as its run left them); the
    first ``var_draws // 2`` draws only warm up decaying-average baselines."""
    pyro.clear_param_store()
    for name, value in own.items():
        pyro.param(name, value.clone())
    elbo, infer = make_elbo(run.estimator, run.evaluations)
    vae = BernoulliVAE(run.arch, b_infer=infer)
    vae.load_state_dict(state)
    torch.manual_seed(args.seed + 2)
    for _ in range(args.var_draws // 2):
        encoder_gradients(vae, elbo, x)
    grads = torch.stack([encoder_gradients(vae, elbo, x) for _ in range(args.var_draws)])
    run.grad_variance = float(grads.var(0).sum())


def interleaved_timing(mine: list[Run], args, data, init) -> None:
    """Seconds per step of each row, measured round-robin: ``--timing-rounds`` rounds of one
    step of every row of one K, in rotated order, after a warm-up round, so that the load of
    a shared machine falls on every row alike. Each row's median replaces its training-time
    median (``seconds_per_step``), its 10th percentile (the least disturbed steps) is kept as
    ``seconds_fast``. One model serves every row (its ``b_infer`` set per row): only the cost
    is measured."""
    train_x = data[0]
    pyro.clear_param_store()
    vae = BernoulliVAE(mine[0].arch, data[1])
    vae.load_state_dict(init)
    setups = []
    for run in mine:
        elbo, infer = make_elbo(run.estimator, run.evaluations)
        setups.append((run, infer, SVI(vae.model, vae.guide, pyro.optim.Adam(learning_rate), elbo)))
    g = torch.Generator().manual_seed(args.seed + 5)
    times: dict = {id(run): [] for run in mine}
    for round_ in range(args.timing_rounds + 3):
        turn = round_ % len(setups)  # rotated: no row always follows the same one
        x = binarize(train_x[torch.randint(len(train_x), (args.batch,), generator=g)], g)
        for run, infer, svi in setups[turn:] + setups[:turn]:
            vae.b_infer = infer
            start = time.perf_counter()
            svi.step(x)
            if round_ >= 3:
                times[id(run)].append(time.perf_counter() - start)
    for run in mine:
        t = torch.tensor(times[id(run)])
        run.seconds_per_step, run.seconds_fast = float(t.median()), float(t.quantile(0.1))


def load(args):
    train_x, _ = load_fashion_mnist("train", args.data)
    test_x, _ = load_fashion_mnist("test", args.data)
    g = torch.Generator().manual_seed(args.seed + 3)
    fixed_train = binarize(train_x[torch.randperm(len(train_x), generator=g)[: args.train_eval]], g)
    test = binarize(test_x[: args.test_size], g)
    return train_x, train_x.mean(0), fixed_train, test


def rows(args) -> list[Run]:
    found = []
    for arch in args.arch:
        for k in args.evaluations:
            for estimator in args.estimators:
                if estimator == "arms" and k == 2:
                    continue  # ARMS with 2 draws is DisARM
                if estimator == "disarm" and k % 2:
                    continue
                found.append(Run(arch, estimator, k))
    return found


def markdown(runs: list[Run], args) -> str:
    lines = [
        f"Bernoulli VAE (200 latents), dynamically binarized Fashion-MNIST, batch {args.batch}, "
        f"Adam 1e-4, {args.steps} steps, seed {args.seed}; training ELBO on {args.train_eval} "
        f"fixed training images (10 draws each), test bound: 100-sample IWAE on "
        f"{args.test_size} test images; encoder gradient variance: {args.var_draws} draws on "
        "one fixed batch at the auto row's final parameters; time per step relative to "
        f"DisARM at the same K, median and 10th percentile of {args.timing_rounds} "
        "interleaved rounds of one step of each row.",
        "",
    ]
    steps = runs[0].steps
    head = ["arch", "K", "estimator", *[f"ELBO @{s}" for s in steps], "test bound",
            "enc. grad var", "var / disarm", "time / disarm", "fastest 10%: time / disarm"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        ref = next((r for r in runs if r.arch == run.arch and r.evaluations == run.evaluations
                    and r.estimator == "disarm"), None)  # fmt: skip
        cells = [run.arch, str(run.evaluations), run.label]
        cells += [f"{v:.2f}" for v in run.train_elbo]
        cells += [f"{run.test_bound:.2f}", f"{run.grad_variance:.4g}"]
        ratios = [(run.grad_variance, "grad_variance"), (run.seconds_per_step,
                  "seconds_per_step"), (run.seconds_fast, "seconds_fast")]  # fmt: skip
        cells += [f"{v / getattr(ref, k):.2f}" if ref and v == v else "-" for v, k in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(goal_check(runs)) + "\n"


def goal_check(runs: list[Run]) -> list[str]:
    """Per (architecture, K): the automatic route's smallest margin over the steps against
    the best unbiased single estimator and against DisARM (training ELBO; >= 0 meets the
    goal), and its time per step over DisARM's (<= 1.2 meets it)."""
    lines = []
    for arch, k in sorted({(r.arch, r.evaluations) for r in runs}):
        mine = {r.estimator: r for r in runs if (r.arch, r.evaluations) == (arch, k)}
        auto, disarm = mine.get("auto"), mine.get("disarm")
        others = [r for e, r in mine.items() if e not in BIASED | {"auto"}]
        if auto is None or not others:
            continue
        best = [max(r.train_elbo[i] for r in others) for i in range(len(auto.steps))]
        who = [max(others, key=lambda r: r.train_elbo[i]).estimator for i in range(len(best))]
        margin = min(a - b for a, b in zip(auto.train_elbo, best))
        text = (f"- {arch}, K={k}: auto is {auto.route.split(' (')[0].split(': ')[-1]}; "
                f"smallest margin of auto over the best unbiased row at a reported step "
                f"{margin:+.2f} nats (best rows by step: {', '.join(who)})")  # fmt: skip
        if disarm is not None:
            vs = min(a - b for a, b in zip(auto.train_elbo, disarm.train_elbo))
            ratio = auto.seconds_per_step / disarm.seconds_per_step
            text += f"; over DisARM {vs:+.2f} nats; time per step {ratio:.2f}x DisARM's"
        lines.append(text)
    return lines


def timing_markdown(runs: list[Run], args) -> str:
    lines = [f"Seconds per step, {args.timing_rounds} interleaved rounds of one step of each "
             "row (one torch thread): the median, and the ratio to DisARM's at the same K "
             "(median; 10th percentile, the least disturbed steps):", "",
             "| arch | K | estimator | ms / step | time / disarm | fastest 10%: time / disarm |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        ref = next((r for r in runs if r.arch == run.arch and r.evaluations == run.evaluations
                    and r.estimator == "disarm"), run)  # fmt: skip
        lines.append(f"| {run.arch} | {run.evaluations} | {run.label} | "
                     f"{1e3 * run.seconds_per_step:.2f} | "
                     f"{run.seconds_per_step / ref.seconds_per_step:.2f} | "
                     f"{run.seconds_fast / ref.seconds_fast:.2f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], args, path: Path) -> None:
    """Top row: the training ELBO per panel (architecture, K); bottom row: the same less
    DisARM's at the same K, where the estimators' differences show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.arch, r.evaluations) for r in runs})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.5), squeeze=False)
    peers = sorted({r.estimator for r in runs} - set(ESTIMATORS))  # storchastic's rows
    colors = {e: f"C{i}" for i, e in enumerate(ESTIMATORS + tuple(peers))}
    for col, (arch, k) in enumerate(panels):
        mine = [r for r in runs if (r.arch, r.evaluations) == (arch, k)]
        ref = next((r for r in mine if r.estimator == "disarm"), None)
        near = []  # the bottom row's scale: every row but Pyro's (far below; see the table)
        for run in mine:
            style = ":" if run.estimator in BIASED else "-"
            auto = run.estimator == "auto"
            kw = dict(color=colors[run.estimator], lw=4 if auto else 1.3, alpha=0.45 if auto else 1,
                      zorder=1 if auto else 2, ls=style, marker="o", ms=3,
                      label=run.label)  # fmt: skip
            axes[0, col].plot(run.steps, run.train_elbo, **kw)
            if ref is not None:
                diff = [a - b for a, b in zip(run.train_elbo, ref.train_elbo)]
                axes[1, col].plot(run.steps, diff, **kw)
                near += diff if run.estimator != "tracegraph" else []
        if near:
            pad = 0.1 * (max(near) - min(near)) + 0.1
            axes[1, col].set_ylim(min(near) - pad, max(near) + pad)
        axes[0, col].set_title(f"{arch}, {k} evaluations per step")
        axes[0, col].set_ylabel("training ELBO (nats)")
        axes[1, col].set_ylabel("training ELBO - DisARM's (nats)\n(Pyro's TraceGraph off scale)")
        axes[1, col].axhline(0.0, color="k", lw=0.6)
        for ax in axes[:, col]:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.suptitle("Bernoulli VAE (200 latents) on dynamically binarized Fashion-MNIST "
                 "(gumbel_st dotted: biased)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--arch", nargs="+", default=["linear", "nonlinear"])
    parser.add_argument("--evaluations", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--train-eval", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--var-draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-rounds", type=int, default=200,
                        help="rounds of interleaved timing (0: time the training steps)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the interleaved timing (no training): the time column")
    parser.add_argument("--data", default=None, help="folder of the idx files (default: Debian's)")
    parser.add_argument("--out", default="benchmarks/results/bernoulli_vae")
    parser.add_argument("--render", default=None,
                        help="only render OUT.md and OUT.png from this JSON of a run "
                             "(with the run's own options, for the table's header)")
    parser.add_argument("--peers", nargs="*", default=None,
                        help="with --render: rows of _storchastic_vae.py to add")
    parser.add_argument("--timing-from", default=None,
                        help="with --render: the time columns from a --timing-only run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        runs = [Run(**r) for r in json.loads(Path(args.render).read_text())]
        args.steps = runs[0].steps[-1]  # the other options: pass the run's own
        if args.timing_from:  # the time columns from a --timing-only run
            timed = {(r["arch"], r["evaluations"], r["estimator"]): r
                     for r in json.loads(Path(args.timing_from).read_text())}  # fmt: skip
            for run in runs:
                t = timed.get((run.arch, run.evaluations, run.estimator))
                if t is not None:
                    run.seconds_per_step = t["seconds_per_step"]
                    run.seconds_fast = t["seconds_fast"]
        for path in args.peers or ():  # storchastic's rows (_storchastic_vae.py), timed apart
            peers = [Run(**r) for r in json.loads(Path(path).read_text())]
            for run in peers:
                run.seconds_per_step = run.seconds_fast = float("nan")  # another process
            runs += [r for r in peers if r.steps == runs[0].steps]
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(runs, args))
        plot(runs, args, out.with_suffix(".png"))
        print(markdown(runs, args))
        return
    torch.set_num_threads(1)
    data = load(args)
    runs = rows(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    var_x = binarize(data[0][: args.batch], torch.Generator().manual_seed(args.seed + 4))
    for arch in args.arch:
        torch.manual_seed(args.seed)
        init = {k: v.clone() for k, v in BernoulliVAE(arch, data[1]).state_dict().items()}
        mine = [r for r in runs if r.arch == arch]
        if args.timing_only:
            for k in args.evaluations:  # Pyro's baseline averages have the particles' shape
                interleaved_timing([r for r in mine if r.evaluations == k], args, data, init)
            continue
        finals = {(run.estimator, run.evaluations): train(run, args, data, init) for run in mine}
        auto = [state for (e, _), (state, _) in finals.items() if e == "auto"]
        reference = (auto or [state for state, _ in finals.values()])[0]
        for run in mine:
            own = finals[(run.estimator, run.evaluations)][1]
            variance_at(run, args, reference, own, var_x)
        for k in args.evaluations if args.timing_rounds else ():
            interleaved_timing([r for r in mine if r.evaluations == k], args, data, init)
        out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    if args.timing_only:
        table = timing_markdown(runs, args)
        out.with_suffix(".md").write_text(table)
        out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
        print(table)
        return
    table = markdown(runs, args)
    out.with_suffix(".md").write_text(table)
    plot(runs, args, out.with_suffix(".png"))
    print(table)
    print(f"command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
