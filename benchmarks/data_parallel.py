"""Issue 15 benchmark: throughput of data-parallel SVI on CPU ranks, and what the collectives cost.

Run (defaults take about two minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/data_parallel.py [--steps 200] [--repeats 3] [--batch-size 64]

The demo model (``ConvClusterVAE`` with the CLI's defaults, ``RoutedELBO``, Adam) on the
embedded digits (1024 images), global batch ``--batch-size``, trained by
:func:`pyro_reparam_conv.train.train` in four layouts, each in fresh processes with one torch
thread per process (``OMP_NUM_THREADS=1``):

- ``plain``: one process, no process group (the ordinary single-process step);
- ``1 process, 2 shards``: one process computing the batch as 2 noise shards in turn (the
  exact single-process counterpart of 2 ranks: same noise, same parameters);
- ``1 rank``: a gloo process group of one (the collectives with nobody to talk to);
- ``2 ranks``: gloo on 127.0.0.1, half the batch per rank.

Each run is ``--warmup`` steps (untimed, a first ``train`` call) then ``--steps`` timed steps
(a second call); the layouts are interleaved ``--repeats`` times; the median and the best run
are shown (other work on a shared machine only slows a run down, so the best is the closest
to an unloaded machine; medians and shares are of all runs).
Images per second = global batch x steps / wall time of rank 0's loop. CPU ms/step/process:
CPU time of each process's timed loop per step, mean over the processes (below the wall time
when a process waits: for the other rank, the network, or a core another program holds).
Communication share = seconds in the collectives / loop time: ``exchange`` (status and loss;
it also absorbs the wait for the slower rank) and ``all-reduce`` (gradients and baseline
state in one buffer). The load average before and after is printed: on a shared machine the
two-process row needs both cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment, format_table, median  # noqa: E402

#: name -> (processes, noise shards, process group)
LAYOUTS = {
    "plain": (1, 1, False),
    "1 process, 2 shards": (1, 2, False),
    "1 rank": (1, 1, True),
    "2 ranks": (2, 2, True),
}


def _rank(rank: int, layout: str, port: int, options: dict, out: str) -> None:
    """One process of one run: train warm-up + timed steps; rank 0 saves its measurements."""
    import pyro
    import torch.distributed as dist

    from pyro_reparam_conv import RoutedELBO
    from pyro_reparam_conv.data import load_default_images
    from pyro_reparam_conv.models import ConvClusterVAE
    from pyro_reparam_conv.train import train

    torch.set_num_threads(1)
    world, shards, grouped = LAYOUTS[layout]
    if grouped:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
    images, _ = load_default_images(options["num_images"], seed=0)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = ConvClusterVAE(tuple(images.shape[1:]))
    common = dict(
        batch_size=options["batch_size"],
        lr=3e-3,
        seed=0,
        progress=False,
        device="cpu",
        process_group="auto" if grouped else None,
        noise_shards=shards,
    )
    train(vae.model, vae.guide, images, steps=options["warmup"], elbo=RoutedELBO(), **common)
    cpu = time.process_time()
    result = train(
        vae.model, vae.guide, images, steps=options["steps"], elbo=RoutedELBO(), **common
    )
    cpu = time.process_time() - cpu
    numel = sum(p.numel() for _, p in pyro.get_param_store().named_parameters())
    found = {
        "seconds": result.seconds,
        "cpu_seconds": cpu,
        "steps": options["steps"],
        "exchange": result.communication.get("exchange", 0.0),
        "all_reduce": result.communication.get("all_reduce", 0.0),
        "parameters": numel,
    }
    torch.save(found, f"{out}.{rank}")
    if grouped:
        dist.destroy_process_group()


def run(layout: str, options: dict) -> dict:
    """One run of ``layout``: rank 0's measurements, with ``cpu_seconds`` the mean over the
    ranks (CPU time of each process's timed loop)."""
    from pyro_reparam_conv.distributed import free_port

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.pt")
        world = LAYOUTS[layout][0]
        mp.spawn(_rank, args=(layout, free_port(), options, out), nprocs=world, join=True)
        ranks = [torch.load(f"{out}.{rank}") for rank in range(world)]
    return {**ranks[0], "cpu_seconds": sum(r["cpu_seconds"] for r in ranks) / world}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="runs per layout")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--num-images", type=int, default=1024)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes
    torch.set_num_threads(1)
    options = vars(args)

    load = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for _ in range(args.repeats):
        for name in LAYOUTS:
            runs[name].append(run(name, options))
    load_after = os.getloadavg()

    def rate(r: dict) -> float:
        return args.batch_size * r["steps"] / r["seconds"]

    plain = median([rate(r) for r in runs["plain"]])
    plain_best = max(rate(r) for r in runs["plain"])
    rows = []
    for name, found in runs.items():
        world, shards, _ = LAYOUTS[name]
        images, best = median([rate(r) for r in found]), max(rate(r) for r in found)
        exchange = median([r["exchange"] / r["seconds"] for r in found])
        reduce = median([r["all_reduce"] / r["seconds"] for r in found])
        rows.append(
            [
                name,
                world,
                shards,
                f"{images:.0f} ({images / plain:.2f}x)",
                f"{best:.0f} ({best / plain_best:.2f}x)",
                f"{median([1e3 * r['seconds'] / r['steps'] for r in found]):.1f}",
                f"{median([1e3 * r['cpu_seconds'] / r['steps'] for r in found]):.1f}",
                f"{100 * (exchange + reduce):.1f}%",
                f"{100 * reduce:.1f}%",
            ]
        )
    headers = [
        "layout",
        "processes",
        "noise shards",
        "images/s median (vs plain)",
        "best (vs plain's best)",
        "ms/step",
        "CPU ms/step/process",
        "comm share",
        "all-reduce share",
    ]
    print("\n".join(environment("cpu")))
    print(
        f"ConvClusterVAE (CLI defaults, {runs['plain'][0]['parameters']} parameters), "
        f"{args.num_images} digits, global batch {args.batch_size}, {args.warmup} warm-up + "
        f"{args.steps} timed steps, {args.repeats} interleaved runs, 1 torch thread "
        f"per process; load average {load[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
