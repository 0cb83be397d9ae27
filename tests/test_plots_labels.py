"""Issue #23, item 6: every panel of the posterior plots says which image and channel (and
element) it shows, and its axes are labelled."""

import numpy as np
import pytest
import xarray as xr

from pyro_reparam_conv import plots


@pytest.fixture
def figures(monkeypatch, tmp_path):
    kept = []
    save = plots.save_figure

    def keep(fig, path):
        kept.append([(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes])
        return save(fig, tmp_path / "plot.png")

    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def test_posterior_z_panels_name_image_channel_and_element(figures, tmp_path):
    draws = np.random.default_rng(0).normal(size=(1, 40, 5, 2, 3, 3))
    dims = ("chain", "draw", "images", "z_dim_0", "z_dim_1", "z_dim_2")
    z = xr.DataArray(draws, dims=dims, coords={"images": [3, 4, 7, 8, 9]})
    plots.plot_posterior_z(z, tmp_path / "z.png")
    (panels,) = figures
    assert len(panels) == 4
    for (title, xlabel, ylabel), image in zip(panels, [3, 4, 7, 8]):
        assert title.startswith(f"image {image}, channel ") and ", row " in title
        assert xlabel and ylabel


def test_posterior_z_maps_name_image_and_channel(figures, tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 2, 4, 4))
    plots.plot_posterior(rng.dirichlet(np.ones(3), 6), rng.integers(0, 3, 6), maps,
                         np.abs(maps), tmp_path / "p.png")  # fmt: skip
    (panels,) = figures
    titles = [title for title, _, _ in panels]
    assert titles.count("image 0\nchannel 0") == 2  # mean and sd rows
    assert all("#" not in title for title in titles)
