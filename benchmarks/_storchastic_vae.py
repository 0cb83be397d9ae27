"""The Bernoulli VAE rows of ``bernoulli_vae.py`` with storchastic's estimators.

Run in its own process and venv (importing ``storch`` monkey-patches torch, which must not
touch the Pyro runs): ``/tmp/storch-venv/bin/python benchmarks/_storchastic_vae.py``, a venv
over the project's torch (its site-packages in a ``.pth`` file) with ``pip install
--no-deps storchastic entmax``. The same protocol as ``bernoulli_vae.py``: the same
initialization (``BernoulliVAE``'s networks built under the same seed, without Pyro), the
same batches and binarizations, the same evaluation (training ELBO with 10 draws on the
same 1000 fixed training images, 100-sample test bound on the same test images); the cost
handed to storchastic is the per-image ``-(log p(x | z) + log p(z) - log q(z))`` of the
same model, the batch denoted independent (storchastic's ``denote_independent``). Writes
one JSON list of rows (``bernoulli_vae.py``'s fields) after every evaluation; a method that
fails is a row saying how (storchastic 0.x's ``DisARM`` fails under a batch plate: a shape
error in its own ``comp_estimator``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Bernoulli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyro_reparam_conv.data import binarize, binarized_batches, load_fashion_mnist  # noqa: E402  (numpy, torch)

import storch  # noqa: E402
from storch.method import DisARM, ScoreFunction  # noqa: E402

METHODS = {  # name -> (evaluations per step, factory)
    "storch DisARM": (2, lambda: DisARM("z")),
    "storch ScoreFunction(2, batch_average)": (
        2, lambda: ScoreFunction("z", n_samples=2, baseline_factory="batch_average")),
    "storch ScoreFunction(4, batch_average)": (
        4, lambda: ScoreFunction("z", n_samples=4, baseline_factory="batch_average")),
}  # fmt: skip


def networks(arch: str, mean: torch.Tensor):
    """``BernoulliVAE(arch, mean)``'s encoder, decoder and prior logits, built in the same
    order under the same seed (so with the same initial values), as plain torch modules."""
    inner = [200, 200] if arch == "nonlinear" else []

    def net(sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(torch.nn.LeakyReLU(0.3))
            layers.append(torch.nn.Linear(a, b))
        return torch.nn.Sequential(*layers)

    encoder, decoder = net([784, *inner, 200]), net([200, *inner, 784])
    with torch.no_grad():
        decoder[-1].bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))
    return encoder, decoder, torch.nn.Parameter(torch.zeros(200))


def log_weights(encoder, decoder, prior, mean, x, num_samples):
    with torch.no_grad():
        q = Bernoulli(logits=encoder(x - mean))
        b = q.sample((num_samples,))
        log_p = Bernoulli(logits=prior).log_prob(b).sum(-1)
        log_p = log_p + Bernoulli(logits=decoder(b)).log_prob(x).sum(-1)
        return log_p - q.log_prob(b).sum(-1)


def run(name: str, arch: str, args, data, rows: list, out: Path) -> None:
    train_x, mean, fixed_train, test_x = data
    torch.manual_seed(args.seed)
    encoder, decoder, prior = networks(arch, mean)
    params = [*encoder.parameters(), *decoder.parameters(), prior]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    k, make = METHODS[name]
    method = make()
    row = dict(arch=arch, estimator=name, evaluations=k, steps=[], train_elbo=[],
               test_bound=float("nan"), grad_variance=float("nan"),
               seconds_per_step=float("nan"), seconds_fast=float("nan"), route="storchastic")
    rows.append(row)
    torch.manual_seed(args.seed + 1)
    seconds = []
    batches = binarized_batches(train_x, args.batch, args.seed, args.steps)
    for step, x in enumerate(batches, 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        storch.reset()
        xs = storch.denote_independent(x, 0, "data")
        q = Bernoulli(logits=encoder(xs - mean))
        z = method(q)
        z = z.float() if z.dtype == torch.bool else z
        log_p = Bernoulli(logits=prior).log_prob(z).sum(-1)
        log_p = log_p + Bernoulli(logits=decoder(z)).log_prob(xs).sum(-1)
        storch.add_cost(q.log_prob(z).sum(-1) - log_p, "negative elbo")
        storch.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        if step % args.eval_every == 0 or step == args.steps:
            row["steps"].append(step)
            row["train_elbo"].append(
                float(log_weights(encoder, decoder, prior, mean, fixed_train, 10).mean()))
            row["seconds_per_step"] = float(torch.tensor(seconds).median())
            row["seconds_fast"] = float(torch.tensor(seconds).quantile(0.1))
            out.write_text(json.dumps(rows, indent=1))
            print(f"{arch} {name} step {step}: train ELBO {row['train_elbo'][-1]:.2f}",
                  flush=True)  # fmt: skip
    bounds = []
    for t in test_x.split(500):
        w = log_weights(encoder, decoder, prior, mean, t, 100)
        bounds.append(torch.logsumexp(w, 0) - torch.log(torch.tensor(100.0)))
    row["test_bound"] = float(torch.cat(bounds).mean())
    out.write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--arch", nargs="+", default=["linear", "nonlinear"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--train-eval", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default="benchmarks/results/bernoulli_vae_storchastic.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_x, _ = load_fashion_mnist("train", args.data)
    test_x, _ = load_fashion_mnist("test", args.data)
    g = torch.Generator().manual_seed(args.seed + 3)  # as bernoulli_vae.load
    fixed_train = binarize(train_x[torch.randperm(len(train_x), generator=g)[: args.train_eval]], g)
    test = binarize(test_x[: args.test_size], g)
    data = (train_x, train_x.mean(0), fixed_train, test)
    rows: list = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        for name in args.methods:
            try:
                run(name, arch, args, data, rows, out)
            except Exception as e:  # noqa: BLE001 - a peer's failure is a result
                first = (str(e).strip().splitlines() or [""])[0]
                rows[-1]["route"] = f"storchastic failed: {type(e).__name__}: {first}"
                out.write_text(json.dumps(rows, indent=1))
                print(f"{arch} {name}: {rows[-1]['route']}", flush=True)


if __name__ == "__main__":
    main()
