"""Issue 25 benchmark: enumerated sites summed by variable elimination, side by side with
``TraceEnum_ELBO``.

Run (a few minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/enumeration.py [--pyro PATH/TO/pyro-checkout] [--quick]

1. HMM, ``T = 1000`` steps, ``K = 8`` states, enumerated in the model (``pyro.markov``):
   time per ``loss_and_grads`` step (medians of interleaved rounds, after a warm-up that
   includes ``RoutedELBO``'s first, provenance-tracked step, reported apart).
2. A ``pyro.markov`` chain enumerated in the *guide*, ``T = 30`` and ``50``, ``K = 2``
   (as Pyro's ``test_elbo_hmm_in_guide``; the chain of ``tests/test_enumeration_ve.py``,
   whose guide has transition probabilities of its own): time per step and peak resident memory of a
   process that runs only that ELBO (the chain was killed for memory at ``T = 30`` when
   every enumerated site had a dim of its own).
3. A Gaussian mixture with its assignments enumerated in the model: the mean of 200
   gradient draws w.r.t. ``locs`` against the exact gradient (the log marginal likelihood
   by ``logsumexp`` by hand, differentiated by autograd).
4. Pyro's ``examples/hmm.py`` (from ``--pyro``), unchanged but for ``TraceEnum_ELBO``
   swapped for ``RoutedELBO`` in its namespace, on synthetic chorales (the JSB data need a
   download): the losses of a short run, same seed, side by side.

Every row's numbers come from this run; one torch thread; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import pyro
import pyro.contrib.examples
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import environment, format_table, median, time_interleaved  # noqa: E402

from pyro_reparam_conv import RoutedELBO  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_enumeration_ve import chain_guide, chain_model  # noqa: E402  (the tested chain)

ELBOS = {"TraceEnum_ELBO": TraceEnum_ELBO, "RoutedELBO": RoutedELBO}


# ------------------------------------------------------------------ 1. model-side HMM
def hmm_model(data, k):
    trans = pyro.param("trans", torch.ones(k, k) / k + torch.eye(k),
                       constraint=dist.constraints.simplex)  # fmt: skip
    locs = pyro.param("locs", torch.arange(k).float())
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    x = 0
    for t in pyro.markov(range(len(data))):
        x = pyro.sample(f"x_{t}", dist.Categorical(trans[x]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(locs[x], scale), obs=data[t])


def scale_guide(data, k=None):
    pyro.sample("scale", dist.LogNormal(pyro.param("m", torch.tensor(0.2)), 0.3))


def model_hmm(steps: int, states: int, repeats: int) -> list:
    data = torch.randn(steps)
    elbos = {name: cls(max_plate_nesting=0) for name, cls in ELBOS.items()}
    first = {}
    for name, elbo in elbos.items():
        pyro.clear_param_store()
        start = time.perf_counter()
        elbo.loss_and_grads(hmm_model, scale_guide, data, states)
        first[name] = time.perf_counter() - start
    losses = {}

    def step(name):
        def run():
            pyro.set_rng_seed(0)
            losses[name] = elbos[name].loss_and_grads(hmm_model, scale_guide, data, states)
        return run

    times = time_interleaved({name: step(name) for name in elbos}, repeats, 1)
    base = median(times["TraceEnum_ELBO"])
    return [
        (f"HMM T={steps} K={states} in the model: {name}", f"{median(times[name]):.3f}",
         f"{median(times[name]) / base:.2f}x", f"{first[name]:.2f}", f"{losses[name]:.4f}")
        for name in elbos
    ]  # fmt: skip


# ------------------------------------------------------------- 2. guide-side chain
def chain_in_process(name: str, steps: int, repeats: int) -> dict:
    """One ELBO on the guide chain in this process: seconds per step, peak MB, loss."""
    torch.set_num_threads(1)
    data = torch.ones(steps)
    elbo = ELBOS[name]()
    pyro.clear_param_store()
    loss = elbo.loss_and_grads(chain_model, chain_guide, data)  # warm-up (tracked step)
    times = []
    for _ in range(repeats):
        pyro.clear_param_store()
        start = time.perf_counter()
        loss = elbo.loss_and_grads(chain_model, chain_guide, data)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": median(times), "peak_mb": peak, "loss": loss}


def guide_chain(steps: int, repeats: int) -> list:
    found = {}
    for name in ELBOS:  # a process each: peak memory is per process
        cmd = [sys.executable, __file__, "--chain", name, str(steps), str(repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        found[name] = json.loads(out.strip().splitlines()[-1])
    base = found["TraceEnum_ELBO"]
    return [
        (f"chain T={steps} K=2 in the guide: {name}", f"{r['seconds']:.3f}",
         f"{r['seconds'] / base['seconds']:.2f}x", f"{r['peak_mb']:.0f} MB",
         f"{r['loss']:.4f}")
        for name, r in found.items()
    ]  # fmt: skip


# -------------------------------------------------------------- 3. Gaussian mixture
DATA = torch.tensor([-2.1, -1.3, -0.2, 0.4, 2.2, 2.9, 3.5, 4.1])


@config_enumerate
def mixture(data):
    weights = pyro.param("weights", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(data)):
        a = pyro.sample("a", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[a], 1.0), obs=data)


def no_guide(data):
    pass


def exact_mixture_grad() -> torch.Tensor:
    locs = torch.tensor([-1.0, 1.0], requires_grad=True)
    weights = torch.tensor([0.4, 0.6])
    joint = weights.log() + dist.Normal(locs, 1.0).log_prob(DATA[:, None])
    loss = -joint.logsumexp(-1).sum()
    return torch.autograd.grad(loss, locs)[0]


def mixture_gradients(draws: int) -> list:
    rows = [("exact (logsumexp by hand)", exact_mixture_grad().tolist(), "", "")]
    for name, cls in ELBOS.items():
        grads = []
        for seed in range(draws):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            loss = cls(max_plate_nesting=1).differentiable_loss(mixture, no_guide, DATA)
            grads.append(torch.autograd.grad(loss, pyro.param("locs").unconstrained())[0])
        g = torch.stack(grads)
        err = (g.mean(0) - exact_mixture_grad()).abs().max().item()
        rows.append((name, g.mean(0).tolist(), f"{g.std(0).max().item():.2e}", f"{err:.1e}"))
    return [(n, "[" + ", ".join(f"{v:.4f}" for v in m) + "]", s, e) for n, m, s, e in rows]


# ------------------------------------------------------------ 4. examples/hmm.py
def synthetic_chorales(num_sequences=40, length=30, notes=88, seed=0):
    """Binary sequences shaped as ``poly.load_data(JSB_CHORALES)`` returns them."""
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        seqs = (torch.rand(n, length, notes, generator=gen) < 0.05).float()
        seqs[..., 40:52] = (torch.rand(n, length, 12, generator=gen) < 0.3).float()
        lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
        return {"sequences": seqs, "sequence_lengths": lengths}

    return {"train": split(num_sequences), "test": split(num_sequences // 2)}


def hmm_example(checkout: Path, model: str, steps: int) -> list:
    # the data loader needs torchvision and a download: a stand-in with the same interface
    loader = types.ModuleType("pyro.contrib.examples.polyphonic_data_loader")
    loader.JSB_CHORALES, loader.load_data = "jsb_chorales", lambda name: synthetic_chorales()
    sys.modules[loader.__name__] = loader
    pyro.contrib.examples.polyphonic_data_loader = loader
    spec = importlib.util.spec_from_file_location("pyro_hmm_example", checkout / "examples/hmm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = argparse.Namespace(
        model=model, num_steps=steps, batch_size=8, hidden_dim=16, nn_dim=48, nn_channels=2,
        learning_rate=0.05, truncate=None, print_shapes=False, seed=0, cuda=False, jit=False,
        time_compilation=False, raftery_parameterization=False, tmc=False, tmc_num_samples=10,
    )  # fmt: skip
    logs = {}
    for name, cls in ELBOS.items():
        example.TraceEnum_ELBO = cls  # the ELBO line swapped
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record, lines=lines: lines.append(record.getMessage())
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        start = time.perf_counter()
        try:
            example.main(args)
        finally:
            root.removeHandler(handler)
        logs[name] = (lines, time.perf_counter() - start)
    rows = []
    for label in ("training loss", "test loss"):
        values = [next(m for m in logs[n][0] if m.startswith(label)).split("= ")[1] for n in ELBOS]
        rows.append((f"hmm.py -m {model}: {label}", *values))
    step_losses = {n: [m.split("\t")[1] for m in logs[n][0] if m[:5].strip().isdigit()]
                   for n in ELBOS}  # fmt: skip
    last = {n: float(v[-1]) for n, v in step_losses.items()}
    rows.append((f"hmm.py -m {model}: loss at step {steps - 1}",
                 *(f"{last[n]:.6f}" for n in ELBOS)))  # fmt: skip
    rows.append((f"hmm.py -m {model}: seconds ({steps} steps + eval)",
                 *(f"{logs[n][1]:.1f}" for n in ELBOS)))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyro", type=Path, default=None, help="a Pyro source checkout")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and draws")
    parser.add_argument("--chain", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chain:
        name, steps, repeats = args.chain
        print(json.dumps(chain_in_process(name, int(steps), int(repeats))))
        return
    torch.set_num_threads(1)
    print("\n".join(environment("cpu")))
    repeats = 2 if args.quick else 5
    rows = model_hmm(1000, 8, repeats)
    for steps in (30, 50):
        rows += guide_chain(steps, repeats)
    print("\n" + format_table(
        ["case: ELBO", "s / step", "vs TraceEnum", "first step s / peak", "loss"], rows))
    print("\nGaussian mixture, assignments enumerated in the model: gradient w.r.t. locs")
    print(format_table(["", "mean gradient", "max sd", "max |mean - exact|"],
                       mixture_gradients(50 if args.quick else 200)))  # fmt: skip
    if args.pyro is not None:
        rows = []
        for model in ("1", "2"):
            rows += hmm_example(args.pyro, model, 5 if args.quick else 20)
        print("\nPyro's examples/hmm.py, ELBO line swapped, synthetic chorales, seed 0")
        print(format_table(["", *ELBOS], rows))


if __name__ == "__main__":
    main()
