"""Issue #23: reruns lose nothing, resume says what it did, error messages are true to the
situation, a failed start leaves no empty folder."""

import json

import numpy as np
import pytest

from pyro_reparam_conv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden-channels", "8", "--latent-channels", "2", "--num-classes", "3", "--no-progress"]
TINY += ["--batch-size", "16", "--device", "cpu"]


def strict_json(path):
    """JSON as the standard has it: a bare NaN is an error."""

    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_resume_with_nothing_to_train_says_so_and_keeps_the_results(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--num-images", "32", "--out", str(out), *TINY]
    assert main([*base, "--steps", "3"]) == 0
    first = strict_json(out / "results.json")
    assert first["routes"] == {"y": "enumerate", "z": "pathwise"} and first["steps"] == 3
    capsys.readouterr()
    assert main([*base, "--steps", "2", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "already at step 3 (--steps 2): nothing trained" in printed
    assert "y: enumerate" in printed and "nan" not in printed
    assert f"{first['seconds_per_step'] * 1e3:.1f} ms/step" in printed
    assert strict_json(out / "results.json") == first
    # more steps: trains them and says so, the results are the new run's
    assert main([*base, "--steps", "4", "--resume"]) == 0
    assert "resumed at step 3" in capsys.readouterr().out
    assert strict_json(out / "results.json")["trained_now"] == 1


def test_resume_without_a_checkpoint_is_an_error_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["train", "--num-images", "32", "--out", str(out), "--resume", *TINY]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--resume: no checkpoint to continue in" in err[0]
    assert not (tmp_path / "new").exists()


def test_missing_data_is_named_as_given_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "nope.npy", "--out", "r1", *TINY]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["pyro-reparam-conv train: error: --data nope.npy: no such file"]
    assert not (tmp_path / "r1").exists()


def test_a_failed_start_keeps_an_existing_folder_and_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad = tmp_path / "big.npy"
    np.save(bad, np.full((4, 8, 8), 3.0, dtype=np.float32))
    assert main(["train", "--data", str(bad), "--out", str(out), *TINY]) == 2
    assert (out / "notes.txt").read_text() == "mine"
