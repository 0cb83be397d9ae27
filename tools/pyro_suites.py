"""Run Pyro's own test modules twice, with Pyro's ELBOs and with ``RoutedELBO`` in place of
``Trace_ELBO`` and ``TraceGraph_ELBO`` (``TraceEnum_ELBO`` for ``tests/infer/test_enum.py``),
and report per module the tests that fail only substituted, with each run's wall time and
peak memory (``/usr/bin/time -v``, where it exists).

Usage (the checkout is a pyro-ppl/pyro source tree of the installed version, e.g. 1.9.2;
nothing is fetched here)::

    .venv/bin/python tools/pyro_suites.py PATH/TO/pyro [--fast-path {on,off}]
        [--modules SUBSTRING,...] [--junit-dir DIR] [PYTEST ARGS...]

Each module of :data:`SUITES` that the checkout has runs in pytest inside the checkout
(Pyro's ``setup.cfg``: warnings are errors, float64) once plainly and once with this file
loaded as a pytest plugin: before collection it replaces ``pyro.infer.Trace_ELBO`` and
``pyro.infer.TraceGraph_ELBO`` by two subclasses of :class:`RoutedELBO` (default options, or
``fast_path=False`` with ``--fast-path off``), so every test that names either ELBO runs
``RoutedELBO`` instead; for the modules in :data:`SUBSTITUTE` it replaces the ELBOs named
there instead (``TraceEnum_ELBO`` in ``pyro.infer`` and ``pyro.infer.traceenum_elbo``, for
``test_enum.py``). Pyro's other ELBOs (the Jit ELBOs, ``TraceMeanField_ELBO``, ...) are
untouched. The table gives, per module, passed / failed
(errors included) plainly and substituted, and the number that matters: tests that fail
substituted but pass with Pyro's own ELBOs, named below it. Failures of plain Pyro in the
same environment (missing optional packages such as funsor) are not RoutedELBO's. Expected
differences, by design, are listed in :data:`EXPECTED` with the reason and do not count
towards the exit status (1 if any other test fails substituted only).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import pyro.infer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyro_reparam_conv import RoutedELBO  # noqa: E402

# test_inference.py: only the tests that use Trace_ELBO / TraceGraph_ELBO
INFERENCE_SELECTION = (
    "elbo_reparameterized or elbo_nonreparameterized or exponential_gamma or "
    "TestFixedModelGuide or duplicate or extra_samples or reparam_stable"
)
#: module -> its ``-k`` selection (``None``: all of it). The first four must exist.
SUITES = {
    "tests/infer/test_valid_models.py": None,
    "tests/infer/test_gradient.py": None,
    "tests/infer/test_inference.py": INFERENCE_SELECTION,
    "tests/integration_tests/test_tracegraph_elbo.py": None,
    "tests/infer/test_autoguide.py": None,
    "tests/infer/test_predictive.py": None,
    "tests/infer/test_svi.py": None,  # not in Pyro 1.9 (reported as absent)
    "tests/infer/test_elbo_mapdata.py": None,
    "tests/infer/reparam/test_conjugate.py": None,
    "tests/infer/test_enum.py": None,
}
#: module -> the ELBOs replaced by RoutedELBO there (default: Trace_ELBO and TraceGraph_ELBO)
SUBSTITUTE = {"tests/infer/test_enum.py": ("TraceEnum_ELBO",)}
DEFAULT_SUBSTITUTE = ("Trace_ELBO", "TraceGraph_ELBO")
REQUIRED = list(SUITES)[:4]
TIME = "/usr/bin/time"  # GNU time: -v reports the peak resident memory

#: test id substring -> why RoutedELBO differs by design (reported, not counted as failures)
_ANALYTIC_KL = (
    "with the fast path, the analytic KL(q || p) replaces the sampled log p - log q, so "
    "single-particle gradients differ from Trace_ELBO's (their expectation is the same); "
    "passes with --fast-path off"
)
_IMPLICIT = (
    "a Normal without rsample is routed to the implicit reparameterization gradient (issue "
    "22), not the score function the test computes by hand: the same expectation, another "
    "single-particle gradient"
)
_SEQUENTIAL = (
    "sequential enumeration runs the model once per value; RoutedELBO evaluates the values "
    "side by side (parallel) and its model (float(x)) does not broadcast over them: a "
    "ValueError naming the site, not a quiet fall-back to the score function"
)
_MARKUP = (
    "RoutedELBO sums guide sites with Pyro's enumeration markup exactly (as TraceEnum_ELBO, "
    "issue 25), so Pyro's warning that Trace_ELBO ignores the markup does not apply"
)
EXPECTED = {
    "test_enum::test_enumerate_sequential_guide": _SEQUENTIAL,
    "test_enum_discrete_misuse_warning[Trace_ELBO-": _MARKUP,
    "test_enum_discrete_misuse_warning[TraceGraph_ELBO-": _MARKUP,
    "test_particle_gradient[Trace_ELBO-reparam]": _ANALYTIC_KL,
    "test_particle_gradient[Trace_ELBO-reparam-True]": _ANALYTIC_KL,
    "test_particle_gradient[Trace_ELBO-reparam-False]": _IMPLICIT,
    "test_particle_gradient[Trace_ELBO-nonreparam]": _IMPLICIT,
    "RaoBlackwellizationTests::test_plate_in_elbo_with_superfluous_rvs": (
        "its NonreparameterizedNormal sites are routed to the implicit gradient (unbiased: "
        "checked against the closed form), and its learning rate and tolerance were tuned "
        "for the score function with learned baselines: an error of 0.055 against 0.04-0.05"
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


class RoutedAsTraceEnum_ELBO(RoutedAsTrace_ELBO):
    """``RoutedELBO`` where a test asks for ``TraceEnum_ELBO``."""


REPLACEMENTS = {
    "Trace_ELBO": RoutedAsTrace_ELBO,
    "TraceGraph_ELBO": RoutedAsTraceGraph_ELBO,
    "TraceEnum_ELBO": RoutedAsTraceEnum_ELBO,
}


def pytest_configure(config) -> None:  # pytest plugin hook: runs before collection
    names = os.environ.get("ROUTED_SUBSTITUTE", ",".join(DEFAULT_SUBSTITUTE)).split(",")
    for name in names:
        setattr(pyro.infer, name, REPLACEMENTS[name])
        if name == "TraceEnum_ELBO":  # test_enum.py imports it from its module
            pyro.infer.traceenum_elbo.TraceEnum_ELBO = REPLACEMENTS[name]


def outcomes(junit_xml: Path) -> dict[str, str]:
    """Test id -> ``"passed"``, ``"failed"`` (errors included), ``"skipped"`` or
    ``"xfailed"``, read from pytest's JUnit XML report. Ids are those of the plain run: a
    test parametrized by the ELBO class is named after the class, ``RoutedAsTrace_ELBO``
    when substituted, ``Trace_ELBO`` here."""
    results: dict[str, str] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = case.get("name", "")
        for plain, routed in REPLACEMENTS.items():
            name = name.replace(routed.__name__, plain)
        test = f"{case.get('classname')}::{name}"
        tags = {child.tag: child for child in case}
        if "failure" in tags or "error" in tags:
            results[test] = "failed"
        elif "skipped" in tags:
            xfail = tags["skipped"].get("type") == "pytest.xfail"
            results[test] = "xfailed" if xfail else "skipped"
        else:
            results[test] = "passed"
    return results


def timed(cmd: list[str], cwd: Path, env: dict, usage_file: Path) -> tuple[float, Optional[float]]:
    """Run ``cmd``; its wall time in seconds and peak resident memory in MB (``None``
    without ``/usr/bin/time``)."""
    start = time.monotonic()
    if not Path(TIME).exists():
        subprocess.run(cmd, cwd=cwd, env=env, check=False)
        return time.monotonic() - start, None
    subprocess.run([TIME, "-v", "-o", str(usage_file), *cmd], cwd=cwd, env=env, check=False)
    seconds = time.monotonic() - start
    for line in usage_file.read_text().splitlines():
        if "Maximum resident set size" in line:
            return seconds, int(line.rsplit(":", 1)[1]) / 1024
    return seconds, None


def run_module(checkout: Path, suite: str, substituted: bool, fast_path: str, rest,
               junit_dir: Path) -> tuple[dict, tuple]:  # fmt: skip
    """One pytest run of ``suite`` in ``checkout`` (``substituted``: with this plugin);
    its outcomes per test (the JUnit XML report is left in ``junit_dir``) and its
    ``(seconds, peak MB)``."""
    select = ["-k", SUITES[suite]] if SUITES[suite] else []
    plugin = ["-p", "pyro_suites"] if substituted else []
    names = ",".join(SUBSTITUTE.get(suite, DEFAULT_SUBSTITUTE))
    env = dict(os.environ, ROUTED_FAST_PATH=fast_path, ROUTED_SUBSTITUTE=names,
               PYTHONPATH=os.pathsep.join(
                   [str(Path(__file__).resolve().parent), str(ROOT), str(checkout)]))  # fmt: skip
    kind = "substituted" if substituted else "plain"
    report = junit_dir / f"{kind}-{suite.replace('/', '.')}.xml"
    report.unlink(missing_ok=True)  # a report left by an earlier run is not this run's
    cmd = [sys.executable, "-m", "pytest", *plugin, "-q", "--tb=no", "-p", "no:cacheprovider",
           f"--junitxml={report}", suite, *select, *rest]  # fmt: skip
    shown = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
    label = f"substituted ({names}), fast_path={fast_path}" if substituted else "Pyro's own ELBOs"
    print(f"\n$ (cd {checkout} && {shown})  # {label}", flush=True)
    usage = timed(cmd, checkout, env, junit_dir / f"{kind}-{suite.replace('/', '.')}.time")
    return (outcomes(report) if report.exists() else {}), usage


def count(results: dict[str, str], outcome: str) -> int:
    return sum(1 for o in results.values() if o == outcome)


def expected_why(test: str):
    return next((why for key, why in EXPECTED.items() if key in test), None)


def compare(suite: str, plain: dict, routed: dict) -> tuple[str, list[str], list[str]]:
    """The module's table row; the tests failing substituted only, unexpected and expected."""
    only = sorted(t for t, o in routed.items() if o == "failed" and plain.get(t) == "passed")
    expected = [t for t in only if expected_why(t)]
    unexpected = [t for t in only if not expected_why(t)]

    def cell(r):
        extra = ", ".join(f"{count(r, o)} {o}" for o in ("xfailed", "skipped") if count(r, o))
        return f"{count(r, 'passed')} / {count(r, 'failed')}" + (f" ({extra})" if extra else "")

    shown = f"{len(unexpected)}" + (f" (+{len(expected)} by design)" if expected else "")
    row = f"| `{suite}` | {cell(plain)} | {cell(routed)} | {shown} |"
    return row, unexpected, expected


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    checkout, rest = Path(argv[0]).resolve(), argv[1:]
    options = {"--fast-path": "on", "--modules": "", "--junit-dir": ""}
    while rest[:1] and rest[0] in options:
        options[rest[0]], rest = rest[1], rest[2:]
    fast_path, modules = options["--fast-path"], options["--modules"].split(",")
    junit_dir = Path(options["--junit-dir"] or tempfile.mkdtemp(prefix="pyro_suites-"))
    junit_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in REQUIRED if not (checkout / s).exists()]
    if missing:
        print(f"error: {checkout} is not a Pyro checkout (missing {missing})", file=sys.stderr)
        return 2
    rows, usages, unexpected, expected, start = [], [], [], [], time.monotonic()
    for suite in SUITES:
        if not any(m in suite for m in modules):
            continue
        if not (checkout / suite).exists():
            rows.append(f"| `{suite}` | not in this checkout | | |")
            continue
        plain, plain_usage = run_module(checkout, suite, False, fast_path, rest, junit_dir)
        routed, routed_usage = run_module(checkout, suite, True, fast_path, rest, junit_dir)
        row, bad, fine = compare(suite, plain, routed)
        print(f"\n{row}" + "".join(f"\n  fails substituted only: {t}" for t in bad), flush=True)
        rows.append(row)
        usages.append(usage_row(suite, plain_usage, routed_usage))
        unexpected += bad
        expected += fine
    report(rows, unexpected, expected, fast_path, time.monotonic() - start, usages)
    print(f"JUnit XML reports: {junit_dir}")
    return int(bool(unexpected))


def usage_row(suite: str, plain: tuple, routed: tuple) -> str:
    """The module's row of time (s) and peak memory (MB), plain and substituted, with ratios."""

    def cells(p, r):
        if p is None or r is None:
            return "n/a | n/a | n/a"
        return f"{p:.0f} | {r:.0f} | {r / p:.2f}x"

    return f"| `{suite}` | {cells(plain[0], routed[0])} | {cells(plain[1], routed[1])} |"


def report(rows, unexpected, expected, fast_path, seconds, usages=()) -> None:
    print(f"\nfast_path={fast_path}; passed / failed (errors included); {seconds:.0f} s\n")
    print("| module | Pyro's ELBOs | RoutedELBO substituted | fail substituted only |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    if usages:
        print("\n| module | Pyro s | substituted s | ratio | Pyro peak MB | substituted peak MB "
              "| ratio |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(usages))
    print("\nfailing substituted only, passing with Pyro's ELBOs:")
    print("\n".join(f"  {test}" for test in unexpected) or "  (none)")
    print("expected differences (by design):")
    print("\n".join(f"  {test}: {expected_why(test)}" for test in expected) or "  (none)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
