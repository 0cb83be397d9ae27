"""The SVI loop: minibatches, progress bar, NaN/Inf guard, checkpoints, exact and checked resume.

Each step maximizes the ELBO ``E_q[log p(x, y, z) - log q(y, z | x)]`` (Kingma & Welling 2014)
on a minibatch: the model sees ``num_data`` so its plate scales the batch log-densities by
``N / B`` (Hoffman et al. 2013, stochastic variational inference). Gradients come from the
ELBO object (default :class:`~pyro_reparam_conv.elbo.RoutedELBO`: pathwise for ``rsample``
sites, score function with baselines otherwise).

A checkpoint holds everything the next step depends on: parameters (param store and module
state), optimizer state, step count, loss history, the RNG states (torch, CUDA, NumPy,
Python), the minibatch order (permutation and position) and the ELBO's own state (baseline
averages) when it has ``state_dict``; and the run's settings (optimizer and its learning
rate, ELBO, seed, batch size, a SHA-256 of the data, thread count, device, plus any the
caller adds) with a history of the runs that wrote it. Resuming from it gives bit-identical
parameters to an uninterrupted run with the same settings; a changed setting is refused by
name unless accepted (``allow_changed``). Files are checksummed and written atomically (see
:mod:`pyro_reparam_conv.checkpoint`).

Data-parallel (``torchrun``, or a process group; see :mod:`pyro_reparam_conv.distributed` and
``docs/distributed.md``): every rank draws the same global minibatch, computes the gradient of
its noise shards, and :func:`_step` sums gradients and averages baseline state over the ranks
before one identical update; rank 0 shows progress and writes checkpoints, a resume restores
every rank from rank 0's copy, a failure or a signal on any rank stops all of them after the
same step. The layout (number of processes, noise shards) is a setting like the others.

Nothing trained is lost silently: an existing checkpoint is not replaced unless
``overwrite=True`` (or continued with ``resume=True``); the folder is checked writable, with
room for a checkpoint, before the first step; SIGINT (Ctrl-C) and SIGTERM (what batch
schedulers send) are held until the step in progress completes, the checkpoint is written
and :class:`Interrupted` is raised.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import zero_grads
from pyro.poutine.subsample_messenger import _Subsample

from . import distributed
from .checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    SettingsMismatchError,
    changed_settings,
    check_writable,
    data_fingerprint,
    encode_checkpoint,
    load_checkpoint,
    refuse_overwrite,
    save_checkpoint,
)
from .introspect import display_name, max_plate_nesting, modules_behind, probe_traces
from .sampling import validation_enabled

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpointer",
    "Interrupted",
    "NonFiniteTrainingError",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "load_params",
    "register_params",
    "resolve_device",
    "restore_params",
    "run_settings",
    "save_checkpoint",
    "train",
]


class NonFiniteTrainingError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient at ``step``.

    ``sites`` lists the sample sites whose log-density (or draw) was not finite, as
    ``"name (model)"`` / ``"name (guide)"``; ``params`` the parameters with non-finite gradients.
    """

    def __init__(
        self, step: int, sites: list[str], params: list[str], loss: Optional[float], note: str = ""
    ) -> None:
        self.step, self.sites, self.params, self.loss = step, sites, params, loss
        shown = loss if loss is not None else "not computed"
        parts = [f"training stopped at step {step}: loss {shown}"]
        if sites:
            parts.append("non-finite log-density at site(s) " + ", ".join(sites))
        if params:
            parts.append("non-finite gradient of " + ", ".join(params))
        if not sites and not params:
            parts.append("no single site is non-finite (the sum overflowed)")
        if note:
            parts.append(note)
        super().__init__("; ".join(parts))


