"""The command line end to end with tiny settings: every output file is written, outputs are
readable, nothing trained is overwritten, and every user error is one line with exit 2."""

import json
import os
import re
import sys
import textwrap

import numpy as np
import pytest
import torch

from pyro_reparam_conv.checkpoint import load_checkpoint
from pyro_reparam_conv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = ["--hidden-channels", "8", "--latent-channels", "2", "--num-classes", "3"]
TINY_TRAIN = ["--steps", "4", "--batch-size", "16", "--no-progress", "--device", "cpu"]

DEMO_FILES = {
    "checkpoint_default.pt",
    "checkpoint_y_score.pt",
    "checkpoint_z_score.pt",
    "elbo_curves.png",
    "reconstructions.png",
    "posterior.png",
    "posterior_z.png",
    "posterior.nc",
    "summary.csv",
    "estimator_comparison.csv",
    "estimator_comparison.png",
    "results.txt",
    "results.json",
}


def test_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--num-images",
        "48",
        "--variance-draws",
        "4",
        "--export-images",
        "6",
        "--num-samples",
        "8",
        *TINY_MODEL,
        *TINY_TRAIN,
    ]
    assert main(argv) == 0
    assert DEMO_FILES <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "y:enumerate, z:pathwise" in printed and "NMI(y, digit)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["default"]["routes"] == {"y": "enumerate", "z": "pathwise"}
    assert results["y_score"]["routes"] == {"y": "score", "z": "pathwise"}
    assert results["z_score"]["routes"] == {"y": "enumerate", "z": "score"}
    assert all(np.isfinite(r["elbo_per_image"]) for r in results.values())
    assert all(0 <= r["nmi"] <= 1 and r["encoder_grad_variance"] > 0 for r in results.values())
    # readable at natural size, parameters under their module names (not encoder$$$0.0.weight)
    widths = {p.name: png_width(p) for p in out.glob("*.png")}
    assert all(w <= 1600 for w in widths.values()), widths
    params = set(pd_params(out / "estimator_comparison.csv"))
    assert "encoder.0.0.weight" in params and not any("$$$" in p for p in params)
    # --resume with the same budget continues from the checkpoints: nothing left to train,
    # said so, and the stored routes and timings are shown and kept (valid JSON, no NaN).
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint_default.pt: already at step 4 (--steps 4): nothing trained" in printed
    assert "y:enumerate, z:pathwise" in printed and "nan" not in printed
    again = json.loads((out / "results.json").read_text(), parse_constant=no_nan)
    for name, run in results.items():
        assert again[name]["routes"] == run["routes"]
        assert again[name]["seconds_per_step"] == run["seconds_per_step"]
    assert main(argv) == 2  # neither --resume nor --overwrite: the checkpoints are kept
    assert "checkpoint_default.pt exists" in capsys.readouterr().err


def no_nan(name):
    raise ValueError(f"{name} is not JSON")


def pd_params(csv):
    import pandas as pd

    return pd.read_csv(csv)["param"]


