"""Checkpoints that lose nothing silently: checksums, truncation, version 1, stale temporary
files, overwrite refusal, a writable folder before the first step, and resume settings that
must match (or be accepted by name, and then take effect and be recorded)."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pyro
import pytest
import torch

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.checkpoint import (
    CheckpointError,
    CheckpointExistsError,
    SettingsMismatchError,
    load_checkpoint,
    save_checkpoint,
    stale_temp_files,
)
from pyro_reparam_conv.data import load_default_images
from pyro_reparam_conv.models import ConvClusterVAE
from pyro_reparam_conv.train import load_params, train

SMALL = dict(hidden_channels=8, latent_channels=2, num_classes=3)
DATA, _ = load_default_images(32, seed=0)
COMMON = dict(batch_size=16, lr=3e-3, seed=7, progress=False, device="cpu")


def fresh_model(init_seed=0):
    pyro.clear_param_store()
    torch.manual_seed(init_seed)
    return ConvClusterVAE(**SMALL)


def fit(vae, steps, path, **kwargs):
    options = dict(COMMON, checkpoint_path=path)
    options.update(kwargs)
    data = options.pop("data", DATA)
    return train(vae.model, vae.guide, data, steps=steps, elbo=RoutedELBO(), **options)


@pytest.fixture
def trained(tmp_path):
    """A 2-step checkpoint (lr 3e-3, seed 7, one thread)."""
    path = tmp_path / "ckpt.pt"
    fit(fresh_model(), 2, path)
    return path


# ------------------------------------------------------------------ file integrity
def test_a_flipped_byte_is_detected_and_named(trained):
    raw = bytearray(trained.read_bytes())
    for offset in (len(raw) // 2, len(raw) - 5):  # inside tensor data, inside the zip directory
        damaged = bytearray(raw)
        damaged[offset] ^= 0x01
        trained.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="corrupt checkpoint: the payload's SHA-256") as e:
            load_checkpoint(trained)
        assert str(trained) in str(e.value)
    header = bytearray(raw)
    header[40] ^= 0x01  # a digit of the recorded length
    trained.write_bytes(bytes(header))
    with pytest.raises(CheckpointError, match=re.escape(str(trained))):
        load_checkpoint(trained)
    trained.write_bytes(bytes(raw))
    assert load_checkpoint(trained)["step"] == 2


def test_a_truncated_checkpoint_is_named_as_such(trained):
    raw = trained.read_bytes()
    trained.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated or extended checkpoint: \d+ payload"):
        load_checkpoint(trained)
    trained.write_bytes(raw[:30])
    with pytest.raises(CheckpointError, match="header is damaged"):
        load_checkpoint(trained)
    trained.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a pyro_reparam_conv training checkpoint"):
        load_checkpoint(trained)


def test_version_1_checkpoints_are_read_but_not_resumed(trained, tmp_path):
    """A version-1 file (bare torch.save, no settings) still loads for export/audit; resuming
    it is refused with the reason; a damaged one is a CheckpointError, not a raw EOFError."""
    state = load_checkpoint(trained)
    expected = {n: v.clone() for n, v in state["params"].items()}
    for key in ("settings", "history"):
        del state[key]
    old = tmp_path / "old.pt"
    torch.save({**state, "version": 1}, old)
    assert load_checkpoint(old)["version"] == 1
    vae = fresh_model(init_seed=3)
    load_params(vae.model, vae.guide, old, DATA[:2])
    store = dict(pyro.get_param_store().named_parameters())
    assert all(torch.equal(store[n], expected[n]) for n in expected)
    with pytest.raises(CheckpointError, match=r"version-1 checkpoint .* cannot be resumed"):
        fit(fresh_model(), 4, old, resume=True)
    raw = old.read_bytes()
    old.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint"):
        load_checkpoint(old)


def test_stale_temporary_files_are_removed_on_the_next_save(tmp_path):
    """Leftovers of killed saves go (this process's own, a dead process's, old unnamed ones);
    a live process's temporary file stays: it may be saving right now."""
    path = tmp_path / "ckpt.pt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(timeout=60)
        leftovers = [
            tmp_path / f".ckpt.pt.{dead.pid}.abcd1234.tmp",
            tmp_path / f".ckpt.pt.{os.getpid()}.efgh5678.tmp",
            tmp_path / ".ckpt.pt.x1y2z3.tmp",  # version-1 naming
        ]
        kept = tmp_path / f".ckpt.pt.{live.pid}.ijkl9012.tmp"
        other = tmp_path / f".other.pt.{dead.pid}.mnop3456.tmp"
        for file in [*leftovers, kept, other]:
            file.write_bytes(b"x" * 100)
        assert set(stale_temp_files(path)) == set(leftovers)
        save_checkpoint(path, {"value": torch.arange(3)})
        assert not any(f.exists() for f in leftovers)
        assert kept.exists() and other.exists()
        assert torch.equal(load_checkpoint(path)["value"], torch.arange(3))
    finally:
        live.kill()
        live.wait(timeout=60)


