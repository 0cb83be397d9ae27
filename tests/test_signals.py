"""Training in a real process under SIGTERM and SIGKILL (subprocesses with time limits).

A small driver runs the CLI with one hook: ``term`` drops a marker file after the third
SVI step (so the signal surely lands during training); ``kill-in-save`` drops it inside the
second checkpoint save, after the temporary file is written and before it replaces the
checkpoint, and waits there to be killed.
"""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pyro_reparam_conv.checkpoint import load_checkpoint
from pyro_reparam_conv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 120  # seconds; the runs below take a few seconds each
TRAIN = [
    "train", "--num-images", "32", "--batch-size", "16", "--hidden-channels", "8",
    "--latent-channels", "2", "--num-classes", "3", "--no-progress", "--device", "cpu",
]  # fmt: skip

DRIVER = textwrap.dedent("""
    import os, sys, time
    import pyro_reparam_conv.train as train_module
    from pyro_reparam_conv.cli import main

    mode, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "term":
        real_step, steps = train_module._step, []

        def step(*args, **kwargs):
            loss = real_step(*args, **kwargs)
            steps.append(loss)
            if len(steps) == 3:
                open(marker, "w").close()
            return loss

        train_module._step = step
    elif mode == "kill-in-save":
        real_replace, saves = os.replace, []

        def replace(src, dst):
            if str(dst).endswith("checkpoint.pt"):
                saves.append(dst)
                if len(saves) == 2:
                    open(marker, "w").close()
                    time.sleep(600)
            return real_replace(src, dst)

        os.replace = replace
    sys.exit(main(argv))
""")


def start(tmp_path, mode, argv):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, str(driver), mode, str(marker), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=TIMEOUT)
            pytest.fail(f"driver ended or timed out before the marker: {proc.returncode}\n{err}")
        time.sleep(0.05)
    return proc


def temp_files(folder):
    return sorted(p.name for p in folder.glob(".checkpoint.pt.*.tmp"))


def test_sigterm_checkpoints_the_last_completed_step_and_exits(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--out", str(out), "--steps", "100000", "--checkpoint-every", "100000"]
    proc = start(tmp_path, "term", argv)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert lines == [
        "pyro-reparam-conv train: stopped by SIGTERM; the last completed step is checkpointed, "
        "continue with --resume"
    ]
    state = load_checkpoint(out / "checkpoint.pt")
    step = state["step"]
    assert 3 <= step < 100000 and len(state["losses"]) == step
    assert temp_files(out) == []
    # and it resumes from there
    assert main([*TRAIN, "--out", str(out), "--steps", str(step + 2), "--resume"]) == 0
    assert f"resumed at step {step}" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step + 2


def test_kill_during_a_save_then_resume(tmp_path):
    """SIGKILL between writing the temporary file and renaming it: the previous checkpoint is
    intact, the temporary file is left behind, and the next save (of the resumed run)
    removes it."""
    out = tmp_path / "run"
    argv = [*TRAIN, "--out", str(out), "--steps", "100000", "--checkpoint-every", "2"]
    proc = start(tmp_path, "kill-in-save", argv)
    try:
        left = temp_files(out)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert len(left) == 1 and temp_files(out) == left  # the kill landed mid-save
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2  # the first save; the second never replaced it
    size = (out / left[0]).stat().st_size
    assert size > 0.5 * (out / "checkpoint.pt").stat().st_size

    argv = [*TRAIN, "--out", str(out), "--steps", "4", "--checkpoint-every", "2", "--resume"]
    assert main(argv) == 0
    assert temp_files(out) == []
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4 and [h["event"] for h in state["history"]] == ["start", "resume"]
