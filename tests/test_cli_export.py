"""Issue #23, item 1: `export` summarises every image (per-image q(y | x), posterior mean and
sd of z) and keeps all posterior draws of a few chosen images only, so its files grow by a
few hundred bytes per image, not by draws x pixels."""

import numpy as np
import pytest

from pyro_reparam_conv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden-channels", "8", "--latent-channels", "2", "--num-classes", "3", "--no-progress"]
NUM_IMAGES, DRAWS = 300, 50


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    images = np.random.default_rng(0).random((NUM_IMAGES, 16, 16)).astype(np.float32)
    np.save(folder / "imgs.npy", images)
    argv = ["train", "--data", str(folder / "imgs.npy"), "--out", str(folder / "run"), *TINY]
    assert main([*argv, "--steps", "2", "--batch-size", "32", "--device", "cpu"]) == 0
    return folder / "run"


def test_export_size_is_bounded_and_every_image_is_summarised(run, capsys):
    import pandas as pd
    import xarray as xr

    capsys.readouterr()
    argv = ["export", str(run / "checkpoint.pt"), "--num-samples", str(DRAWS), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("writing to ") and "posterior_summary.nc" in printed
    # 8 images with all their draws: about DRAWS x 8 x (latents + pixels) floats
    assert (run / "posterior.nc").stat().st_size < 1_000_000
    # per image: 3 cluster probabilities, mean and sd of 2 x 8 x 8 latents, float32
    per_image = (3 + 2 * 2 * 8 * 8) * 4
    assert (run / "posterior_summary.nc").stat().st_size < 1.2 * NUM_IMAGES * per_image + 30_000
    with xr.open_dataset(run / "posterior_summary.nc") as summary:
        assert summary["z_mean"].shape == (NUM_IMAGES, 2, 8, 8)
        assert summary["z_sd"].dims == ("image", "channel", "row", "col")
        np.testing.assert_allclose(summary["y_prob"].sum("cluster"), 1.0, rtol=1e-5)
    table = pd.read_csv(run / "summary.csv")
    assert list(table.columns) == ["image", "cluster", "p_cluster", "z_sd_mean"]
    assert len(table) == NUM_IMAGES


def test_export_chosen_images_keep_their_indices(run, tmp_path, capsys):
    import arviz as az

    out = tmp_path / "chosen"
    argv = ["export", str(run / "checkpoint.pt"), "--num-samples", "4", "--out", str(out)]
    assert main([*argv, "--images", "3,5-6", "--no-progress"]) == 0
    idata = az.from_netcdf(out / "posterior.nc")
    assert list(idata.posterior["images"].values) == [3, 5, 6]
    assert main([*argv, "--images", f"{NUM_IMAGES}"]) == 2
    assert f"--images {NUM_IMAGES}: there are {NUM_IMAGES} images" in capsys.readouterr().err