# ------------------------------------------------------------------ nothing overwritten
def test_an_existing_checkpoint_is_not_overwritten_without_overwrite(trained):
    before = trained.read_bytes()
    with pytest.raises(CheckpointExistsError, match=r"resume=True .* overwrite=True"):
        fit(fresh_model(), 3, trained)
    assert trained.read_bytes() == before
    result = fit(fresh_model(), 3, trained, overwrite=True, seed=1)
    assert result.start_step == 0 and load_checkpoint(trained)["step"] == 3
    assert [h["event"] for h in load_checkpoint(trained)["history"]] == ["start"]


class CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_an_unwritable_folder_fails_before_the_first_step(tmp_path, monkeypatch):
    """The folder is probed (created, a checkpoint-sized file written and removed) before any
    step: no SVI step runs when it cannot be written."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    vae = fresh_model()
    model = CountCalls(vae.model)
    with pytest.raises(OSError, match="not a folder"):
        train(model, vae.guide, DATA, steps=5, checkpoint_path=blocker / "ckpt.pt", **COMMON)

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pyro_reparam_conv.checkpoint.tempfile.mkstemp", no_room)
    vae = fresh_model()
    model = CountCalls(vae.model)
    with pytest.raises(OSError, match="No space left"):
        train(model, vae.guide, DATA, steps=5, checkpoint_path=tmp_path / "c.pt", **COMMON)
    assert model.calls == 1  # the trace that registers the parameters; no step


def test_a_read_only_folder_fails_before_the_first_step(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes into read-only folders: refuse as the kernel would

        def refuse(*args, dir=None, **kwargs):
            if Path(dir) == folder:
                raise PermissionError(13, "Permission denied", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        real_mkstemp = tempfile.mkstemp
        monkeypatch.setattr("pyro_reparam_conv.checkpoint.tempfile.mkstemp", refuse)
    vae = fresh_model()
    try:
        with pytest.raises(PermissionError):
            train(vae.model, vae.guide, DATA, steps=5, checkpoint_path=folder / "c.pt", **COMMON)
    finally:
        folder.chmod(0o700)


# ------------------------------------------------------------------ settings on resume
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lr=1e-3), r"lr: checkpoint 0.003, now 0.001"),
        (dict(seed=8), r"seed: checkpoint 7, now 8"),
        (dict(data=DATA.flip(0)), r"data: checkpoint sha256:[0-9a-f]{12}, now sha256:"),
        (dict(batch_size=8), r"batch_size: checkpoint 16, now 8"),
        (dict(threads=2), r"threads: checkpoint 1, now 2"),
        (dict(settings={"z_estimator": "score"}), r"z_estimator: checkpoint \(not recorded\)"),
    ],
    ids=["lr", "seed", "data", "batch_size", "threads", "extra"],
)
def test_a_changed_setting_is_refused_by_name(trained, change, message):
    change = dict(change)
    threads = change.pop("threads", torch.get_num_threads())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(SettingsMismatchError, match=message) as info:
            fit(fresh_model(), 4, trained, resume=True, **change)
    finally:
        torch.set_num_threads(previous)
    assert len(info.value.changed) == 1
    assert "--allow-changed" in str(info.value) and str(trained) in str(info.value)
    assert load_checkpoint(trained)["step"] == 2  # untouched


def test_an_accepted_lr_change_takes_effect_and_is_recorded(trained, tmp_path):
    result = fit(fresh_model(), 4, trained, resume=True, lr=1e-3, allow_changed={"lr"})
    assert result.start_step == 2 and result.changed == {"lr": (3e-3, 1e-3)}
    state = load_checkpoint(trained)
    groups = [g for s in state["optim"].values() for g in s["param_groups"]]
    assert groups and all(g["lr"] == 1e-3 for g in groups)
    assert state["settings"]["lr"] == 1e-3
    assert [(h["event"], h["step"], h["changed"]) for h in state["history"]] == [
        ("start", 0, {}),
        ("resume", 2, {"lr": [3e-3, 1e-3]}),
    ]
    # the new rate is what moved the parameters: same as a run whose optimizer had it
    after = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    other = tmp_path / "other.pt"
    fit(fresh_model(), 2, other)
    state = load_checkpoint(other)
    state["optim"] = {
        name: {**s, "param_groups": [{**g, "lr": 1e-3} for g in s["param_groups"]]}
        for name, s in state["optim"].items()
    }
    state["settings"]["lr"] = 1e-3
    save_checkpoint(other, state)
    fit(fresh_model(), 4, other, resume=True, lr=1e-3)
    now = dict(pyro.get_param_store().named_parameters())
    assert all(torch.equal(now[n], after[n]) for n in after)


def test_an_accepted_seed_change_reseeds(trained, tmp_path):
    copy = tmp_path / "copy.pt"
    copy.write_bytes(trained.read_bytes())
    same = fit(fresh_model(), 4, trained, resume=True)
    reseeded = fit(fresh_model(), 4, copy, resume=True, seed=8, allow_changed=["seed"])
    assert same.losses[:2] == reseeded.losses[:2]
    assert same.losses[2:] != reseeded.losses[2:]
    assert load_checkpoint(copy)["history"][-1]["changed"] == {"seed": [7, 8]}


def test_unknown_allow_changed_names_are_refused(trained):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lrr'\]; the settings are"):
        fit(fresh_model(), 4, trained, resume=True, allow_changed={"lrr"})
