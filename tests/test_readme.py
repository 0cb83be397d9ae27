"""Issue #23: every Python snippet of README.md runs verbatim on its own, as a script in an
empty folder, without warnings."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snippets():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


SNIPPETS = snippets()
#: the snippet that trains 200 steps and compares estimators (about 20 s on 2 cores)
SLOW = {i for i, code in enumerate(SNIPPETS) if "svi.step" in code}


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize(
    "index",
    [pytest.param(i, marks=[pytest.mark.slow] if i in SLOW else []) for i in range(len(SNIPPETS))],
    ids=[f"snippet{i}" for i in range(len(SNIPPETS))],
)
def test_readme_snippet_runs_on_its_own(index, tmp_path):
    script = tmp_path / f"snippet{index}.py"
    script.write_text(SNIPPETS[index])
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(script)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = [line for line in done.stderr.splitlines() if "%|" not in line]  # progress bars
    assert not any("warn" in line.lower() or "failed" in line.lower() for line in shown), shown
