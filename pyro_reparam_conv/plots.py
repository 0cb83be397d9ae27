"""Figures: ELBO curves, reconstructions, posterior summaries (PNG via matplotlib's Agg).

matplotlib is imported inside the functions only (``import pyro_reparam_conv`` stays light),
with the non-interactive Agg backend, so plotting works without a display. Figures are sized
to be read at their natural size (at most about 1500 pixels wide at the 120 dpi they are
saved with; long lists grow downwards), with colour bars on every image panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np

from .introspect import display_name

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "plot_elbo_curves",
    "plot_posterior",
    "plot_posterior_z",
    "plot_reconstructions",
    "save_figure",
]

PathLike = Union[str, Path]


def _new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, squeeze=False, **kwargs)


def save_figure(fig: "Figure", path: PathLike) -> Path:
    """Write ``fig`` to ``path`` (folders created) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_elbo_curves(
    curves: Mapping[str, Sequence[float]],
    path: PathLike,
    *,
    num_data: int = 1,
    window: int = 25,
) -> Path:
    """ELBO per image (``-loss / num_data``) against step, one line per run, smoothed by a
    ``window``-step moving average (raw values faint behind it)."""
    fig, axes = _new_figure(figsize=(7, 4))
    ax = axes[0, 0]
    for label, losses in curves.items():
        elbo = -np.asarray(losses, dtype=float) / num_data
        steps = np.arange(1, len(elbo) + 1)
        (line,) = ax.plot(steps, elbo, alpha=0.2, linewidth=0.8)
        smooth = _smooth(elbo, window)
        ax.plot(steps[len(steps) - len(smooth) :], smooth, color=line.get_color(), label=label)
    finite = np.concatenate([-np.asarray(v, dtype=float) / num_data for v in curves.values()])
    finite = finite[np.isfinite(finite)]
    if finite.size:  # the first steps can be orders of magnitude lower: clip the view
        ax.set_ylim(np.percentile(finite, 2), finite.max() + 0.05 * np.ptp(finite) + 1e-9)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO per image (nats)")
    ax.set_title("Training ELBO")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _image_row(axes_row, images: np.ndarray, label: str) -> None:
    for ax, image in zip(axes_row, images):
        ax.imshow(
            np.moveaxis(image, 0, -1).squeeze(-1)
            if image.shape[0] == 1
            else np.moveaxis(image, 0, -1),
            cmap="gray_r",
            vmin=0,
            vmax=1,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    axes_row[0].set_ylabel(label, rotation=0, ha="right", va="center")


def plot_reconstructions(
    images: np.ndarray, reconstructions: Mapping[str, np.ndarray], path: PathLike
) -> Path:
    """A row of data images ``(n, C, H, W)`` in ``[0, 1]`` above one row per reconstruction."""
    images = np.asarray(images)
    n = len(images)
    fig, axes = _new_figure(
        1 + len(reconstructions), n, figsize=(1.1 * n, 1.2 * (1 + len(reconstructions)))
    )
    _image_row(axes[0], images, "data")
    for row, (label, recon) in enumerate(reconstructions.items(), start=1):
        _image_row(axes[row], np.asarray(recon), label)
    fig.suptitle("Reconstructions: E[x | z = E_q[z]]")
    return save_figure(fig, path)


def plot_posterior(
    y_probs: np.ndarray,
    labels: np.ndarray,
    z_mean: np.ndarray,
    z_std: np.ndarray,
    path: PathLike,
    *,
    title: Optional[str] = None,
) -> Path:
    """Left: mean ``q(y | x)`` per true label (rows) and cluster (columns). Right: posterior
    mean and standard deviation of ``z`` (channel 0) for the first few images, each panel
    titled with its image and channel."""
    y_probs, labels = np.asarray(y_probs), np.asarray(labels)
    classes = np.unique(labels)
    table = np.stack([y_probs[labels == c].mean(0) for c in classes])
    n = min(4, len(z_mean))
    fig, axes = _new_figure(
        2,
        1 + n,
        figsize=(3.6 + 1.7 * n, 5.0),
        gridspec_kw={"width_ratios": [3] + [1] * n},
        layout="constrained",
    )
    gs = axes[0, 0].get_gridspec()
    for ax in axes[:, 0]:
        ax.remove()
    big = fig.add_subplot(gs[:, 0])
    im = big.imshow(table, cmap="viridis", aspect="auto", vmin=0)
    big.set_xlabel("cluster y")
    big.set_ylabel("true digit")
    big.set_yticks(range(len(classes)), [str(c) for c in classes])
    big.set_title("mean q(y | x) by digit")
    fig.colorbar(im, ax=big, fraction=0.05)
    rows = (
        (np.asarray(z_mean)[:n, 0], "posterior mean of z", "coolwarm"),
        (np.asarray(z_std)[:n, 0], "posterior sd of z", "magma"),
    )
    for row, (values, name, cmap) in enumerate(rows):
        # one colour scale per row (symmetric about 0 for the means), shown by one colour bar
        top = float(np.abs(values).max()) or 1.0
        low = -top if row == 0 else 0.0
        for j in range(n):
            ax = axes[row, 1 + j]
            im = ax.imshow(values[j], cmap=cmap, vmin=low, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"image {j}\nchannel 0", fontsize=9)
            ax.set_xlabel("col (latent map)", fontsize=8)
        axes[row, 1].set_ylabel(f"{name}\nrow", fontsize=9)
        fig.colorbar(im, ax=list(axes[row, 1:]), fraction=0.05, pad=0.02, label=name)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _label_log_axis(axis, limits: tuple) -> None:
    """Label decades; on an axis spanning less than two decades also 2x and 5x, as plain
    numbers (matplotlib's own minor labels collide there)."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    low, high = sorted(limits)
    if low > 0 and np.log10(high / low) < 2:
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_minor_formatter(StrMethodFormatter("{x:g}"))
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    else:
        axis.set_minor_formatter(NullFormatter())


def plot_estimator_comparison(
    df, path: PathLike, *, params: Optional[Sequence[str]] = None, title: Optional[str] = None
) -> Path:
    """Bar charts (log scale) of gradient variance and signal-to-noise ratio per parameter,
    one bar per estimator, from :func:`pyro_reparam_conv.diagnostics.compare_estimators`'s
    DataFrame (columns ``estimator``, ``param``, ``variance``, ``snr``). ``params``: the
    parameters to show (default: all). Zero or non-finite values (a parameter that gets no
    gradient) cannot sit on a log axis: no bar, an ``x`` on the bottom edge instead."""
    missing = {"estimator", "param", "variance", "snr"} - set(df.columns)
    if missing:
        raise ValueError(f"df lacks columns {sorted(missing)}; pass compare_estimators' result")
    if params is not None:
        df = df[df["param"].isin(list(params))]
    if len(df) == 0:
        raise ValueError("nothing to plot: no rows (check `params`)")
    estimators = list(dict.fromkeys(df["estimator"]))
    names = list(dict.fromkeys(df["param"]))
    y = np.arange(len(names))
    height = 0.8 / len(estimators)
    # one row per parameter (names read horizontally), panels side by side: the width stays
    # fixed whatever the number of parameters; the height grows with it
    row_inches = 0.12 + 0.08 * len(estimators)
    fig, axes = _new_figure(
        1, 2, figsize=(10.0, 1.6 + row_inches * len(names)), sharey=True, layout="constrained"
    )
    for ax, column, label in (
        (axes[0, 0], "variance", "gradient variance (sum over elements)"),
        (axes[0, 1], "snr", "SNR = |mean| / sqrt(variance)"),
    ):
        for i, estimator in enumerate(estimators):
            rows = df[df["estimator"] == estimator].set_index("param")
            values = np.array(
                [float(rows[column].get(n, np.nan)) if n in rows.index else np.nan for n in names]
            )
            ok = np.isfinite(values) & (values > 0)
            pos = y - 0.4 + height * (i + 0.5)
            ax.barh(pos[ok], values[ok], height, label=estimator)
            if (~ok).any():
                # x in axes coordinates, y in data coordinates: a mark on the left edge
                ax.plot(
                    np.full((~ok).sum(), 0.02),
                    pos[~ok],
                    "kx",
                    markersize=5,
                    transform=ax.get_yaxis_transform(),
                )
        ax.set_xscale("log")
        _label_log_axis(ax.xaxis, ax.get_xlim())
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x", which="both")
    axes[0, 0].set_yticks(y, [display_name(n) for n in names], fontsize=9)
    axes[0, 0].set_ylim(len(names) - 0.5, -0.5)  # first parameter on top
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(),
        loc="outside lower center",
        ncol=min(len(estimators), 4),
        fontsize=9,
    )
    fig.suptitle(title or "Gradient estimators: variance and signal-to-noise per parameter")
    return save_figure(fig, path)


def plot_posterior_z(z, path: PathLike, count: int = 4) -> Path:
    """Histograms of the posterior draws of ``z`` (an xarray DataArray ``(chain, draw, image,
    channel, row, col)``, as in ``posterior.nc``): one panel per image (the first ``count``),
    each showing the element of that image's latent map that the data informs most (the
    smallest posterior sd), titled with the image, channel and position."""
    values = np.asarray(z.values).reshape(-1, *z.shape[2:])  # (draws, image, C, H, W)
    images = [int(i) for i in z.coords[z.dims[2]].values][:count]
    grid = (2, 2) if len(images) > 1 else (1, 1)
    size = (4.5 * grid[1], 3.4 * grid[0] + 0.4)
    fig, axes = _new_figure(*grid, figsize=size, layout="constrained")
    for k, ax in enumerate(axes.ravel()):
        if k >= len(images):
            ax.remove()
            continue
        draws = values[:, k].reshape(len(values), -1)
        element = int(draws.std(0).argmin())
        channel, row, col = np.unravel_index(element, values.shape[2:])
        x = draws[:, element]
        ax.hist(x, bins=int(np.clip(len(x) // 6, 5, 30)), color="tab:blue", alpha=0.8)
        ax.axvline(x.mean(), color="black", lw=1, label="mean")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="best", fontsize=8)
        ax.set_title(
            f"image {images[k]}, channel {channel}, row {row}, col {col}\n"
            f"mean {x.mean():.3g}, sd {x.std(ddof=1):.3g}",
            fontsize=10,
        )
        ax.set_xlabel("z (value of the element)")
        ax.set_ylabel("posterior draws")
    fig.suptitle(
        f"q(z | x): {len(values)} draws of the best-informed element (smallest sd) of each "
        "image's latent map"
    )
    return save_figure(fig, path)
