"""Ranks for ``tests/test_distributed.py``: each runs in a process of its own (``spawn``), joins
a gloo process group on 127.0.0.1 (a free port, a 30 s timeout on every collective), runs one
scenario and saves what it saw to ``<out>/rank<r>.pt``: its result, or the error it ended with.

:func:`run_ranks` starts them and waits at most ``timeout`` seconds; processes still alive
then are killed (and reported as such), so no test can hang.
"""

import datetime
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyro_reparam_conv.train as train_module
from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.data import load_default_images
from pyro_reparam_conv.distributed import free_port
from pyro_reparam_conv.models import ConvClusterVAE
from pyro_reparam_conv.train import train

SMALL = dict(hidden_channels=8, latent_channels=2, num_classes=3)
DATA, _ = load_default_images(32, seed=0)
COMMON = dict(batch_size=16, lr=3e-3, seed=7, progress=False, device="cpu")
PROCESS_GROUP_TIMEOUT = 30  # seconds
# "auto": z pathwise, y on the score function (a decaying-average baseline to reduce);
# "score": z forced onto the score function too; "enumerate": the default routes (y summed
# exactly over its support, side by side, z pathwise)
ROUTES = ("auto", "score", "enumerate")
SCORE_SITES = {"auto": {"y"}, "score": {"y", "z"}, "enumerate": set()}


def fresh_model(route="auto", init_seed=0):
    """A new model with an empty param store; ``init_seed`` sets its initial values."""
    pyro.clear_param_store()
    torch.manual_seed(init_seed)
    z_infer = {"estimator": "score"} if route == "score" else {}
    y_infer = {} if route == "enumerate" else {"estimator": "score"}
    return ConvClusterVAE(**SMALL, z_infer=z_infer, y_infer=y_infer)


def params():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def fit(model, guide, steps, **options):
    return train(model, guide, DATA, steps=steps, elbo=RoutedELBO(), **{**COMMON, **options})


def run_ranks(scenario, out, *args, nprocs=2, timeout=120):
    """Run ``scenario(rank, out, *args)`` in ``nprocs`` processes of one gloo group; returns
    ``(exit codes, {rank: saved result})`` (a rank killed at the deadline has exit code
    ``"timeout"``)."""
    out = Path(out)
    port = free_port()
    context = mp.get_context("spawn")
    procs = [
        context.Process(target=_rank_main, args=(scenario, rank, nprocs, port, str(out), *args))
        for rank in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            codes.append("timeout")
        else:
            codes.append(proc.exitcode)
    results = {}
    for rank in range(nprocs):
        path = out / f"rank{rank}.pt"
        if path.exists():
            results[rank] = torch.load(path, weights_only=False)
    return codes, results


def _rank_main(scenario, rank, world_size, port, out, *args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT),
    )
    start = time.monotonic()
    try:
        result = {"result": scenario(rank, Path(out), *args)}
    except BaseException as err:  # noqa: BLE001 - the test reads it
        result = {
            "error": type(err).__name__,
            "message": str(err),
            "rank": getattr(err, "rank", None),
            "origin": getattr(err, "origin", None),
            "cause": type(err.__cause__).__name__ if err.__cause__ is not None else None,
            "signum": getattr(err, "signum", None),
            "traceback": traceback.format_exc(),
        }
    result["seconds"] = time.monotonic() - start
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # leave without C++ teardown: gloo's worker threads, destroyed while the peer tears down
    # its own group, may abort the process ("terminate called without an active exception")
    # after the result is saved; the exit code is what the tests read
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ scenarios
def two_routes(rank, out):
    """Six steps of batch 16 (8 per rank) on both routes: parameters, losses, baselines; and
    the pathwise route with 4 noise shards (2 per rank)."""
    found = {}
    for route, shards in [(route, 2) for route in ROUTES] + [("auto", 4)]:
        vae = fresh_model(route)
        result = fit(vae.model, vae.guide, 6, noise_shards=shards)
        found[route if shards == 2 else f"{route}, {shards} shards"] = {
            "params": params(),
            "losses": result.losses,
            "elbo": result.elbo.state_dict(),
            "world_size": result.world_size,
            "noise_shards": result.noise_shards,
        }
    return found


def checkpoint_and_resume(rank, out):
    """Four steps (checkpoints at 2 and 4, kept as ``ck4.pt`` too), then a resume to step 6
    in new model objects whose initial values differ on every rank."""
    real_save, saves = train_module.save_checkpoint, []

    def save(path, state):
        saves.append(int(state["step"]))
        real_save(path, state)

    train_module.save_checkpoint = save
    path = out / "ck.pt"
    vae = fresh_model()
    fit(vae.model, vae.guide, 4, checkpoint_path=path, checkpoint_every=2)
    if rank == 0:
        shutil.copy(path, out / "ck4.pt")
    dist.barrier()
    vae = fresh_model(init_seed=100 + rank)
    result = fit(vae.model, vae.guide, 6, checkpoint_path=path, checkpoint_every=2, resume=True)
    return {"saves": saves, "params": params(), "losses": result.losses, "start": result.start_step}


class _OnRank1:
    """The model, except on rank 1 at its ``call``-th call (call 1 registers the parameters;
    step ``s`` is call ``1 + s``), where it does ``action``."""

    def __init__(self, model, rank, call, action):
        self.model, self.rank, self.call, self.action, self.calls = model, rank, call, action, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.rank == 1 and self.calls == self.call:
            self.action()
        return self.model(*args, **kwargs)


def _boom():
    raise ValueError("boom on rank 1")


def _new_parameter():
    pyro.param("only_on_rank_1", torch.zeros(1))


ACTIONS = {
    "raise": _boom,
    "new parameter": _new_parameter,
    "die": lambda: os._exit(3),
    "sigterm": lambda: os.kill(os.getpid(), signal.SIGTERM),
}


def fail_at_step_3(rank, out, action):
    """Rank 1 raises, dies or gets SIGTERM during step 3 of 6; checkpoints every step."""
    vae = fresh_model()
    model = _OnRank1(vae.model, rank, 1 + 3, ACTIONS[action])
    fit(model, vae.guide, 6, checkpoint_path=out / "ck.pt", checkpoint_every=1)
    return params()
