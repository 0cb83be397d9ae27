"""Issue #23, item 4: examples/train_conv_vae.py states y's true route and a second run
neither resumes silently nor prints an empty list of routes."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_conv_vae.py"


def run(*argv, cwd):
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "3", "--out", "out", *argv],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_example_docstring_names_the_route_of_y():
    text = EXAMPLE.read_text()
    assert "route ``enumerate``" in text and "score-function gradient with a baseline)" not in text


@pytest.mark.slow
def test_example_second_run_says_what_it_does(tmp_path):
    first = run(cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "y: enumerate" in first.stdout and "trained steps 1..3" in first.stdout
    again = run(cwd=tmp_path)
    assert again.returncode == 2 and "pass --resume or --overwrite" in again.stderr
    resumed = run("--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "nothing trained: the checkpoint is at step 3" in resumed.stdout
    assert "y: enumerate" in resumed.stdout and "z: pathwise" in resumed.stdout
