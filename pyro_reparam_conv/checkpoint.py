"""Checkpoint files: a checksummed format written atomically, the run settings a resume must
match, and the checks made before training (no silent overwrite, a writable folder).

File format (version 2): one ASCII header line, then the payload, a ``torch.save`` of the
state dictionary::

    pyro_reparam_conv checkpoint v2 bytes=<payload length> sha256=<hex digest of payload>\\n
    <payload>

:func:`load_checkpoint` checks the header, the length (a truncated copy is named as such)
and the SHA-256 of the payload (one flipped byte is an error naming the file) before
unpickling it with ``weights_only=True`` (no code in the file is run). Version-1 files (a
bare ``torch.save``, no checksum, no settings) are still read, for ``export``, ``audit``
and :func:`~pyro_reparam_conv.train.load_params`; they cannot be resumed.

Writing is atomic: temporary file ``.<name>.<pid>.<random>.tmp`` in the same folder, fsync,
``os.replace``, fsync of the folder. A process killed while saving leaves its temporary file
behind; the next save to the same checkpoint removes it (temporary files of a process that
is still running are left alone).

Settings (:func:`changed_settings`): a checkpoint records what the run depended on (learning
rate, seed, batch size, a SHA-256 of the data, thread count, device, ...). Resuming with any
of them different is a :class:`SettingsMismatchError` naming each one and both values,
unless the change is accepted explicitly (``allow_changed``); accepted changes are recorded
in the checkpoint's ``history``.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import re
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any, Mapping, Union

import torch

__all__ = [
    "CHECKPOINT_VERSION",
    "NOT_RECORDED",
    "CheckpointError",
    "CheckpointExistsError",
    "SettingsMismatchError",
    "changed_settings",
    "check_writable",
    "data_fingerprint",
    "encode_checkpoint",
    "load_checkpoint",
    "refuse_overwrite",
    "save_checkpoint",
    "stale_temp_files",
]

CHECKPOINT_VERSION = 2
_MAGIC = b"pyro_reparam_conv checkpoint v"
_HEADER = re.compile(rb"pyro_reparam_conv checkpoint v(\d+) bytes=(\d+) sha256=([0-9a-f]{64})\n")
_MAX_HEADER = 200

#: Shown for a setting the checkpoint does not record.
NOT_RECORDED = "(not recorded)"

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint: corrupt, truncated, not a checkpoint, or a
    version that cannot be resumed. The message names the file."""


class CheckpointExistsError(FileExistsError):
    """A checkpoint is in the way of a new run (it would be overwritten)."""


class SettingsMismatchError(ValueError):
    """Resuming with settings that differ from the checkpoint's; ``changed`` maps each
    setting to ``(value in the checkpoint, value now)``; ``note`` (optional) says more."""

    def __init__(self, path: PathLike, changed: Mapping[str, tuple], note: str = "") -> None:
        self.path, self.changed = Path(path), dict(changed)
        listed = "; ".join(
            f"{name}: checkpoint {_shown(old)}, now {_shown(new)}"
            for name, (old, new) in self.changed.items()
        )
        names = ",".join(self.changed)
        super().__init__(
            f"{path} was saved with other settings ({listed}); resume with the checkpoint's "
            f"settings, or accept the change with --allow-changed {names} "
            f"(Python: train(..., allow_changed={sorted(self.changed)}))"
            + (f"; {note}" if note else "")
        )


def _shown(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]  # "sha256:" and 12 hex digits
    return repr(value) if isinstance(value, str) and value != NOT_RECORDED else str(value)


