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
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
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
    "Interrupted",
    "NonFiniteTrainingError",
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
    """What every step of one :func:`train` call uses (fixed for the call)."""

    model: Callable
    guide: Callable
    elbo: Any
    optim: Any
    kwargs: dict
    group: distributed.Group
    noise_shards: int
    seed: int
    path: Optional[Path]

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


def _checked_checkpoint(path: Path, settings: dict, allow_changed: Collection[str]) -> tuple:
    """Load ``path`` and check its settings against ``settings``; returns ``(state, accepted
    changes)`` or raises, naming every refused setting."""
    state = load_checkpoint(path)
    if state.get("settings") is None:
        raise CheckpointError(
            f"{path}: a version-1 checkpoint does not record the settings a resume must match "
            "(learning rate, data, thread count, ...), so it cannot be resumed; export and "
            "audit still read it. Start a new run (overwrite, or another folder)"
        )
    changed = changed_settings({**_LAYOUT_OF_OLDER_CHECKPOINTS, **state["settings"]}, settings)
    refused = {name: values for name, values in changed.items() if name not in allow_changed}
    if refused:
        raise SettingsMismatchError(path, refused, note=_layout_note(refused))
    return state, changed


def _restore(state: dict, changed: Mapping, settings: dict, live: dict) -> None:
    """Load a checked checkpoint ``state`` into the live objects (``model``, ``guide``,
    ``optim``, ``elbo``, ``batches``).

    Accepted changes take effect: optimizer hyperparameters are written into the restored
    optimizer state; another optimizer starts without state; other data, number of images or
    batch size start a new batch order; another seed re-seeds the RNGs from this step on."""
    restore_params(state["params"], state["modules"], (live["model"], live["guide"]))
    optim, elbo, batches = live["optim"], live["elbo"], live["batches"]
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

    :param model, guide: Pyro callables taking a minibatch ``data[idx]`` (and
        ``num_data_kwarg=N`` unless that is ``None``); ``nn.Module`` s behind them (or behind
        their bound methods) are moved to ``device``.
    :param steps: total number of steps, counting those already in a resumed checkpoint.
    :param batch_size: images per step in all (the global batch, split over the ranks).
    :param lr: Adam's learning rate when ``optim`` is not given.
    :param elbo: default ``RoutedELBO()``; an infinite ``max_plate_nesting`` is set from a trace.
    :param checkpoint_path: where to save every ``checkpoint_every`` steps, at the end and on
        SIGINT/SIGTERM (after the step in progress completes); never after a non-finite step.
        Its folder is checked writable, with room for a checkpoint, before the first step.
    :param resume: continue from ``checkpoint_path`` when it exists (else start afresh).
    :param overwrite: start afresh even though ``checkpoint_path`` exists (replacing it at the
        first save); without it (and without ``resume``) an existing checkpoint is an error.
    :param allow_changed: names of settings (see :func:`run_settings`; e.g. ``{"lr"}``) that
        may differ from the resumed checkpoint's; any other difference is refused.
    :param settings: more settings to record and check on resume (e.g. the model's
        configuration); plain data.
    :param metadata: plain data stored in the checkpoint and not checked (e.g. where the
        data came from).
    :param process_group: data-parallel training (see :mod:`pyro_reparam_conv.distributed`):
        ``"auto"`` uses torch's default process group when one is initialized, or makes one
        from ``torchrun``'s environment (gloo on the CPU, NCCL with ``cuda:LOCAL_RANK``);
        a ``ProcessGroup`` is used as it is; ``None`` trains in this process alone. Rank 0
        shows the progress bar and writes the checkpoints; every rank returns the same
        losses and ends with the same parameters.
    :param noise_shards: the global batch is computed as this many shards of
        ``batch_size / noise_shards`` images, each with noise re-seeded from ``(seed, step,
        shard)`` (default: the world size; a multiple of it that divides ``batch_size``). The
        same value gives the same noise on any number of processes, and bit-identical
        parameters on 1 or 2 (on more, equal to float summation order); ``1`` on one process
        is the plain SVI step.
    :param timeout: seconds a collective waits for the other ranks of a process group that
        ``train`` makes itself.
    :raises NonFiniteTrainingError: naming the step and the sites (or parameters) that were
        not finite; the parameters are left as after the last good step.
    :raises SettingsMismatchError: on resume, naming each setting that differs.
    :raises CheckpointExistsError: ``checkpoint_path`` exists and neither ``resume`` nor
        ``overwrite`` is set.
    :raises Interrupted: after SIGINT/SIGTERM, once the checkpoint is written.
    :raises RankFailedError: in a process group, on every rank, instead of any of the above
        (it names the rank that failed, and chains the original error there).
    """
    arguments = dict(locals())  # handed on to _train, with the ones checked below replaced
    if steps < 0 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("steps must be >= 0, batch_size and checkpoint_every >= 1")
    if not isinstance(data, torch.Tensor) or data.ndim < 1 or len(data) == 0:
        raise ValueError("data must be a non-empty tensor with the images along dim 0")
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if elbo is None:
        from .elbo import RoutedELBO

        elbo = RoutedELBO()
    optim = optim if optim is not None else pyro.optim.Adam({"lr": lr})
    device = resolve_device(device)
    with distributed.joined(process_group, device, timeout) as group:
        device = distributed.rank_device(device, group)
        checked = dict(elbo=elbo, optim=optim, device=device, checkpoint_path=checkpoint_path)
        return _train(group, **{**arguments, **checked})


def _parameters(model: Callable, guide: Callable) -> dict:
    """Copies of the param store's values and the modules' state (buffers included)."""
    return {
        "params": {
            name: p.detach().cpu().clone() for name, p in pyro.get_param_store().named_parameters()
        },
        "modules": [m.state_dict() for m in modules_behind(model, guide)],
    }


def _train(group: distributed.Group, **arguments) -> TrainResult:
    """:func:`train` in ``group``, given its arguments (checked, ``optim`` and ``elbo`` made)."""
    opts = SimpleNamespace(**arguments)
    model, guide, data = opts.model, opts.guide, opts.data
    elbo, optim, device, checkpoint_path = opts.elbo, opts.optim, opts.device, opts.checkpoint_path
    num_data = len(data)
    batches = _Batches(num_data, opts.batch_size, opts.seed)
    with distributed.all_or_none(group, "set-up"):
        shards = distributed.resolve_noise_shards(opts.noise_shards, group.size, batches.batch_size)
        if checkpoint_path is not None and not opts.resume and not opts.overwrite and group.main:
            refuse_overwrite(
                checkpoint_path, "pass resume=True to continue it, or overwrite=True to replace it"
            )
        current = run_settings(
            optim=optim,
            elbo=elbo,
            data=data,
            batch_size=batches.batch_size,
            seed=opts.seed,
            device=device,
            world_size=group.size,
            noise_shards=shards,
            extra=opts.settings,
        )
        unknown = sorted(set(opts.allow_changed) - set(current))
        if unknown:
            raise ValueError(
                f"allow_changed names unknown setting(s) {unknown}; the settings are "
                f"{', '.join(current)}"
            )
        for module in modules_behind(model, guide):
            module.to(device)
        data = data.to(device)
        kwargs = {opts.num_data_kwarg: num_data} if opts.num_data_kwarg else {}

        # Set-up identical for fresh and resumed runs: register parameters with one trace.
        pyro.set_rng_seed(opts.seed)
        first = distributed.shard_rows(batches.next(), shards, 0)
        nesting = register_params(model, guide, data[first], **kwargs)
        if getattr(elbo, "max_plate_nesting", 0) == float("inf"):
            elbo.max_plate_nesting = nesting
        batches = _Batches(num_data, opts.batch_size, opts.seed)
        pyro.set_rng_seed(opts.seed)

    losses: list[float] = []
    start, changed, found = 0, {}, None
    history = [_history_entry(0, "start", {})]
    if opts.resume and checkpoint_path is not None:
        with distributed.all_or_none(group, "resume"):  # rank 0 reads and checks the file
            if group.main and checkpoint_path.exists():
                found = _checked_checkpoint(checkpoint_path, current, opts.allow_changed)
        found = distributed.broadcast_object(group, found, "resume")
    if found is not None:
        state, changed = found
        live = dict(model=model, guide=guide, optim=optim, elbo=elbo, batches=batches)
        with distributed.all_or_none(group, "resume"):
            _restore(state, changed, current, live)
        losses, start = list(state["losses"]), int(state["step"])
        history = [*state.get("history", []), _history_entry(start, "resume", changed)]
    elif group.distributed:  # every rank starts from rank 0's values
        values = distributed.broadcast_object(
            group, _parameters(model, guide) if group.main else None, "set-up"
        )
        with distributed.all_or_none(group, "set-up"):
            restore_params(values["params"], values["modules"], (model, guide))

    elbo_state_dict = getattr(elbo, "state_dict", None)
    elbo_load_state = getattr(elbo, "load_state_dict", None)

    def step_state() -> dict:
        """What a step changes besides parameters and optimizer: taken before each step, so
        an interrupt raised inside a step can be checkpointed as the last completed step."""
        return {
            "elbo": elbo_state_dict() if callable(elbo_state_dict) else None,
            "batches": batches.state_dict(),
            "rng": _rng_state(device),
        }

    def abandon(before: dict) -> None:
        """Leave gradients and the ELBO's state (baseline averages) as after the last good
        step."""
        zero_grads({p for _, p in pyro.get_param_store().named_parameters()})
        if before["elbo"] is not None and callable(elbo_load_state):
            elbo_load_state(before["elbo"])

    def snapshot(before_step: Optional[dict] = None) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": len(losses),
            "losses": list(losses),
            **_parameters(model, guide),
            "optim": optim.get_state(),
            **(before_step if before_step is not None else step_state()),
            "num_data": num_data,
            "batch_size": batches.batch_size,
            "seed": opts.seed,
            "settings": current,
            "history": history,
            "metadata": dict(opts.metadata or {}),
        }

    def checkpoint(before_step: Optional[dict] = None) -> None:
        if checkpoint_path is not None and group.main:
            save_checkpoint(checkpoint_path, snapshot(before_step))

    with distributed.all_or_none(group, "set-up"):  # fail now, not after checkpoint_every steps
        if checkpoint_path is not None and group.main:
            size = len(encode_checkpoint(snapshot()))
            check_writable(checkpoint_path.parent, size, checkpoint_path.name)

    from tqdm.auto import tqdm

    steps = opts.steps
    run = _Run(model, guide, elbo, optim, kwargs, group, shards, opts.seed, checkpoint_path)
    shown = opts.progress and group.main
    bar = tqdm(total=steps, initial=min(start, steps), disable=not shown, desc=opts.desc)
    running = None
    timer = {"exchange": 0.0, "all_reduce": 0.0}  # seconds in collectives
    before: Optional[dict] = None  # state before the step in progress; None between steps
    t0 = time.perf_counter()
    try:
        with _deferred_signals() as received:
            try:
                for step in range(start + 1, steps + 1):
                    before = step_state()
                    try:
                        loss, agreed = _step(
                            run, step, batches.next(), data, before, received, timer
                        )
                    except Exception:
                        abandon(before)
                        raise
                    before = None
                    losses.append(loss)
                    per_image = -loss / num_data
                    running = per_image if running is None else 0.95 * running + 0.05 * per_image
                    if step % 10 == 0 or step == steps:
                        bar.set_postfix_str(f"elbo/image {running:.4g}", refresh=False)
                    bar.update(1)
                    if step % opts.checkpoint_every == 0 or step == steps:
                        with distributed.all_or_none(group, f"the checkpoint of step {step}"):
                            checkpoint()
                    # in a process group every rank stops after the same step: the first
                    # whose exchange saw a signal on any rank
                    stop = agreed if group.distributed else _first(received)
                    if stop:
                        raise Interrupted(stop)
                # a signal after the last step's exchange: every rank stops with it
                stop = _first(received)
                if group.distributed:
                    stop = distributed.exchange(group, None, where="the end", signum=stop).signum
                if stop:
                    raise Interrupted(stop)
            except KeyboardInterrupt:
                # SIGINT/SIGTERM in the main thread are deferred to the end of a step; a
                # KeyboardInterrupt raised inside a step (another thread, or by the model
                # itself) abandons that step: its gradients are dropped and the checkpoint
                # holds the last completed step (the parameters are unchanged unless the
                # interrupt hit the optimizer update itself). Signals stay deferred while
                # this checkpoint is written.
                if before is not None:
                    abandon(before)
                checkpoint(before)
                raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    done = max(len(losses) - start, 0)
    return TrainResult(
        losses=losses,
        step=len(losses),
        seconds=seconds,
        seconds_per_step=seconds / done if done else float("nan"),
        device=device,
        elbo=elbo,
        checkpoint_path=checkpoint_path,
        start_step=start,
        changed=changed,
        world_size=group.size,
        rank=group.rank,
        noise_shards=shards,
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
