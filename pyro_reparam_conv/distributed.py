"""Synchronous data-parallel SVI on ``torch.distributed``: process groups from ``torchrun``,
noise shards, the all-reduce of gradients and baseline state, and failures shared by all ranks.

Each SVI step is one step of synchronous data-parallel SGD (Dean et al. 2012, "Large Scale
Distributed Deep Networks"; Goyal et al. 2017, "Accurate, Large Minibatch SGD"): every rank
draws the same global minibatch (same seed, same order), computes the ELBO gradient of its
own rows, and the gradients are summed across ranks before one identical optimizer step on
every rank. ``torchrun`` starts the processes; the collectives run on gloo (CPU) or NCCL (GPU).

**Noise shards.** The global batch of ``B`` images is cut into ``S`` *noise shards* of
``B / S`` images (``S`` a multiple of the world size ``W``; default ``S = W``); rank ``r``
computes shards ``r S / W, ..., (r + 1) S / W - 1``. Before shard ``j`` of step ``t`` the RNGs
are re-seeded from ``(seed, t, j)`` (:func:`shard_seed`), so every draw depends on the shard,
never on which rank or how many ranks compute it: ``W = 2, S = 2`` and ``W = 1, S = 2`` (one
process computing both shards in turn) draw the same noise for every image. Each shard's
sample sites are scaled by ``1 / S`` (``poutine.scale``) on top of the model's own plate scale
``N / (B / S)``, so a shard's loss, surrogate and score-function costs are on the scale of a
``B``-image minibatch and their *sum* over shards is the usual estimate of the full-data ELBO
(Pyro leaves the score function itself unscaled, so the surrogate is linear in the scale).

**What is reduced, and when** (once per step, after the local shards, before the update):

1. :func:`exchange` (one small float64 all-reduce): per rank, whether its shards failed, a
   signal it received (Ctrl-C, SIGTERM), a hash of its gradient and state layout, and its
   loss. A failure on any rank is raised on every rank as :class:`RankFailedError` naming
   the first failed rank (its message is gathered only then); a signal stops all ranks after
   the same step; layouts that differ (another param set, other baseline shapes) are an
   error before they can corrupt the sum. The loss is summed.
2. :func:`all_reduce_sum` (one all-reduce per dtype, one flat buffer): the gradients of every
   parameter in the param store (guide and model, modules registered through
   ``pyro.module``), which parameters had a gradient, and the ELBO's state (decaying-average
   baselines) summed over the local shards. Gradients are summed (the shards are already
   scaled by ``1 / S``); the state is divided by ``S``: the mean over shards of each shard's
   update ``beta b + (1 - beta) c_j``.

**Exactness.** Shards on one rank are added in the order of :func:`tree_sum` (halves first),
the order one process uses for all ``S`` shards, and an all-reduce of two summands is exact
to reorder: on 1 or 2 processes the same ``S`` gives bit-identical parameters (CPU). With more
processes the backend's all-reduce has its own summation order: equal to float rounding per
step (Adam can turn rounding-level gradients into ``lr``-sized steps of those parameters).

A process that dies without raising (killed, out of memory) cannot take part: the others'
next collective fails (gloo sees the socket close) or times out (the process group's
``timeout``), and :class:`RankFailedError` says so; ``torchrun`` reports the dead rank.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import numpy as np
import torch

__all__ = [
    "DEFAULT_TIMEOUT",
    "Group",
    "RankFailedError",
    "SINGLE",
    "Status",
    "all_or_none",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "exchange",
    "flatten_state",
    "group_of",
    "joined",
    "free_port",
    "launch",
    "launched_by_torchrun",
    "layout_mismatch",
    "layout_key",
    "local_shards",
    "rank_device",
    "resolve_noise_shards",
    "shard_rows",
    "shard_seed",
    "tree_sum",
    "unflatten_state",
]

T = TypeVar("T")

#: seconds a collective may wait for the other ranks before it fails (process-group timeout)
DEFAULT_TIMEOUT = 300.0

#: variables ``torchrun`` sets for every worker
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailedError(RuntimeError):
    """A data-parallel run stopped on every rank because of one rank, or because the ranks
    lost each other.

    ``rank``: the (first) rank whose code raised, or ``None`` when no single rank did (a rank
    died or timed out; the ranks disagree). ``where``: ``"step 3"``, ``"set-up"``, ...
    ``origin``: the names of the original exception's classes (its MRO), so a caller can tell
    a user error (``"ValueError"`` in it) from a bug. ``agreed``: every rank raised it at the
    same point (all are alive and can still meet in a collective), unlike a lost contact. On
    the failed rank itself the original exception is the ``__cause__``.
    """

    def __init__(
        self,
        rank: Optional[int],
        where: str,
        origin: Sequence[str],
        message: str,
        agreed: bool = True,
    ) -> None:
        self.rank, self.where, self.origin, self.agreed = rank, where, tuple(origin), agreed
        who = f"rank {rank} failed" if rank is not None else "the ranks stopped"
        super().__init__(f"{who} at {where}: {message}")


@dataclass(frozen=True)
class Group:
    """A process group as this process sees it: this process's ``rank``, the world ``size``,
    the ``device`` its collectives use (the GPU for NCCL, else the CPU), and which group:
    torch's default group (``world``, looked up when used, so that nothing here keeps it
    alive after it is destroyed), a ``custom`` one, or neither (a single process)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    world: bool = False
    custom: Any = None

    @property
    def distributed(self) -> bool:
        """Whether there are collectives to make (a group of one process included)."""
        return self.world or self.custom is not None

    @property
    def handle(self) -> Any:
        """The torch process group (``None`` for a single process)."""
        import torch.distributed as dist

        return dist.group.WORLD if self.world else self.custom

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and shows progress."""
        return self.rank == 0


#: one process, no collectives
SINGLE = Group()


# ------------------------------------------------------------------ noise shards (pure)
def resolve_noise_shards(noise_shards: Optional[int], world_size: int, batch_size: int) -> int:
    """``noise_shards`` (default: the world size), checked: a positive multiple of the world
    size that divides the global batch size."""
    shards = world_size if noise_shards is None else noise_shards
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"noise_shards must be a positive integer, got {noise_shards!r}")
    if shards % world_size:
        raise ValueError(
            f"noise_shards {shards} is not a multiple of the world size {world_size} (every "
            f"rank computes the same number of shards); use {world_size} or a multiple of it"
        )
    if batch_size % shards:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by noise_shards {shards} (the world "
            f"size unless set): use a batch size that is a multiple of {shards}"
        )
    return shards


def local_shards(noise_shards: int, world_size: int, rank: int) -> range:
    """The noise shards rank ``rank`` computes: a contiguous block of ``noise_shards /
    world_size``."""
    per_rank = noise_shards // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def shard_rows(indices: torch.Tensor, noise_shards: int, shard: int) -> torch.Tensor:
    """Shard ``shard`` of a global minibatch's indices: the ``shard``-th of ``noise_shards``
    equal, contiguous blocks."""
    return indices.reshape(noise_shards, -1)[shard]


def tree_sum(values: Sequence[T], add: Callable[[T, T], T]) -> T:
    """``values`` summed pairwise in a fixed order: the first half and the second half
    (split at ``len // 2``) each summed the same way, then added. One process summing all
    ``S`` shards and two ranks each summing its half (then the all-reduce adding the two
    halves, which is exact to reorder) perform the same float additions."""
    if len(values) == 1:
        return values[0]
    middle = len(values) // 2
    return add(tree_sum(values[:middle], add), tree_sum(values[middle:], add))


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The RNG seed of noise shard ``shard`` at step ``step``: a 32-bit integer from NumPy's
    ``SeedSequence`` of ``(seed, step, shard)`` (well mixed: neighbouring steps and shards
    give unrelated streams)."""
    entropy = [seed % 2**64, step, shard]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


# ------------------------------------------------------------------ state dictionaries
def flatten_state(state: Mapping, prefix: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """A nested dictionary of floating-point tensors (an ELBO's ``state_dict``) as
    ``[(key path, tensor)]``, sorted by path."""
    items: list[tuple[tuple, torch.Tensor]] = []
    for key in sorted(state, key=str):
        value, path = state[key], (*prefix, key)
        if isinstance(value, Mapping):
            items.extend(flatten_state(value, path))
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            items.append((path, value))
        else:
            raise TypeError(
                f"ELBO state entry {'/'.join(map(str, path))} is a {type(value).__name__}, "
                "not a floating-point tensor: data-parallel training averages the ELBO's "
                "state over noise shards, so every entry must be one"
            )
    return items


def unflatten_state(items: Sequence[tuple[tuple, torch.Tensor]]) -> dict:
    """The inverse of :func:`flatten_state`."""
    state: dict = {}
    for path, value in items:
        node = state
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return state


def layout_key(params: Sequence[tuple[str, torch.Tensor]], state: Sequence[tuple]) -> str:
    """What the flat all-reduce buffer is made of: parameter names, shapes and dtypes, then
    the state's key paths and shapes. Every rank must have the same."""
    parts = [f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in params]
    parts += [f"{'/'.join(map(str, path))}:{tuple(t.shape)}" for path, t in state]
    return ";".join(parts)


def _hash48(text: str) -> float:
    """A 48-bit hash of ``text`` as a float (exact in float64, so sums of it are exact)."""
    return float(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big"))


# ------------------------------------------------------------------ process group
def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a ``torchrun`` worker (all of its variables are set)."""
    return all(name in environ for name in _TORCHRUN_VARIABLES)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, group: Group) -> torch.device:
    """The device of one rank: in a process group, ``cuda`` without an index means
    ``cuda:LOCAL_RANK`` (one GPU per process on each machine; the current CUDA device when
    ``LOCAL_RANK`` is not set); anything else as given."""
    if not group.distributed or device.type != "cuda" or device.index is not None:
        return device
    local = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())


def group_of(handle: Any) -> Group:
    """:class:`Group` for a torch process group (``None``: the default group)."""
    import torch.distributed as dist

    pg = handle if handle is not None else dist.group.WORLD
    device = torch.device("cpu")
    if dist.get_backend(pg) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    rank, size = dist.get_rank(pg), dist.get_world_size(pg)
    return Group(rank, size, device, world=handle is None, custom=handle)


@contextmanager
def joined(
    process_group: Any = "auto",
    device: torch.device = torch.device("cpu"),
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[Group]:
    """The :class:`Group` to train in.

    ``"auto"``: torch's default group when one is initialized; else, in a ``torchrun``
    worker, a new one from its environment (gloo for a CPU ``device``, NCCL for CUDA with
    ``cuda:LOCAL_RANK`` as the current device, collectives failing after ``timeout``
    seconds), destroyed on exit; else a single process. ``None``: a single process. A torch
    ``ProcessGroup``: that group. A :class:`Group`: itself.
    """
    import torch.distributed as dist

    if process_group is None:
        yield SINGLE
        return
    if isinstance(process_group, Group):
        yield process_group
        return
    if not isinstance(process_group, str):
        yield group_of(process_group)
        return
    if process_group != "auto":
        raise ValueError(
            f"process_group {process_group!r}: give 'auto', None or a torch ProcessGroup"
        )
    if not dist.is_available() or (not dist.is_initialized() and not launched_by_torchrun()):
        yield SINGLE
        return
    if dist.is_initialized():
        yield group_of(None)
        return
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        _backend(device), init_method="env://", timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        yield group_of(None)
    finally:
        # leave together: a gloo group destroyed while a peer still tears its own down may
        # abort the process ("terminate called without an active exception")
        with suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------ collectives
def _lost(where: str, err: BaseException) -> RankFailedError:
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    return RankFailedError(
        None,
        where,
        [c.__name__ for c in type(err).__mro__],
        "lost contact with another rank (it exited, was killed, or the process-group "
        f"timeout passed): {reason}",
        agreed=False,
    )


@contextmanager
def _collective(where: str) -> Iterator[None]:
    """A collective whose failure (a peer gone, a timeout) becomes :class:`RankFailedError`."""
    try:
        yield
    except RuntimeError as err:
        raise _lost(where, err) from err


def _describe(failure: Optional[BaseException]) -> Optional[tuple[list[str], str]]:
    if failure is None:
        return None
    message = " ".join(str(failure).split())[:2000] or type(failure).__name__
    return [c.__name__ for c in type(failure).__mro__], f"{type(failure).__name__}: {message}"


@dataclass(frozen=True)
class Status:
    """What :func:`exchange` agreed on: the loss summed over ranks, the signal to stop on
    (0: none), and whether all ranks have the same layout key."""

    loss: float
    signum: int
    same_layout: bool


def exchange(
    group: Group,
    failure: Optional[BaseException],
    *,
    where: str,
    loss: float = 0.0,
    signum: int = 0,
    key: str = "",
) -> Status:
    """Share each rank's outcome of a phase (one float64 all-reduce of ``3 W + 1`` numbers).

    ``failure``: the exception this rank's part raised, if any. When any rank failed, every
    rank raises :class:`RankFailedError` naming the first failed rank (chained to the original
    exception on that rank). Otherwise returns the summed ``loss``, the largest ``signum``
    any rank received and whether every rank's ``key`` (:func:`layout_key`) is the same. On a
    single process: ``failure`` is re-raised as it is.
    """
    if not group.distributed:
        if failure is not None:
            raise failure
        return Status(loss, signum, True)
    import torch.distributed as dist

    size, rank = group.size, group.rank
    status = torch.zeros(3 * size + 1, dtype=torch.float64, device=group.device)
    status[rank] = float(failure is not None)
    status[size + rank] = float(signum)
    status[2 * size + rank] = _hash48(key)
    status[3 * size] = float(loss)
    with _collective(where):
        dist.all_reduce(status, group=group.handle)
    values = status.tolist()
    failed = [r for r in range(size) if values[r]]
    if failed:
        described: list = [None] * size
        with _collective(where):
            dist.all_gather_object(described, _describe(failure), group=group.handle)
        origin, message = described[failed[0]]
        raise RankFailedError(failed[0], where, origin, message) from failure
    hashes = values[2 * size : 3 * size]
    return Status(values[3 * size], int(max(values[size : 2 * size])), len(set(hashes)) == 1)


@contextmanager
def all_or_none(group: Group, where: str) -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, raise on all (see
    :func:`exchange`). A single process runs the block as it is."""
    if not group.distributed:
        yield
        return
    failure: Optional[Exception] = None
    try:
        yield
    except Exception as exc:
        failure = exc
    try:
        exchange(group, failure, where=where)
    finally:
        failure = None  # no cycle through this frame: the group is freed when destroyed


def layout_mismatch(group: Group, key: str, where: str) -> RankFailedError:
    """After :func:`exchange` found different layout keys: gather them (all ranks take
    part) and say which rank differs from rank 0, and how."""
    import torch.distributed as dist

    keys: list = [None] * group.size
    with _collective(where):
        dist.all_gather_object(keys, key, group=group.handle)
    reference = set(keys[0].split(";"))
    details = []
    for rank, other in enumerate(keys[1:], start=1):
        entries = set(other.split(";"))
        if entries != reference:
            only = sorted(entries - reference)[:3]
            missing = sorted(reference - entries)[:3]
            details.append(f"rank {rank} has {only} where rank 0 has {missing}")
    return RankFailedError(
        None,
        where,
        ["ValueError"],
        "the ranks' parameters or ELBO state differ (" + "; ".join(details) + "); every "
        "rank must create the same parameters and the same plates (equal noise shards)",
    )


def all_reduce_sum(group: Group, tensors: Sequence[torch.Tensor], where: str) -> list[torch.Tensor]:
    """Sum every tensor over the ranks: one flat buffer and one all-reduce per dtype (on the
    group's device); returns the sums with the original shapes, devices and dtypes."""
    if not group.distributed:
        return list(tensors)
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(i)
    reduced: list[Optional[torch.Tensor]] = [None] * len(tensors)
    for members in by_dtype.values():
        flat = torch.cat([tensors[i].detach().reshape(-1).to(group.device) for i in members])
        with _collective(where):
            dist.all_reduce(flat, group=group.handle)
        for i, part in zip(members, flat.split([tensors[i].numel() for i in members])):
            reduced[i] = part.view_as(tensors[i]).to(tensors[i].device)
    return reduced  # type: ignore[return-value]


def barrier(group: Group, where: str) -> None:
    """Wait until every rank is here."""
    if not group.distributed:
        return
    import torch.distributed as dist

    with _collective(where):
        dist.barrier(group=group.handle)


def broadcast_object(group: Group, obj: Any, where: str) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; tensors come back on the CPU)."""
    if not group.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if group.main else None]
    with _collective(where):
        dist.broadcast_object_list(box, src=0, group=group.handle, device=group.device)
    return box[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the OS picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------ launching
@contextmanager
def _quiet_logging() -> Iterator[None]:
    """torchrun's agent logs each failed worker on stderr; here the workers say why."""
    import logging

    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def launch(nproc: int, argv: Sequence[str]) -> tuple[int, Optional[str]]:
    """Run ``python -m pyro_reparam_conv.cli *argv`` as ``nproc`` workers of torchrun's
    elastic agent (``torchrun --nproc-per-node nproc``) on this machine, rendezvous on
    127.0.0.1 at a free port, no restarts; wait for them.

    Returns ``(exit status, message)``: ``(0, None)`` when every worker succeeded; else the
    status of the first rank that exited by itself (it has printed its own error; the agent
    stops the others with SIGTERM); when every failed worker was killed by a signal,
    ``128 + signal`` and a line naming the rank; for a signal sent to this launcher (which
    passes it on to the workers), ``128 + signal``.
    """
    import signal
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"pyro-reparam-conv-{uuid.uuid4().hex[:12]}",
        rdzv_backend="static",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"rank": 0},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    with _quiet_logging():
        try:
            elastic_launch(config, sys.executable)("-m", "pyro_reparam_conv.cli", *argv)
        except ChildFailedError as err:
            # a worker that exited by itself has said why; the agent stops the others (SIGTERM)
            exited = sorted((r, f.exitcode) for r, f in err.failures.items() if f.exitcode > 0)
            if exited:
                return exited[0][1], None
            rank, failure = min(err.failures.items())
            name = signal.Signals(-failure.exitcode).name
            return 128 - failure.exitcode, f"rank {rank} was killed by {name}"
        except SignalException as err:
            return 128 + int(err.sigval), None
    return 0, None