# ------------------------------------------------------------------------- settings
def data_fingerprint(data: torch.Tensor) -> str:
    """``"sha256:<hex>"`` of a tensor's dtype, shape and bytes (on the CPU): two data sets
    with the same size and shape but other values get different fingerprints."""
    flat = data.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype} {tuple(data.shape)}\n".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """``{name: (saved value, current value)}`` for every setting that differs; one that only
    one side records is shown as :data:`NOT_RECORDED` on the other."""
    names = list(dict.fromkeys([*current, *saved]))
    return {
        name: (saved.get(name, NOT_RECORDED), current.get(name, NOT_RECORDED))
        for name in names
        if name not in saved or name not in current or saved[name] != current[name]
    }


# ------------------------------------------------------------------------- safety checks
def refuse_overwrite(path: PathLike, how: str) -> None:
    """Raise :class:`CheckpointExistsError` when ``path`` exists; ``how`` says what to do
    instead (continue it, or replace it explicitly)."""
    path = Path(path)
    if path.exists():
        raise CheckpointExistsError(f"{path} exists (a previous run's checkpoint); {how}")


def check_writable(folder: PathLike, size: int = 0, name: str = "checkpoint.pt") -> None:
    """Create ``folder`` (and parents) and write, then remove, a temporary file of ``size``
    bytes in it: a read-only folder, or one without room for ``size`` bytes, fails here
    (``OSError``) instead of at the first checkpoint. The temporary file is named like those
    of :func:`save_checkpoint` for ``name``, so a probe cut short is removed by its next save."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            block, remaining = bytes(min(size, 1 << 20)), size
            while remaining > 0:
                remaining -= f.write(block[:remaining])
            f.flush()
    finally:
        os.unlink(tmp)


# ------------------------------------------------------------------------- writing
def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def encode_checkpoint(state: dict) -> bytes:
    """The bytes of a checkpoint file for ``state`` (header line and payload)."""
    buffer = io.BytesIO()
    torch.save({**state, "version": CHECKPOINT_VERSION}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = f"pyro_reparam_conv checkpoint v{CHECKPOINT_VERSION} bytes={len(payload)} "
    return header.encode() + f"sha256={digest}\n".encode() + payload


def save_checkpoint(path: PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically with a checksum (see the module docstring),
    then remove temporary files that killed saves of the same checkpoint left behind. On any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    data = encode_checkpoint(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    for stale in stale_temp_files(path):
        with suppress(OSError):
            stale.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own saves have finished: what is left is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_files(path: PathLike) -> list[Path]:
    """Temporary files of saves of ``path`` that did not finish: ``.<name>.*.tmp`` in its
    folder, except those of another process that is still running."""
    path = Path(path)
    stale = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        middle = candidate.name[len(path.name) + 2 : -len(".tmp")]
        pid = middle.split(".", 1)[0]
        if pid.isdigit() and "." in middle and _process_alive(int(pid)):
            continue
        stale.append(candidate)
    return sorted(stale)


# ------------------------------------------------------------------------- reading
def _unpickle(path: Path, payload: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {reason}); the "
            "file is corrupt or truncated -- use an intact copy"
        ) from err


def _decode(path: Path, raw: bytes) -> dict:
    match = _HEADER.match(raw[:_MAX_HEADER])
    if match is None:
        raise CheckpointError(f"{path}: the checkpoint header is damaged; the file is corrupt")
    version, size, digest = int(match[1]), int(match[2]), match[3].decode()
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}; this pyro_reparam_conv reads "
            f"versions 1 and {CHECKPOINT_VERSION} -- upgrade the package"
        )
    payload = raw[match.end() :]
    if len(payload) != size:
        raise CheckpointError(
            f"{path}: truncated or extended checkpoint: {len(payload)} payload bytes, the "
            f"header records {size} (an interrupted copy?) -- use an intact copy"
        )
    found = hashlib.sha256(payload).hexdigest()
    if found != digest:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: the payload's SHA-256 is {found[:12]}..., the header "
            f"records {digest[:12]}... (the file changed after it was written) -- use an "
            "intact copy"
        )
    return _unpickle(path, payload)


def load_checkpoint(path: PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (or a version-1 one), verifying
    its length and checksum; ``weights_only``, so no code in the file is run.

    :raises CheckpointError: naming the file, when it is corrupt, truncated or not a
        checkpoint. ``OSError`` when it cannot be read at all.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(_MAGIC):
        state = _decode(path, raw)
        expected = CHECKPOINT_VERSION
    elif raw.startswith(b"PK"):  # version 1: a bare torch.save zip archive
        state, expected = _unpickle(path, raw), 1
    else:
        raise CheckpointError(f"{path}: not a pyro_reparam_conv training checkpoint")
    if not isinstance(state, dict) or state.get("version") != expected:
        raise CheckpointError(f"{path}: not a pyro_reparam_conv training checkpoint")
    return state