@dataclass
class TrainResult:
    """What :func:`train` did: per-step losses (negative ELBO estimates of the full data set)."""

    losses: list[float]
    step: int
    seconds: float
    seconds_per_step: float
    device: torch.device
    elbo: Any
    checkpoint_path: Optional[Path] = None
    start_step: int = 0
    extra: dict = field(default_factory=dict)
    #: settings that differ from the resumed checkpoint's (accepted): ``{name: (old, new)}``
    changed: dict = field(default_factory=dict)
    #: processes that trained together, this one's rank, noise shards per step
    world_size: int = 1
    rank: int = 0
    noise_shards: int = 1
    #: seconds spent in collectives: ``exchange`` (status, loss; it absorbs waiting for the
    #: slowest rank) and ``all_reduce`` (gradients and baseline state); zeros on one process
    communication: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """What one :func:`train` call does, checked and frozen (its arguments that are values).

    ``model`` and ``guide`` are Pyro callables taking a minibatch ``data[idx]`` (and
    ``num_data_kwarg=N`` unless that is ``None``); ``nn.Module`` s behind them (or behind their
    bound methods) are moved to ``device``.

    :raises NonFiniteTrainingError: naming the step and the sites (or parameters) that were
        not finite; the parameters are left as after the last good step.
    :raises SettingsMismatchError: on resume, naming each setting that differs.
    :raises CheckpointExistsError: the checkpoint exists and neither ``resume`` nor
        ``overwrite`` is set.
    :raises Interrupted: after SIGINT/SIGTERM, once the checkpoint is written.
    :raises RankFailedError: in a process group, on every rank, instead of any of the above
        (it names the rank that failed, and chains the original error there).
    """

    #: total number of steps, counting those already in a resumed checkpoint
    steps: int
    #: images per step in all (the global batch, split over the ranks)
    batch_size: int = 64
    #: Adam's learning rate when no optimizer is given
    lr: float = 1e-3
    device: torch.device = torch.device("cpu")
    seed: int = 0
    #: continue from the checkpoint when it exists (else start afresh)
    resume: bool = False
    #: start afresh even though the checkpoint exists (replacing it at the first save);
    #: without it (and without ``resume``) an existing checkpoint is an error
    overwrite: bool = False
    #: names of settings (see :func:`run_settings`; e.g. ``{"lr"}``) that may differ from the
    #: resumed checkpoint's; any other difference is refused
    allow_changed: frozenset = frozenset()
    #: more settings to record and check on resume (e.g. the model's configuration); plain data
    settings: dict = field(default_factory=dict)
    #: show the progress bar (rank 0 only)
    progress: bool = True
    num_data_kwarg: Optional[str] = "num_data"
    #: the progress bar's label
    desc: str = "svi"
    #: plain data stored in the checkpoint and not checked (e.g. where the data came from)
    metadata: dict = field(default_factory=dict)
    #: the global batch is computed as this many shards of ``batch_size / noise_shards``
    #: images, each with noise re-seeded from ``(seed, step, shard)`` (default: the world
    #: size; a multiple of it that divides ``batch_size``). The same value gives the same noise
    #: on any number of processes, and bit-identical parameters on 1 or 2 (on more, equal to
    #: float summation order); ``1`` on one process is the plain SVI step.
    noise_shards: Optional[int] = None
    #: seconds a collective waits for the other ranks of a process group ``train`` makes
    timeout: float = distributed.DEFAULT_TIMEOUT


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device {str(device)!r} is not a torch device; use auto, cpu, cuda or cuda:K"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


# ---------------------------------------------------------------- minibatches
class _Batches:
    """Shuffled minibatch indices, epoch by epoch, from a generator of their own.

    Every batch has ``batch_size`` images (an epoch's remainder is dropped), so per-element
    baselines keep their shape; ``batch_size >= N`` gives the full data set every step.
    """

    def __init__(self, num_data: int, batch_size: int, seed: int) -> None:
        self.num_data, self.batch_size = num_data, min(batch_size, num_data)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm: Optional[torch.Tensor] = None
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.batch_size == self.num_data:
            return torch.arange(self.num_data)
        if self.perm is None or self.pos + self.batch_size > self.num_data:
            self.perm = torch.randperm(self.num_data, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], int(state["pos"])


# ---------------------------------------------------------------- RNG / state
def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_params(params: dict[str, torch.Tensor], modules: list[dict], fns: tuple) -> None:
    """Copy saved values *into* the live parameters (keeping tensor identity, so modules,
    the param store and the optimizer keep pointing at the same tensors)."""
    store = pyro.get_param_store()
    live = dict(store.named_parameters())
    missing = sorted(map(display_name, set(params) - set(live)))
    unexpected = sorted(map(display_name, set(live) - set(params)))
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            f"in checkpoint but not in the model {missing}; in the model but not saved {unexpected}"
        )
    shapes = sorted(
        f"{display_name(name)}: saved {tuple(value.shape)}, model {tuple(live[name].shape)}"
        for name, value in params.items()
        if tuple(value.shape) != tuple(live[name].shape)
    )
    if shapes:
        raise ValueError(
            "checkpoint does not match the model: parameter shapes differ: " + "; ".join(shapes)
        )
    with torch.no_grad():
        for module, state in zip(modules_behind(*fns), modules):
            module.load_state_dict(state)
        for name, value in params.items():
            live[name].copy_(value)