def test_train_export_audit_compare_on_user_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npy"
    np.save(data, rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *TINY_TRAIN]) == 0
    assert {"checkpoint.pt", "elbo.png"} <= {p.name for p in out.iterdir()}
    assert main(["export", str(out / "checkpoint.pt"), "--num-samples", "6"]) == 0
    assert {"posterior.nc", "summary.csv", "posterior_z.png"} <= {p.name for p in out.iterdir()}

    assert main(["audit", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "pathwise" in printed and "encoder.0.0.weight" in printed and "$$$" not in printed
    compare_out = tmp_path / "compare"
    argv = [
        "compare",
        "--data",
        str(data),
        "--num-draws",
        "5",
        "--out",
        str(compare_out),
        "--estimators",
        "pathwise,score,enumerate",
        *TINY_MODEL,
    ]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if not line.startswith("wrote ")]
    assert max(map(len, table)) <= 100, printed  # fits a terminal
    # y is enumerated in the "pathwise" run: the label says so, and why
    assert "pathwise*: y:enumerate, z:pathwise" in printed
    assert "y not pathwise: Categorical has no rsample" in printed
    assert {"estimator_comparison.csv", "estimator_comparison.png"} <= {
        p.name for p in compare_out.iterdir()
    }
    import pandas as pd

    frame = pd.read_csv(compare_out / "estimator_comparison.csv")
    assert set(frame["estimator"]) == {"pathwise", "score", "enumerate"}
    assert frame[frame["estimator"] == "enumerate"]["routes"].str.contains("y:enumerate").all()
    assert png_width(compare_out / "estimator_comparison.png") <= 1600


def test_audit_user_model_from_file(tmp_path, capsys):
    source = tmp_path / "user_model.py"
    source.write_text(
        textwrap.dedent("""
        import pyro, pyro.distributions as dist, torch

        def model(x):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

        def guide(x):
            loc = pyro.param("loc", torch.tensor(0.0))
            pyro.sample("z", dist.Normal(loc, 1.0))

        def inputs():
            return (torch.tensor(0.5),)
    """)
    )
    spec = str(source)
    argv = [
        "audit",
        "--model",
        f"{spec}:model",
        "--guide",
        f"{spec}:guide",
        "--inputs",
        f"{spec}:inputs",
    ]
    assert main(argv) == 0
    assert "loc" in capsys.readouterr().out


def test_audit_check_bias_flags_a_step_cost_and_exits_1(tmp_path, capsys):
    """The step cost of docs/biased_pathwise.md: without --check-bias the audit finds nothing
    (exit 0); with it, the loud line says what to do and the exit status is 1."""
    source = tmp_path / "step_model.py"
    source.write_text(
        textwrap.dedent("""
        import pyro, pyro.distributions as dist, torch

        def model():
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.factor("cost", -(x > 0).to(x.dtype))

        def guide():
            pyro.sample("x", dist.Normal(pyro.param("mu", torch.tensor(0.3)), 1.0))
    """)
    )
    argv = ["audit", "--model", f"{source}:model", "--guide", f"{source}:guide"]
    assert main(argv) == 0
    assert "bias" not in capsys.readouterr().out.lower()
    assert main([*argv, "--check-bias", "--num-draws", "100"]) == 1
    out = capsys.readouterr().out
    assert "Pathwise bias check (100 gradient draws per estimator)" in out
    assert "!! BIASED PATHWISE GRADIENT: site 'x'" in out
    assert "infer={'estimator': 'measure_valued'}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "missing.npy"], "missing.npy"),
        (["audit", "--model", "nocolon", "--guide", "m:g"], "module:function"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ nothing lost or silent
def png_width(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(24)[16:20], "big")


USER_FILE = textwrap.dedent("""
    import pathlib
    import pyro, pyro.distributions as dist, torch

    with open(pathlib.Path(__file__).with_name("runs.txt"), "a") as log:
        log.write("run\\n")  # one line per execution of this file
    net = torch.nn.Linear(1, 1)  # one network, shared by model and guide

    def model(x):
        pyro.module("net", net)
        z = pyro.sample("z", dist.Normal(net(torch.ones(1)).squeeze(), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.module("net", net)
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc + net(torch.ones(1)).squeeze(), 1.0))
        EXTRA

    def inputs():
        return (torch.tensor(0.5),)
""")


def user_file(folder, name="user_model.py", extra="pass"):
    path = folder / name
    path.write_text(USER_FILE.replace("EXTRA", extra))
    return path


def user_argv(spec, inputs=True):
    argv = ["audit", "--model", f"{spec}:model", "--guide", f"{spec}:guide"]
    return argv + (["--inputs", f"{spec}:inputs"] if inputs else [])


def test_a_spec_file_runs_once_for_model_guide_and_inputs(tmp_path, capsys):
    spec = user_file(tmp_path)
    assert main(user_argv(spec)) == 0
    assert (tmp_path / "runs.txt").read_text() == "run\n"
    out = capsys.readouterr().out
    assert "net.weight" in out and "NO GRADIENT" not in out


def test_a_module_spec_imports_from_the_current_folder(tmp_path, monkeypatch, capsys):
    name = f"user_module_{tmp_path.name.replace('-', '_')}"
    user_file(tmp_path, f"{name}.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    path_before = list(sys.path)
    try:
        assert main(user_argv(name)) == 0
    finally:
        sys.modules.pop(name, None)
    assert sys.path == path_before
    assert (tmp_path / "runs.txt").read_text() == "run\n"


@pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model")
def test_audit_names_a_guide_site_missing_from_the_model(tmp_path, capsys):
    spec = user_file(tmp_path, extra='pyro.sample("w", dist.Normal(loc, 1.0))')
    assert main(user_argv(spec)) == 1
    out = capsys.readouterr().out
    assert "!! SITE IN THE GUIDE ONLY: 'w'" in out
    assert "'z'" not in out.split("!! SITE")[1]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """Images (40, 12, 12) uint8 in a folder, trained into run/ from that folder with a
    relative --data path (12x12: not the embedded digits' shape)."""
    folder = tmp_path_factory.mktemp("project")
    rng = np.random.default_rng(1)
    np.save(folder / "imgs.npy", rng.integers(0, 256, size=(40, 12, 12), dtype=np.uint8))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        argv = ["train", "--data", "imgs.npy", "--out", "run", *TINY_MODEL, *TINY_TRAIN]
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return folder


def test_export_and_audit_from_another_folder_use_the_checkpoints_data(
    user_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    checkpoint = user_run / "run" / "checkpoint.pt"
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--num-samples", "4", "--out", str(out)]) == 0
    assert {"posterior.nc", "summary.csv", "posterior_z.png"} <= {p.name for p in out.iterdir()}
    assert png_width(out / "posterior_z.png") <= 1600
    assert main(["audit", "--checkpoint", str(checkpoint)]) == 0
    assert "num_data" not in capsys.readouterr().err
    # data and run moved together: found again relative to the checkpoint
    moved = tmp_path / "moved"
    moved.mkdir()
    (user_run / "run").rename(moved / "run")
    (user_run / "imgs.npy").rename(moved / "imgs.npy")
    try:
        assert main(["audit", "--checkpoint", str(moved / "run" / "checkpoint.pt")]) == 0
    finally:
        (moved / "run").rename(user_run / "run")
        (moved / "imgs.npy").rename(user_run / "imgs.npy")


def test_train_refuses_to_overwrite_and_resume_checks_settings(tmp_path, capsys):
    data = tmp_path / "imgs.npy"
    np.save(data, np.random.default_rng(0).random((32, 8, 8)))
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *TINY_TRAIN]
    assert main(base) == 0
    checkpoint = out / "checkpoint.pt"
    before = checkpoint.read_bytes()
    assert main(base) == 2
    assert "--overwrite" in capsys.readouterr().err and checkpoint.read_bytes() == before

    more = [*base, "--resume", "--steps", "6"]
    assert main([*more, "--z-estimator", "score", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "lr: checkpoint 0.003, now 0.001; z_estimator: checkpoint 'auto', now 'score'" in err
    assert checkpoint.read_bytes() == before
    argv = [*more, "--z-estimator", "score", "--lr", "1e-3", "--allow-changed", "lr,z-estimator"]
    assert main(argv) == 0
    state = load_checkpoint(checkpoint)
    assert state["step"] == 6 and state["settings"]["z_estimator"] == "score"
    assert state["history"][-1]["changed"] == {"lr": [3e-3, 1e-3], "z_estimator": ["auto", "score"]}

    assert main([*base, "--overwrite", "--steps", "2"]) == 0
    assert load_checkpoint(checkpoint)["step"] == 2


def test_threads_default_to_one_are_recorded_and_checked(tmp_path, capsys):
    assert torch.get_num_threads() == 1  # conftest: the whole session runs on one thread
    torch.set_num_threads(2)
    try:
        out = tmp_path / "run"
        base = ["train", "--num-images", "32", "--out", str(out), *TINY_MODEL, *TINY_TRAIN]
        assert main(base) == 0  # the CLI's default, not the caller's 2
        assert torch.get_num_threads() == 2  # restored after the command
        assert load_checkpoint(out / "checkpoint.pt")["settings"]["threads"] == 1
        assert main([*base, "--resume", "--steps", "5", "--threads", "2"]) == 2
        assert "threads: checkpoint 1, now 2" in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors")
    data = folder / "imgs.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, size=(40, 8, 8), dtype=np.uint8))
    argv = ["train", "--data", str(data), "--out", str(folder / "run"), *TINY_MODEL, *TINY_TRAIN]
    assert main(argv) == 0
    return folder


def corrupt(folder, name, edit):
    raw = bytearray((folder / "run" / "checkpoint.pt").read_bytes())
    path = folder / name
    path.write_bytes(bytes(edit(raw)))
    return str(path)


def flip(raw):
    raw[len(raw) // 2] ^= 0x10
    return raw


def resume_argv(folder, *extra):
    data, run = str(folder / "imgs.npy"), str(folder / "run")
    return ["train", "--data", data, "--out", run, "--resume", *TINY_MODEL, *TINY_TRAIN, *extra]


# (case, argv for the trained folder, what the one line must say)
ERROR_CASES = [
    ("corrupt checkpoint", lambda d: ["export", corrupt(d, "flipped.pt", flip)],
     "corrupt checkpoint: the payload's SHA-256"),
    ("truncated checkpoint", lambda d: ["export", corrupt(d, "cut.pt", lambda r: r[:20000])],
     "truncated or extended checkpoint"),
    ("truncated version-1 checkpoint", lambda d: ["audit", "--checkpoint", legacy_truncated(d)],
     "cannot be read as a checkpoint"),
    ("not a checkpoint", lambda d: ["export", str(write(d / "notes.txt", b"hello"))],
     "not a pyro_reparam_conv training checkpoint"),
    ("missing checkpoint", lambda d: ["export", str(d / "nothing.pt")],
     "nothing.pt: No such file or directory"),
    ("--out is a file", lambda d: ["train", "--out", str(write(d / "file", b"x")), *TINY_TRAIN],
     "file: exists and is not a folder"),
    ("existing checkpoint", lambda d: ["train", "--out", str(d / "run"), *TINY_TRAIN],
     "continue it with --resume, or pass --overwrite"),
    ("changed setting on resume", lambda d: resume_argv(d, "--lr", "0.1"),
     "lr: checkpoint 0.003, now 0.1"),
    ("unknown --allow-changed", lambda d: resume_argv(d, "--allow-changed", "lrr"),
     "unknown setting(s) ['lrr']"),
    ("--device bogus", lambda d: ["train", "--device", "bogus"],
     "device 'bogus' is not a torch device"),
    ("--latent-channels 0", lambda d: ["train", "--latent-channels", "0"],
     "argument --latent-channels: must be at least 1, got 0"),
    ("--num-classes 0", lambda d: ["audit", "--num-classes", "0"],
     "argument --num-classes: must be at least 1, got 0"),
    ("--num-images -3", lambda d: ["demo", "--num-images", "-3"],
     "argument --num-images: must be at least 1, got -3"),
    ("--num-images beyond the data",
     lambda d: ["audit", "--data", str(d / "imgs.npy"), "--num-images", "41"],
     "--num-images 41, but"),
    ("pixel values outside [0, 1]",
     lambda d: ["train", "--data", npy(d / "big.npy", np.linspace(-1, 3, 64)), "--out", str(d)],
     "48 of 64 pixel values lie outside [0, 1] (range found -1 .. 3)"),
    ("missing --inputs", lambda d: user_argv(user_file(d), inputs=False),
     "takes (x) but no --inputs were given"),
    ("--inputs file missing",
     lambda d: [*user_argv(user_file(d), inputs=False), "--inputs", "nofile.py:inputs"],
     "--inputs: file nofile.py not found"),
    ("module not found", lambda d: user_argv("no_such_module_here"),
     "no module 'no_such_module_here' in the current folder"),
    ("unknown option", lambda d: ["train", "--bogus"], "unrecognized arguments: --bogus"),
]  # fmt: skip


def write(path, data):
    path.write_bytes(data)
    return path


def npy(path, values):
    np.save(path, np.asarray(values, dtype=np.float32).reshape(1, 8, 8))
    return str(path)


def legacy_truncated(folder):
    import io

    state = load_checkpoint(folder / "run" / "checkpoint.pt")
    state = {k: v for k, v in state.items() if k not in ("settings", "history")}
    buffer = io.BytesIO()
    torch.save({**state, "version": 1}, buffer)
    raw = buffer.getvalue()
    return str(write(folder / "old.pt", raw[: len(raw) - 300]))


@pytest.mark.parametrize(
    "make_argv, message", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_every_user_error_is_one_line_and_exit_2(make_argv, message, user_checkpoint, capsys):
    argv = make_argv(user_checkpoint)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    # argparse reports options no command knows as the program's own error
    assert re.match(rf"pyro-reparam-conv( {argv[0]})?: error: ", lines[0]), lines[0]
    assert message in lines[0]
