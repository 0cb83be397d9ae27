"""Run Pyro's own ELBO test modules with ``RoutedELBO`` in place of ``Trace_ELBO`` and
``TraceGraph_ELBO``.

Usage (the checkout is a pyro-ppl/pyro source tree of the installed version, e.g. 1.9.2;
nothing is fetched here)::

    .venv/bin/python tools/pyro_suites.py PATH/TO/pyro [--fast-path {on,off}] [PYTEST ARGS...]

It runs pytest inside the checkout (Pyro's ``setup.cfg``: warnings are errors, float64)
on ``tests/infer/test_valid_models.py``, ``tests/infer/test_gradient.py``, the
``Trace_ELBO`` / ``TraceGraph_ELBO`` cases of ``tests/infer/test_inference.py`` and
``tests/integration_tests/test_tracegraph_elbo.py``, with this file loaded as a pytest
plugin: before collection it replaces ``pyro.infer.Trace_ELBO`` and
``pyro.infer.TraceGraph_ELBO`` by two subclasses of :class:`RoutedELBO` (default options,
or ``fast_path=False`` with ``--fast-path off``), so every test that names either ELBO
runs ``RoutedELBO`` instead. Pyro's other ELBOs (``TraceEnum_ELBO``, the Jit ELBOs,
``TraceMeanField_ELBO``, ...) are untouched. Expected differences, by design, are listed
in :data:`EXPECTED` with the reason and reported separately.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyro.infer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyro_reparam_conv import RoutedELBO  # noqa: E402

SUITES = [
    "tests/infer/test_valid_models.py",
    "tests/infer/test_gradient.py",
    "tests/infer/test_inference.py",
    "tests/integration_tests/test_tracegraph_elbo.py",
]
# test_inference.py: only the tests that use Trace_ELBO / TraceGraph_ELBO
INFERENCE_SELECTION = (
    "elbo_reparameterized or elbo_nonreparameterized or exponential_gamma or "
    "TestFixedModelGuide or duplicate or extra_samples or reparam_stable"
)

#: test id substring -> why RoutedELBO differs by design (reported, not counted as failures)
EXPECTED = {
    "test_particle_gradient": (
        "with the fast path, the analytic KL(q || p) replaces the sampled log p - log q, so "
        "single-particle gradients differ from Trace_ELBO's (their expectation is the same); "
        "passes with --fast-path off"
    ),
}


def _fast_path() -> bool:
    return os.environ.get("ROUTED_FAST_PATH", "on") != "off"


class RoutedAsTrace_ELBO(RoutedELBO):
    """``RoutedELBO`` where a test asks for ``Trace_ELBO``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("fast_path", _fast_path())
        super().__init__(*args, **kwargs)


class RoutedAsTraceGraph_ELBO(RoutedAsTrace_ELBO):
    """``RoutedELBO`` where a test asks for ``TraceGraph_ELBO``."""


def pytest_configure(config) -> None:  # pytest plugin hook: runs before collection
    pyro.infer.Trace_ELBO = RoutedAsTrace_ELBO
    pyro.infer.TraceGraph_ELBO = RoutedAsTraceGraph_ELBO


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    checkout, rest = Path(argv[0]).resolve(), argv[1:]
    fast_path = "on"
    if rest[:1] == ["--fast-path"]:
        fast_path, rest = rest[1], rest[2:]
    missing = [s for s in SUITES if not (checkout / s).exists()]
    if missing:
        print(f"error: {checkout} is not a Pyro checkout (missing {missing})", file=sys.stderr)
        return 2
    env = dict(os.environ, ROUTED_FAST_PATH=fast_path, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent), str(ROOT), str(checkout)]))  # fmt: skip
    total = 0
    for suite in SUITES:
        select = ["-k", INFERENCE_SELECTION] if suite.endswith("test_inference.py") else []
        cmd = [sys.executable, "-m", "pytest", "-p", "pyro_suites", "-q", "-rfE", "-p",
               "no:cacheprovider", suite, *select, *rest]  # fmt: skip
        shown = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
        print(f"\n$ (cd {checkout} && {shown})  # fast_path={fast_path}", flush=True)
        result = subprocess.run(cmd, cwd=checkout, env=env)
        total = total or (result.returncode not in (0, 5))
    print("\nexpected differences (by design):")
    for test, why in EXPECTED.items():
        print(f"  {test}: {why}")
    return int(total)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
