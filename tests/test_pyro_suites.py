"""tools/pyro_suites.py: per-test outcomes read from pytest's JUnit XML, and the tests that
fail substituted only (the number its table reports)."""

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "pyro_suites.py"
spec = importlib.util.spec_from_file_location("pyro_suites_under_test", TOOL)
suites = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suites)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.infer.test_x" name="test_a[1]" />
<testcase classname="tests.infer.test_x" name="test_b"><failure message="boom" /></testcase>
<testcase classname="tests.infer.test_x" name="test_c"><error message="setup" /></testcase>
<testcase classname="tests.infer.test_x" name="test_d"><skipped type="pytest.skip" /></testcase>
<testcase classname="tests.infer.test_x" name="test_e"><skipped type="pytest.xfail" /></testcase>
<testcase classname="tests.infer.test_x" name="test_particle_gradient[reparam]" />
<testcase classname="tests.infer.test_x" name="test_f[RoutedAsTraceGraph_ELBO-1]" />
</testsuite></testsuites>"""


def test_outcomes_count_errors_as_failures(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    results = suites.outcomes(report)
    assert results == {
        "tests.infer.test_x::test_a[1]": "passed",
        "tests.infer.test_x::test_b": "failed",
        "tests.infer.test_x::test_c": "failed",
        "tests.infer.test_x::test_d": "skipped",
        "tests.infer.test_x::test_e": "xfailed",
        "tests.infer.test_x::test_particle_gradient[reparam]": "passed",
        "tests.infer.test_x::test_f[TraceGraph_ELBO-1]": "passed",  # the plain run's id
    }


def test_compare_reports_failures_of_the_substituted_run_only():
    plain = {
        "m::a": "passed",
        "m::b": "failed",
        "m::c": "passed",
        "m::test_particle_gradient[Trace_ELBO-nonreparam]": "passed",
    }
    routed = {
        "m::a": "failed",
        "m::b": "failed",
        "m::c": "passed",
        "m::test_particle_gradient[Trace_ELBO-nonreparam]": "failed",
    }
    row, unexpected, expected = suites.compare("tests/m.py", plain, routed)
    assert unexpected == ["m::a"]  # b fails plainly too
    assert expected == ["m::test_particle_gradient[Trace_ELBO-nonreparam]"]  # in EXPECTED
    assert row == "| `tests/m.py` | 3 / 1 | 1 / 3 | 1 (+1 by design) |"


def test_traceenum_substitution_names_and_usage_row(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT.replace("test_a[1]", "test_a[RoutedAsTraceEnum_ELBO]"))
    assert "tests.infer.test_x::test_a[TraceEnum_ELBO]" in suites.outcomes(report)
    assert suites.SUBSTITUTE["tests/infer/test_enum.py"] == ("TraceEnum_ELBO",)
    row = suites.usage_row("tests/m.py", (100.0, 500.0), (150.0, 400.0))
    assert row == "| `tests/m.py` | 100 | 150 | 1.50x | 500 | 400 | 0.80x |"
    assert suites.usage_row("m", (1.0, None), (2.0, None)).endswith("| n/a | n/a | n/a |")