# ------------------------------------------------------------- NaN diagnosis
def _non_finite_sites(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> list[str]:
    """Trace guide and model once more (validation off) and name every sample site whose
    draw or log-density is NaN/Inf, as ``"name (guide)"`` / ``"name (model)"``."""
    bad_draws, guide_trace, model_trace = probe_traces(model, guide, args, kwargs)
    bad: list[str] = []
    with torch.no_grad(), pyro.validation_enabled(False), validation_enabled(False):
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                    continue
                try:
                    finite = bool(torch.isfinite(site["fn"].log_prob(site["value"])).all())
                except (RuntimeError, ValueError):
                    finite = False
                if not finite:
                    bad.append(f"{name} ({role})")
    return list(dict.fromkeys(bad_draws + bad))


def register_params(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """Run guide and model once (validation off, NaN-tolerant draws, no backward pass) so
    every parameter exists in the param store; return the traces' plate nesting depth."""
    _, guide_trace, model_trace = probe_traces(model, guide, args, kwargs)
    return max_plate_nesting(guide_trace, model_trace)


def load_params(
    model: Callable, guide: Callable, checkpoint_path: Union[str, Path], *args: Any, **kwargs: Any
) -> dict:
    """Set the parameters of ``model``/``guide`` from a :func:`train` checkpoint.

    ``args``/``kwargs`` are an example input (e.g. a few images) used to create the
    parameters first. Returns the checkpoint dictionary (``metadata``, ``losses``, ...).
    """
    state = load_checkpoint(checkpoint_path)
    register_params(model, guide, *args, **kwargs)
    restore_params(state["params"], state["modules"], (model, guide))
    return state


# ---------------------------------------------------------------- one step
class _NonFiniteStep(Exception):
    def __init__(self, loss: float, params: list[str]) -> None:
        self.loss, self.params = loss, params


@dataclass(frozen=True)
class _Run:
    """What every step of one :func:`train` call uses (fixed for the call): the live objects,
    the data on the device, the minibatch order and the settings the checkpoint records."""

    model: Callable
    guide: Callable
    elbo: Any
    optim: Any
    kwargs: dict
    group: distributed.Group
    noise_shards: int
    seed: int
    path: Optional[Path]
    config: Optional[TrainConfig] = None
    data: Optional[torch.Tensor] = None
    batches: Optional[_Batches] = None
    settings: dict = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Whether noise shards are re-seeded, scaled by ``1 / S`` and their ELBO states
        averaged (``S > 1``; ``S = 1`` is the plain single-process step)."""
        return self.noise_shards > 1


@dataclass(frozen=True)
class _Local:
    """Noise shards of this rank, one or summed: the loss, the parameters touched, the
    gradients taken out of ``.grad`` (only when a rank computes several shards, to be summed
    in a fixed order; else they stay in ``.grad``) and, for a sharded step, the ELBO state
    after the shard (``[(key path, tensor)]``; ``None``: no state)."""

    loss: float
    params: frozenset
    grads: dict
    state: Optional[list]


def _non_finite_gradients(params: Iterable[torch.Tensor]) -> list[str]:
    store = pyro.get_param_store()
    return sorted(
        display_name(store.param_name(p) or "?")
        for p in params
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    )


def _add_states(a: Optional[list], b: Optional[list]) -> Optional[list]:
    """Element-wise sum of two flattened ELBO states, which must have the same entries."""
    if a is None or b is None:
        return None
    if [(path, t.shape) for path, t in a] != [(path, t.shape) for path, t in b]:
        shown = lambda items: [f"{'/'.join(map(str, p))}{tuple(t.shape)}" for p, t in items]  # noqa: E731
        raise ValueError(
            f"the ELBO state differs between noise shards ({shown(a)} vs {shown(b)}): every "
            "shard must have the same score-function sites and plate sizes"
        )
    return [(path, x + y) for (path, x), (_, y) in zip(a, b)]


def _add_locals(a: _Local, b: _Local) -> _Local:
    grads = dict(a.grads)
    for p, grad in b.grads.items():
        grads[p] = grads[p] + grad if p in grads else grad
    return _Local(a.loss + b.loss, a.params | b.params, grads, _add_states(a.state, b.state))


def _local_step(run: _Run, shards: list[tuple[int, tuple]], step: int, before_elbo) -> _Local:
    """The ELBO gradients of this rank's noise shards, refusing non-finite values. A sharded
    step gives shard ``j`` the ELBO state from before the step, re-seeds the RNGs from
    ``(seed, step, j)`` and scales its sample sites by ``1 / S`` (see
    :mod:`pyro_reparam_conv.distributed`). Several shards are summed in the fixed order of
    :func:`~.distributed.tree_sum`, the order one process uses for all of them, so one and
    two processes give the same bits."""
    parts: list[_Local] = []
    several = len(shards) > 1
    for shard, args in shards:
        scale = poutine.scale(scale=1.0 / run.noise_shards) if run.sharded else nullcontext()
        if run.sharded:
            pyro.set_rng_seed(distributed.shard_seed(run.seed, step, shard))
            if parts and before_elbo is not None:
                run.elbo.load_state_dict(before_elbo)
        with poutine.trace(param_only=True) as capture, scale:
            loss = float(run.elbo.loss_and_grads(run.model, run.guide, *args, **run.kwargs))
        touched = frozenset(site["value"].unconstrained() for site in capture.trace.nodes.values())
        grads = {}
        if several:  # take this shard's gradients out, so the next one starts from none
            grads = {p: p.grad for p in touched if p.grad is not None}
            for p in touched:
                p.grad = None
        state = None
        if run.sharded and before_elbo is not None:
            state = distributed.flatten_state(run.elbo.state_dict())
        parts.append(_Local(loss, touched, grads, state))
    local = distributed.tree_sum(parts, _add_locals)
    for p, grad in local.grads.items():
        p.grad = grad
    bad = _non_finite_gradients(local.params)
    if bad or not math.isfinite(local.loss):
        zero_grads(local.params)
        raise _NonFiniteStep(local.loss, bad)
    return local


def _combine(run: _Run, local: _Local, store: list, where: str, timer: dict) -> set:
    """Gradients summed over ranks (shards on one rank have summed already in ``.grad``), the
    ELBO state averaged over all shards and loaded; returns the parameters to update: those
    this rank touched and those with a gradient on any rank."""
    params, state = set(local.params), local.state
    if run.group.distributed:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in store]
        dtype = grads[0].dtype if grads else torch.get_default_dtype()
        had = torch.tensor([float(p.grad is not None) for _, p in store], dtype=dtype)
        states = [t for _, t in state or []]
        start = time.perf_counter()
        reduced = distributed.all_reduce_sum(run.group, [*grads, had, *states], where)
        timer["all_reduce"] += time.perf_counter() - start
        for (_, p), grad, flag in zip(store, reduced, reduced[len(store)].tolist()):
            if flag:
                p.grad = grad
                params.add(p)
        if state is not None:
            state = [(path, t) for (path, _), t in zip(state, reduced[len(store) + 1 :])]
    if state is not None:
        mean = [(path, t / run.noise_shards) for path, t in state]
        run.elbo.load_state_dict(distributed.unflatten_state(mean))
    return params


def _exchange(run: _Run, step: int, failure, local, store: list, received: list, timer: dict):
    """:func:`~.distributed.exchange` of a step: this rank's failure, loss, the first signal
    it received and its layout (checked to be every rank's)."""
    group, where = run.group, f"step {step}"
    key = ""
    if local is not None and group.distributed:
        key = distributed.layout_key(store, local.state or [])
    start = time.perf_counter()
    loss = local.loss if local is not None else 0.0
    signum = _first(received)
    status = distributed.exchange(group, failure, where=where, loss=loss, signum=signum, key=key)
    if not status.same_layout:
        raise distributed.layout_mismatch(group, key, where)
    timer["exchange"] += time.perf_counter() - start
    return status


def _step(run: _Run, step: int, indices: torch.Tensor, data, before: dict, received: list, timer):
    """One synchronous SVI step on every rank (as :meth:`pyro.infer.SVI.step` on one): this
    rank's shards of the global minibatch ``indices``, :func:`~.distributed.exchange` (a failure
    anywhere stops every rank; the loss is summed), the gradients summed and the baselines
    averaged over ranks, one identical update. Returns ``(loss, signal every rank stops on)``:
    the first of ``received`` (the signals this rank got so far) on any rank; a non-finite
    loss or gradient raises before the update."""
    group, where = run.group, f"step {step}"
    mine = distributed.local_shards(run.noise_shards, group.size, group.rank)
    rows = [distributed.shard_rows(indices, run.noise_shards, j) for j in mine]
    failure, local = None, None
    try:
        try:
            shards = [(j, (data[r],)) for j, r in zip(mine, rows)]
            local = _local_step(run, shards, step, before["elbo"])
        except Exception as exc:
            probe = (data[torch.cat(rows)],)
            _raise_if_non_finite(exc, step, run.model, run.guide, probe, run.kwargs, run.path)
            raise
    except Exception as exc:
        failure = exc
    store = sorted(pyro.get_param_store().named_parameters()) if group.distributed else []
    try:
        status = _exchange(run, step, failure, local, store, received, timer)
    finally:
        failure = None  # no reference cycle through this frame (it holds the group)
    params = _combine(run, local, store, where, timer)
    bad = _non_finite_gradients(params) if group.distributed else []
    if bad or not math.isfinite(status.loss):  # each rank's part was finite, the sum is not
        err = NonFiniteTrainingError(
            step, [], bad, status.loss, "the sum over the ranks overflowed"
        )
        raise distributed.RankFailedError(
            None, where, [c.__name__ for c in type(err).__mro__], str(err)
        ) from err
    run.optim(params)
    zero_grads(params)
    return status.loss, status.signum


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after the step in progress completed and
    the checkpoint was written; ``signum`` is the signal. A ``KeyboardInterrupt``, so code that
    handles Ctrl-C handles a scheduler's SIGTERM the same way."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _deferred_signals() -> Iterator[list]:
    """Hold SIGINT and SIGTERM (main thread only): the handler only appends the signal number
    to the yielded list, which the loop checks between steps."""
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.getsignal(signum) for signum in _DEFERRED_SIGNALS}
    for signum in _DEFERRED_SIGNALS:
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# ---------------------------------------------------------------- settings and resume
def _optimizer_settings(optim: Any) -> dict:
    """``optimizer`` (the torch class behind a Pyro optimizer) and its hyperparameters when
    they are a dict (``lr``, ``betas``, ...)."""
    constructor = getattr(optim, "pt_optim_constructor", None)
    settings: dict = {"optimizer": getattr(constructor, "__name__", type(optim).__name__)}
    args = getattr(optim, "pt_optim_args", None)
    if isinstance(args, dict):
        settings.update(args)
    return settings


def run_settings(
    *,
    optim: Any,
    elbo: Any,
    data: torch.Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    world_size: int = 1,
    noise_shards: int = 1,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict:
    """The settings a checkpoint records and a resume must match: the optimizer and its
    hyperparameters, the ELBO class and particle count, seed, batch size, number of images,
    a SHA-256 of the data, torch's intra-op thread count (it changes float summation order,
    so results), the device type, the data-parallel layout (number of processes and noise
    shards), and ``extra`` (the caller's, e.g. the model configuration)."""
    settings = {
        **_optimizer_settings(optim),
        "elbo": f"{type(elbo).__name__}(num_particles={getattr(elbo, 'num_particles', 1)})",
        "seed": seed,
        "batch_size": batch_size,
        "num_data": len(data),
        "data": data_fingerprint(data),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "world_size": world_size,
        "noise_shards": noise_shards,
    }
    clash = sorted(set(settings) & set(extra or {}))
    if clash:
        raise ValueError(f"settings {clash} are recorded by train itself; give them other names")
    return {**settings, **(extra or {})}


def _with_hyperparameters(optim_state: dict, values: Mapping[str, Any]) -> dict:
    """Pyro optimizer state (a torch state dict per parameter, or ``{"optimizer": ...,
    "scheduler": ...}``) with ``values`` written into every param group: loading a state dict
    restores the saved hyperparameters, so an accepted change of e.g. ``lr`` needs this."""

    def patch(state: dict) -> dict:
        if "param_groups" not in state:
            return {k: patch(v) if k == "optimizer" else v for k, v in state.items()}
        groups = [
            {**group, **{k: v for k, v in values.items() if k in group}}
            for group in state["param_groups"]
        ]
        return {**state, "param_groups": groups}

    return {name: patch(state) for name, state in optim_state.items()} if values else optim_state


#: the layout of checkpoints written before data-parallel training was recorded
_LAYOUT_OF_OLDER_CHECKPOINTS = {"world_size": 1, "noise_shards": 1}


def _layout_note(refused: Mapping[str, tuple]) -> str:
    if not {"world_size", "noise_shards"} & set(refused):
        return ""
    return (
        "the same noise_shards on another number of processes continues the same computation "
        "(accept world_size only); another noise_shards draws other noise"
    )


# ---------------------------------------------------------------- checkpoints
#: what :func:`train` says to do about a checkpoint in the way
_HOW = "pass resume=True to continue it, or overwrite=True to replace it"


@dataclass(frozen=True)
class Checkpointer:
    """One run's checkpoint: where (``path``; ``None``: none), when (every ``every`` steps and
    at the last one, on SIGINT/SIGTERM, never after a non-finite step), and by whom (``writes``:
    rank 0 of a process group). It saves atomically with a checksum
    (:func:`~pyro_reparam_conv.checkpoint.save_checkpoint`), loads for a resume refusing changed
    settings by name unless accepted (:meth:`load`), and makes the checks of an output folder
    before any work (:meth:`check_start`, the command line's too; :meth:`check_room`: the
    folder is writable with room for a checkpoint before the first step)."""

    path: Optional[Path] = None
    every: int = 100
    writes: bool = True

    @staticmethod
    def check_start(
        paths: Iterable[Path],
        *,
        resume: bool,
        overwrite: bool,
        how: str = _HOW,
        folder: Optional[Path] = None,
        missing: Optional[str] = None,
    ) -> None:
        """Before any work: with ``resume``, ``missing`` (when given) is the error when none of
        ``paths`` exists; without ``resume`` or ``overwrite`` an existing one is refused
        (``CheckpointExistsError``; ``how`` says what to do instead); ``folder`` (when given)
        is created and must be writable."""
        paths = [Path(path) for path in paths]
        if resume and missing is not None and not any(path.exists() for path in paths):
            raise ValueError(missing)
        if not resume and not overwrite:
            for path in paths:
                refuse_overwrite(path, how)
        if folder is not None:
            check_writable(folder)

    def refuse_start(self, resume: bool, overwrite: bool) -> None:
        """:meth:`check_start` of this checkpoint, by the process that writes it."""
        if self.path is not None and self.writes:
            self.check_start([self.path], resume=resume, overwrite=overwrite)

    def due(self, step: int, last: int) -> bool:
        """Whether step ``step`` of ``last`` is checkpointed."""
        return step % self.every == 0 or step == last

    def check_room(self, snapshot: Callable[[], dict]) -> None:
        """The folder is writable, with room for the checkpoint ``snapshot()`` gives."""
        if self.path is not None and self.writes:
            size = len(encode_checkpoint(snapshot()))
            check_writable(self.path.parent, size, self.path.name)

    def save(self, snapshot: Callable[[], dict]) -> None:
        """Write ``snapshot()`` (made only by the process that writes)."""
        if self.path is not None and self.writes:
            save_checkpoint(self.path, snapshot())

    def load(self, settings: dict, allow_changed: Collection[str]) -> Optional[tuple]:
        """``(state, accepted changes)`` of the checkpoint, checked against ``settings``;
        ``None`` when there is none (or this process does not write it). A changed setting
        not in ``allow_changed`` raises, naming every refused one."""
        path = self.path
        if path is None or not self.writes or not path.exists():
            return None
        state = load_checkpoint(path)
        if state.get("settings") is None:
            raise CheckpointError(
                f"{path}: a version-1 checkpoint does not record the settings a resume must "
                "match (learning rate, data, thread count, ...), so it cannot be resumed; "
                "export and audit still read it. Start a new run (overwrite, or another folder)"
            )
        saved = {**_LAYOUT_OF_OLDER_CHECKPOINTS, **state["settings"]}
        changed = changed_settings(saved, settings)
        refused = {name: values for name, values in changed.items() if name not in allow_changed}
        if refused:
            raise SettingsMismatchError(path, refused, note=_layout_note(refused))
        return state, changed


def _restore(state: dict, changed: Mapping, run: _Run) -> None:
    """Load a checked checkpoint ``state`` into the live objects of ``run``.

    Accepted changes take effect: optimizer hyperparameters are written into the restored
    optimizer state; another optimizer starts without state; other data, number of images or
    batch size start a new batch order; another seed re-seeds the RNGs from this step on."""
    restore_params(state["params"], state["modules"], (run.model, run.guide))
    optim, elbo, batches, settings = run.optim, run.elbo, run.batches, run.settings
    if "optimizer" not in changed:
        hyper = set(_optimizer_settings(optim)) & set(changed)
        optim.set_state(_with_hyperparameters(state["optim"], {k: settings[k] for k in hyper}))
    if state.get("elbo") is not None and hasattr(elbo, "load_state_dict"):
        elbo.load_state_dict(state["elbo"])
    if not {"data", "num_data", "batch_size"} & set(changed):
        batches.load_state_dict(state["batches"])
    _set_rng_state(state["rng"])
    if "seed" in changed:
        pyro.set_rng_seed(settings["seed"])
        batches.generator.manual_seed(settings["seed"])


def _history_entry(step: int, event: str, changed: Mapping[str, tuple]) -> dict:
    return {
        "step": step,
        "event": event,
        "changed": {name: list(values) for name, values in changed.items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -------------------------------------------------------------------- train
def train(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    optim: Optional[pyro.optim.PyroOptim] = None,
    elbo: Optional[pyro.infer.ELBO] = None,
    device: Union[str, torch.device] = "auto",
    seed: int = 0,
    checkpoint_path: Optional[Union[str, Path]] = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    allow_changed: Collection[str] = (),
    settings: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    num_data_kwarg: Optional[str] = "num_data",
    desc: str = "svi",
    metadata: Optional[dict] = None,
    process_group: Any = "auto",
    noise_shards: Optional[int] = None,
    timeout: float = distributed.DEFAULT_TIMEOUT,
) -> TrainResult:
    """Fit ``guide`` to ``model`` on ``data`` (``N, ...``) by SVI for ``steps`` steps in total.

    ``optim``: default Adam at ``lr``; ``elbo``: default ``RoutedELBO()`` (an infinite
    ``max_plate_nesting`` is set from a trace); ``checkpoint_path`` and ``checkpoint_every``:
    the :class:`Checkpointer`; ``process_group``: ``"auto"`` (torch's default group, or one
    made from ``torchrun``'s environment), a ``ProcessGroup``, or ``None`` (this process
    alone): rank 0 shows progress and writes checkpoints, every rank returns the same losses
    and parameters; every other argument is a field of :class:`TrainConfig`, which says what
    it does.
    :raises NonFiniteTrainingError, SettingsMismatchError, CheckpointExistsError,
        Interrupted, RankFailedError: see :class:`TrainConfig`.
    """
    if steps < 0 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("steps must be >= 0, batch_size and checkpoint_every >= 1")
    if not isinstance(data, torch.Tensor) or data.ndim < 1 or len(data) == 0:
        raise ValueError("data must be a non-empty tensor with the images along dim 0")
    if elbo is None:
        from .elbo import RoutedELBO

        elbo = RoutedELBO()
    optim = optim if optim is not None else pyro.optim.Adam({"lr": lr})
    config = TrainConfig(
        steps, batch_size, lr, resolve_device(device), seed, resume, overwrite,
        frozenset(allow_changed), dict(settings or {}), progress, num_data_kwarg, desc,
        dict(metadata or {}), noise_shards, timeout,
    )  # fmt: skip
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    checkpointer = Checkpointer(path, checkpoint_every)
    with distributed.joined(process_group, config.device, timeout) as group:
        config = replace(config, device=distributed.rank_device(config.device, group))
        return _train(model, guide, data, optim, elbo, config, checkpointer, group)


def _parameters(model: Callable, guide: Callable) -> dict:
    """Copies of the param store's values and the modules' state (buffers included)."""
    return {
        "params": {
            name: p.detach().cpu().clone() for name, p in pyro.get_param_store().named_parameters()
        },
        "modules": [m.state_dict() for m in modules_behind(model, guide)],
    }


@dataclass
class _Progress:
    """What a run has done so far: its losses (one per step, resumed ones included), the step
    it started from, the accepted changes, the history of the runs that wrote the checkpoint,
    and the state from before the step in progress (``None`` between steps)."""

    losses: list
    history: list
    start: int = 0
    changed: dict = field(default_factory=dict)
    before: Optional[dict] = None


def _train(model, guide, data, optim, elbo, config: TrainConfig, checkpointer: Checkpointer,
           group: distributed.Group) -> TrainResult:  # fmt: skip
    """:func:`train` in ``group`` with ``optim`` and ``elbo`` made and ``config`` checked."""
    checkpointer = replace(checkpointer, writes=checkpointer.writes and group.main)
    run = _set_up(model, guide, data, optim, elbo, config, checkpointer, group)
    progress = _resume(run, checkpointer)
    with distributed.all_or_none(group, "set-up"):  # fail now, not after checkpoint_every steps
        checkpointer.check_room(lambda: _snapshot(run, progress))
    timer = {"exchange": 0.0, "all_reduce": 0.0}  # seconds in collectives
    t0 = time.perf_counter()
    _loop(run, progress, checkpointer, timer)
    return _result(run, progress, time.perf_counter() - t0, timer)


def _set_up(model, guide, data, optim, elbo, config: TrainConfig, checkpointer: Checkpointer,
            group: distributed.Group) -> _Run:  # fmt: skip
    """Check the set-up, move modules and data to the device, register the parameters with
    one trace (identical for fresh and resumed runs); returns the run's fixed objects."""
    num_data = len(data)
    batches = _Batches(num_data, config.batch_size, config.seed)
    with distributed.all_or_none(group, "set-up"):
        shards = distributed.resolve_noise_shards(config.noise_shards, group.size,
                                                  batches.batch_size)  # fmt: skip
        checkpointer.refuse_start(config.resume, config.overwrite)
        current = run_settings(
            optim=optim, elbo=elbo, data=data, batch_size=batches.batch_size, seed=config.seed,
            device=config.device, world_size=group.size, noise_shards=shards,
            extra=config.settings,
        )  # fmt: skip
        unknown = sorted(set(config.allow_changed) - set(current))
        if unknown:
            raise ValueError(
                f"allow_changed names unknown setting(s) {unknown}; the settings are "
                f"{', '.join(current)}"
            )
        for module in modules_behind(model, guide):
            module.to(config.device)
        data = data.to(config.device)
        kwargs = {config.num_data_kwarg: num_data} if config.num_data_kwarg else {}
        pyro.set_rng_seed(config.seed)
        first = distributed.shard_rows(batches.next(), shards, 0)
        nesting = register_params(model, guide, data[first], **kwargs)
        if getattr(elbo, "max_plate_nesting", 0) == float("inf"):
            elbo.max_plate_nesting = nesting
        batches = _Batches(num_data, config.batch_size, config.seed)
        pyro.set_rng_seed(config.seed)
    return _Run(model, guide, elbo, optim, kwargs, group, shards, config.seed, checkpointer.path,
                config, data, batches, current)  # fmt: skip


def _resume(run: _Run, checkpointer: Checkpointer) -> _Progress:
    """Continue from the checkpoint (read and checked by rank 0, restored on every rank) when
    ``resume`` finds one; else start, every rank from rank 0's parameters."""
    group, found = run.group, None
    if run.config.resume and checkpointer.path is not None:
        with distributed.all_or_none(group, "resume"):  # rank 0 reads and checks the file
            found = checkpointer.load(run.settings, run.config.allow_changed)
        found = distributed.broadcast_object(group, found, "resume")
    if found is None:
        if group.distributed:  # every rank starts from rank 0's values
            values = distributed.broadcast_object(
                group, _parameters(run.model, run.guide) if group.main else None, "set-up"
            )
            with distributed.all_or_none(group, "set-up"):
                restore_params(values["params"], values["modules"], (run.model, run.guide))
        return _Progress(losses=[], history=[_history_entry(0, "start", {})])
    state, changed = found
    with distributed.all_or_none(group, "resume"):
        _restore(state, changed, run)
    start = int(state["step"])
    history = [*state.get("history", []), _history_entry(start, "resume", changed)]
    return _Progress(list(state["losses"]), history, start, changed)


def _step_state(run: _Run) -> dict:
    """What a step changes besides parameters and optimizer: taken before each step, so an
    interrupt raised inside a step can be checkpointed as the last completed step."""
    state_dict = getattr(run.elbo, "state_dict", None)
    return {
        "elbo": state_dict() if callable(state_dict) else None,
        "batches": run.batches.state_dict(),
        "rng": _rng_state(run.config.device),
    }


def _abandon(run: _Run, before: dict) -> None:
    """Leave gradients and the ELBO's state (baseline averages) as after the last good step."""
    zero_grads({p for _, p in pyro.get_param_store().named_parameters()})
    load_state = getattr(run.elbo, "load_state_dict", None)
    if before["elbo"] is not None and callable(load_state):
        load_state(before["elbo"])


def _snapshot(run: _Run, progress: _Progress, before: Optional[dict] = None) -> dict:
    """The checkpoint of the last completed step (``before``: the state from before the step
    in progress; ``None``: now)."""
    return {
        "version": CHECKPOINT_VERSION,
        "step": len(progress.losses),
        "losses": list(progress.losses),
        **_parameters(run.model, run.guide),
        "optim": run.optim.get_state(),
        **(before if before is not None else _step_state(run)),
        "num_data": len(run.data),
        "batch_size": run.batches.batch_size,
        "seed": run.seed,
        "settings": run.settings,
        "history": progress.history,
        "metadata": dict(run.config.metadata),
    }


def _loop(run: _Run, progress: _Progress, checkpointer: Checkpointer, timer: dict) -> None:
    """The steps, with the progress bar, SIGINT/SIGTERM deferred to the end of a step."""
    from tqdm.auto import tqdm

    config = run.config
    shown = config.progress and run.group.main
    bar = tqdm(total=config.steps, initial=min(progress.start, config.steps),
               disable=not shown, desc=config.desc)  # fmt: skip
    try:
        with _deferred_signals() as received:
            try:
                _steps(run, progress, checkpointer, bar, received, timer)
            except KeyboardInterrupt:
                # SIGINT/SIGTERM in the main thread are deferred to the end of a step; a
                # KeyboardInterrupt raised inside a step (another thread, or by the model
                # itself) abandons that step: its gradients are dropped and the checkpoint
                # holds the last completed step (the parameters are unchanged unless the
                # interrupt hit the optimizer update itself). Signals stay deferred while
                # this checkpoint is written.
                if progress.before is not None:
                    _abandon(run, progress.before)
                checkpointer.save(lambda: _snapshot(run, progress, progress.before))
                raise
    finally:
        bar.close()


def _steps(run: _Run, progress: _Progress, checkpointer: Checkpointer, bar, received: list,
           timer: dict) -> None:  # fmt: skip
    """Steps ``start + 1 .. steps``, checkpointed when due; stops after the step in progress on
    a signal (in a process group: every rank after the same step)."""
    steps, group = run.config.steps, run.group
    running = None
    for step in range(progress.start + 1, steps + 1):
        progress.before = _step_state(run)
        try:
            loss, agreed = _step(
                run, step, run.batches.next(), run.data, progress.before, received, timer
            )
        except Exception:
            _abandon(run, progress.before)
            raise
        progress.before = None
        progress.losses.append(loss)
        running = _show(bar, running, loss / len(run.data), step, steps)
        if checkpointer.due(step, steps):
            with distributed.all_or_none(group, f"the checkpoint of step {step}"):
                checkpointer.save(lambda: _snapshot(run, progress))
        # in a process group every rank stops after the same step: the first whose
        # exchange saw a signal on any rank
        stop = agreed if group.distributed else _first(received)
        if stop:
            raise Interrupted(stop)
    # a signal after the last step's exchange: every rank stops with it
    stop = _first(received)
    if group.distributed:
        stop = distributed.exchange(group, None, where="the end", signum=stop).signum
    if stop:
        raise Interrupted(stop)


def _show(bar, running: Optional[float], loss_per_image: float, step: int, steps: int) -> float:
    """The progress bar after ``step``, with a running average of the ELBO per image."""
    per_image = -loss_per_image
    running = per_image if running is None else 0.95 * running + 0.05 * per_image
    if step % 10 == 0 or step == steps:
        bar.set_postfix_str(f"elbo/image {running:.4g}", refresh=False)
    bar.update(1)
    return running


def _result(run: _Run, progress: _Progress, seconds: float, timer: dict) -> TrainResult:
    done = max(len(progress.losses) - progress.start, 0)
    return TrainResult(
        losses=progress.losses,
        step=len(progress.losses),
        seconds=seconds,
        seconds_per_step=seconds / done if done else float("nan"),
        device=run.config.device,
        elbo=run.elbo,
        checkpoint_path=run.path,
        start_step=progress.start,
        changed=progress.changed,
        world_size=run.group.size,
        rank=run.group.rank,
        noise_shards=run.noise_shards,
        communication=dict(timer),
    )


def _first(received: list) -> int:
    return received[0] if received else 0


def _raise_if_non_finite(
    exc: Exception, step: int, model, guide, args: tuple, kwargs: dict, path: Optional[Path]
) -> None:
    """Turn a failed step into :class:`NonFiniteTrainingError` when something was NaN/Inf."""
    loss = getattr(exc, "loss", None)
    params = list(getattr(exc, "params", []) if isinstance(exc, _NonFiniteStep) else [])
    sites = _non_finite_sites(model, guide, args, kwargs)
    if not sites and not params and not isinstance(exc, _NonFiniteStep):
        if not isinstance(getattr(exc, "sites", None), list):
            return  # an ordinary error, not a NaN/Inf: re-raised as it is
        sites = list(exc.sites)
    bad_inputs = sum(int((~torch.isfinite(a)).sum()) for a in args if torch.is_tensor(a))
    note = f"the minibatch holds {bad_inputs} non-finite values; " if bad_inputs else ""
    if path is not None:
        note += f"last good checkpoint {path} left untouched" if path.exists() else "no checkpoint"
    raise NonFiniteTrainingError(step, sites, params, loss, note) from exc
