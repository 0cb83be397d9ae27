"""The command line end to end with tiny settings: every output file is written."""

import json
import textwrap

import numpy as np
import pytest

from pyro_reparam_conv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = ["--hidden-channels", "8", "--latent-channels", "2", "--num-classes", "3"]
TINY_TRAIN = ["--steps", "4", "--batch-size", "16", "--no-progress", "--device", "cpu"]

DEMO_FILES = {
    "checkpoint_pathwise.pt",
    "checkpoint_score.pt",
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
    assert "z route" in printed and "z:pathwise" in printed and "z:score" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["pathwise"]["routes"] == {"y": "score", "z": "pathwise"}
    assert results["score"]["routes"] == {"y": "score", "z": "score"}
    assert all(np.isfinite(r["elbo_per_image"]) for r in results.values())
    # --resume with the same budget continues from the checkpoints: nothing left to train.
    assert main(argv + ["--resume"]) == 0


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
    assert "pathwise" in capsys.readouterr().out
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
        "pathwise,score",
        *TINY_MODEL,
    ]
    assert main(argv) == 0
    assert {"estimator_comparison.csv", "estimator_comparison.png"} <= {
        p.name for p in compare_out.iterdir()
    }


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
