"""Issue #23: `--help` is complete (every option says what it does) and fast (the command
line parses without importing torch or Pyro); `import pyro_reparam_conv` stays light."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_reparam_conv import cli

ROOT = Path(__file__).resolve().parents[1]


def subcommands():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("command", ["demo", "train", "export", "audit", "compare"])
def test_every_option_has_help_text(command):
    parser = subcommands()[command]
    missing = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not (action.help and action.help.strip()) and action.help != argparse.SUPPRESS
    ]
    assert not missing, f"{command}: no help text for {missing}"


def test_compare_help_explains_its_columns(capsys):
    assert cli.main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for column in ("mean_norm", "variance", "snr", "ms/draw", "z_vs_unbiased", "agrees"):
        assert f"\n  {column} " in out


def run_python(code):
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_and_import_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "import pyro_reparam_conv\n"
        "from pyro_reparam_conv.cli import main\n"
        "for command in ('demo', 'train', 'export', 'audit', 'compare'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main([command, '--help']) == 0\n"
        "heavy = sorted({'torch', 'pyro', 'arviz', 'matplotlib', 'pandas'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "assert pyro_reparam_conv.RoutedELBO.__name__ == 'RoutedELBO'\n"  # lazily, on use
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_cli_constants_agree_with_distributed():
    from pyro_reparam_conv import distributed

    assert cli.DEFAULT_TIMEOUT == distributed.DEFAULT_TIMEOUT
    assert cli._TORCHRUN_VARIABLES == distributed._TORCHRUN_VARIABLES


def test_package_exports_resolve():
    import pyro_reparam_conv

    for name in pyro_reparam_conv.__all__:
        assert getattr(pyro_reparam_conv, name) is not None
    assert pyro_reparam_conv.estimators.ESTIMATORS is pyro_reparam_conv.ESTIMATORS
    with pytest.raises(AttributeError):
        pyro_reparam_conv.no_such_name
