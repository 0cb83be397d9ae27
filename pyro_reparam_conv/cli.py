"""Command line: ``pyro-reparam-conv demo | train | export | audit | compare``.

- ``demo``: the main job. Trains :class:`~pyro_reparam_conv.models.ConvClusterVAE` on the
  embedded digits with the same budget on each of :data:`DEMO_RUNS` (the default routes;
  the cluster ``y`` on the score function; the latent map ``z`` forced onto the score
  function) and writes the comparison (table with ELBO, NMI of ``q(y | x)`` to the digit
  labels, encoder-gradient variance and time; ELBO curves, reconstructions, posterior plots,
  ``posterior.nc``, ``summary.csv``).
- ``train`` / ``export``: the same model on the user's ``.npy`` / ``.npz`` images; training
  checkpoints are atomic and checksummed, ``--resume`` continues exactly (and refuses changed
  settings unless ``--allow-changed`` names them; a resume with nothing left to train says
  so and shows the run's stored results); ``export`` turns a checkpoint into files from any
  folder (the checkpoint records where its data is): every image summarised
  (``posterior_summary.nc``, ``summary.csv``), all draws of a few (``posterior.nc``). ``train`` runs
  data-parallel under ``torchrun`` or with ``--nproc N`` (which launches torchrun's agent):
  see :mod:`pyro_reparam_conv.distributed`; its errors are said once, by the rank concerned.
- ``audit`` / ``compare``: gradient diagnostics for the built-in model (or a checkpoint of it)
  or for the user's own model and guide given as ``module:function`` (or
  ``path/to/file.py:function``): that imports and runs the user's code, each module once.
  ``audit --check-bias`` also compares each pathwise site's mean gradient with an unbiased
  estimator (``docs/biased_pathwise.md``); a biased site, like a parameter without gradient,
  makes it exit with status 1.

Every user error (bad option, unreadable or corrupt file, changed settings on resume, a
checkpoint in the way) is one line on stderr, ``pyro-reparam-conv <command>: error: ...``, and
exit status 2. SIGINT/SIGTERM during training checkpoint the last completed step and exit
with 128 + the signal number. ``--threads`` (default 1: these small convolutions run fastest
on one thread) sets torch's intra-op threads for the command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

# torch and Pyro are imported by the commands, not here: `--help` and usage errors stay fast.
__all__ = ["build_parser", "main"]

#: ``distributed.DEFAULT_TIMEOUT`` and the variables torchrun sets for its workers, repeated
#: here so that parsing imports no torch (tests/test_cli_help.py checks they agree)
DEFAULT_TIMEOUT = 300.0
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MODEL_OPTIONS = ("latent_channels", "num_classes", "hidden_channels", "num_downsamples")
DEFAULT_THREADS = 1
#: the demo's runs: name -> the estimator of each site ("auto": the automatic route)
DEMO_RUNS = {
    "default": {"y": "auto", "z": "auto"},
    "y_score": {"y": "score", "z": "auto"},
    "z_score": {"y": "auto", "z": "score"},
}


# ----------------------------------------------------------------------- argument types
class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``prog: error: message`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        shown = f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        self.exit(2, shown if _rank() == 0 else None)  # under torchrun: said once, by rank 0


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _device(text: str) -> str:
    from .train import resolve_device

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def launched_by_torchrun() -> bool:
    """Whether this process is a ``torchrun`` worker (as ``distributed.launched_by_torchrun``)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def _rank() -> int:
    """This process's rank under torchrun, else 0."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def _torchrun_world_size() -> int:
    """The number of torchrun workers this process is one of (1 outside torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def _setting_names(text: str) -> list[str]:
    """``lr,z-estimator`` -> ``["lr", "z_estimator"]`` (dashes or underscores)."""
    return [name.strip().replace("-", "_") for name in text.split(",") if name.strip()]


# ----------------------------------------------------------------------- arguments
COMPARE_COLUMNS = """\
the table (one row per estimator and parameter; estimator_comparison.csv has them all):
  estimator      the label of --estimators; a * when some sites kept another route (the
                 routes of each label are listed under the table, with the reason)
  param          the parameter (unconstrained tensor, what the optimizer updates)
  mean_norm      Euclidean norm of the mean gradient over the draws
  variance       sum over the parameter's elements of the per-draw gradient variance
  snr            mean_norm / sqrt(variance): signal-to-noise ratio (higher is better)
  ms/draw        milliseconds per gradient draw (compare variance x time)
  z_vs_unbiased  largest |mean - reference| / standard error over the elements, against
                 the pooled estimators unbiased for any cost (score*, enumerate, disarm,
                 measure_valued; nan when none other is in the table)
  agrees         z_vs_unbiased below the threshold for that many elements and draws; a
                 False for pathwise only: a cost not differentiable in a site
                 (docs/biased_pathwise.md)"""
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    positive = _int_at_least(1)
    group.add_argument("--latent-channels", type=positive, default=4, help="channels of z (4)")
    group.add_argument("--num-classes", type=positive, default=10, help="clusters of y (10)")
    group.add_argument("--hidden-channels", type=positive, default=32, help="conv width (32)")
    group.add_argument(
        "--num-downsamples", type=_int_at_least(0), default=1, help="stride-2 stages (1)"
    )


def _add_training_options(parser: argparse.ArgumentParser, steps: int) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--steps", type=_int_at_least(0), default=steps, help=f"SVI steps (default {steps})"
    )
    group.add_argument(
        "--batch-size", type=_int_at_least(1), default=64, help="images per step (default 64)"
    )
    group.add_argument(
        "--lr", type=_positive_float, default=3e-3, help="Adam learning rate (default 3e-3)"
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument(
        "--device", type=_device, default="auto", help="auto (cuda if available), cpu, cuda[:k]"
    )
    start = group.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint(s) in --out"
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh and replace the checkpoint(s) in --out (refused without this flag)",
    )
    group.add_argument(
        "--allow-changed",
        type=_setting_names,
        action="extend",
        default=[],
        metavar="SETTING[,SETTING]",
        help="with --resume: accept these settings differing from the checkpoint's (e.g. lr, "
        "seed, threads, y-estimator, z-estimator, data); any other difference is refused",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        type=Path,
        help="images as .npy or .npz, shape (N, H, W) or (N, C, H, W), pixel values in [0, 1] "
        "(integer arrays are divided by their dtype's maximum); default: embedded digits",
    )
    group.add_argument("--key", help="array name inside a .npz holding several arrays")
    group.add_argument(
        "--scale", type=_positive_float, help="divide the pixel values by this (e.g. 255)"
    )
    group.add_argument("--num-images", type=_int_at_least(1), help="use only the first N images")


def _add_user_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "your own model (instead of the built-in one); these import and run your code"
    )
    group.add_argument(
        "--model",
        help="module:function (importable from the current folder) or path/to/file.py:function "
        "of a Pyro model",
    )
    group.add_argument("--guide", help="module:function of its guide")
    group.add_argument(
        "--inputs", help="module:function returning the model's args tuple, or (args, kwargs)"
    )
    group.add_argument(
        "--checkpoint",
        type=Path,
        help="built-in model: load parameters, configuration and data from a checkpoint",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-reparam-conv",
        description="Pathwise vs score-function gradients in conv latent-variable models.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=DEFAULT_THREADS,
        help=f"torch CPU threads (default {DEFAULT_THREADS}: fastest for these small convolutions)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    demo = command("demo", "the main job: the conv cluster VAE on the digits, per estimator route")
    _add_training_options(demo, steps=600)
    _add_model_options(demo)
    demo.add_argument(
        "--num-images", type=_int_at_least(1), default=1024, help="digits used (default 1024)"
    )
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    demo.add_argument(
        "--variance-draws",
        type=_int_at_least(2),
        default=100,
        help="gradient draws per estimator for the encoder variance (default 100)",
    )
    demo.add_argument(
        "--export-images",
        type=_int_at_least(1),
        default=8,
        help="images with all their posterior draws in posterior.nc (default 8); "
        "posterior_summary.nc and summary.csv have every image",
    )
    demo.add_argument(
        "--num-samples", type=_int_at_least(1), default=200, help="posterior draws (default 200)"
    )

    train = command("train", "train the conv model on your images")
    _add_data_options(train)
    _add_training_options(train, steps=1000)
    _add_model_options(train)
    train.add_argument(
        "--z-estimator",
        choices=("auto", "pathwise", "score"),
        default="auto",
        help="estimator of the latent map z (auto: pathwise, through its rsample)",
    )
    train.add_argument(
        "--y-estimator",
        choices=("auto", "enumerate", "score"),
        default="auto",
        help="estimator of the cluster y (auto: summed exactly over its support)",
    )
    train.add_argument("--out", type=Path, default=Path("train_output"), help="output folder")
    train.add_argument(
        "--checkpoint-every",
        type=_int_at_least(1),
        default=100,
        help="write the checkpoint every N steps, and at the end (default 100)",
    )
    parallel = train.add_argument_group(
        "data-parallel (torch.distributed; see docs/distributed.md)",
        "--batch-size is the global batch, split over the processes. Run under `torchrun "
        "--nproc-per-node N -m pyro_reparam_conv.cli train ...`, or give --nproc N.",
    )
    parallel.add_argument(
        "--nproc",
        type=_int_at_least(1),
        help="train in N processes on this machine: launches torchrun (gloo on the CPU, NCCL "
        "with one GPU per process); under torchrun, the number of workers it started",
    )
    parallel.add_argument(
        "--noise-shards",
        type=_int_at_least(1),
        help="compute each batch as S shards with noise seeded per (seed, step, shard); the "
        "same S gives the same result on any number of processes (default: the number of "
        "processes; a multiple of it dividing --batch-size)",
    )
    parallel.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long a process waits for the others before it fails (default "
        f"{DEFAULT_TIMEOUT:g})",
    )

    export = command(
        "export",
        "checkpoint -> posterior_summary.nc (every image), summary.csv, posterior.nc (all "
        "draws of a few images), posterior_z.png",
    )
    export.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    _add_data_options(export)
    export.add_argument(
        "--num-samples", type=_int_at_least(1), default=200, help="posterior draws (default 200)"
    )
    export.add_argument(
        "--images",
        type=_image_list,
        metavar="LIST",
        help="images whose posterior draws all go to posterior.nc, as indices and ranges, e.g. "
        "0-7,12 (default 0-7); every image is summarised in posterior_summary.nc",
    )
    export.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    export.add_argument("--out", type=Path, default=None, help="folder (default: the checkpoint's)")
    export.add_argument("--seed", type=int, default=0, help="seed of the posterior draws (0)")

    audit = command("audit", "routes per site, parameters without gradient, unmatched sites")
    _add_user_model_options(audit)
    _add_model_options(audit)
    _add_data_options(audit)
    audit.add_argument(
        "--seed", type=int, default=0, help="seed of the audit's draws (default 0)"
    )
    audit.add_argument(
        "--check-bias",
        action="store_true",
        help="also compare each pathwise site's mean gradient with an unbiased estimator "
        "(measure-valued or score function): a cost that is not differentiable in the site "
        "(a step, a threshold, an argmax) biases it; exit status 1 if one is",
    )
    audit.add_argument(
        "--num-draws",
        type=_int_at_least(2),
        default=200,
        help="gradient draws per estimator of --check-bias (default 200)",
    )

    compare = command("compare", "gradient variance / SNR / cost per estimator")
    compare.formatter_class = argparse.RawDescriptionHelpFormatter
    compare.epilog = COMPARE_COLUMNS
    _add_user_model_options(compare)
    _add_model_options(compare)
    _add_data_options(compare)
    compare.add_argument(
        "--estimators",
        default="pathwise,score,score+avg,score+loo",
        help="comma-separated names: pathwise, pathwise+kl, score, score+avg, score+loo, auto, "
        "or any registered estimator (enumerate, disarm, gumbel_st, measure_valued); default "
        "pathwise,score,score+avg,score+loo",
    )
    compare.add_argument(
        "--num-draws",
        type=_int_at_least(2),
        default=200,
        help="gradient draws per estimator (default 200)",
    )
    compare.add_argument(
        "--out",
        type=Path,
        default=Path("compare_output"),
        help="folder of estimator_comparison.csv/.png (default compare_output)",
    )
    compare.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    return parser


# ----------------------------------------------------------------------- pieces
def _model_config(args: argparse.Namespace, image_shape: Sequence[int]) -> dict:
    config = {name: getattr(args, name) for name in MODEL_OPTIONS}
    config["image_shape"] = [int(s) for s in image_shape]
    return config


def _build_model(config: dict, routes: Mapping[str, str] = {}):
    """The model of ``config``; ``routes`` maps ``"y"`` / ``"z"`` to an estimator (or "auto")."""
    from .models import ConvClusterVAE

    infer = {
        f"{site}_infer": {} if routes.get(site, "auto") == "auto" else {"estimator": routes[site]}
        for site in ("y", "z")
    }
    options = {name: config[name] for name in MODEL_OPTIONS}
    return ConvClusterVAE(tuple(config["image_shape"]), **infer, **options)


def _data_source(args: argparse.Namespace, out: Optional[Path] = None) -> dict:
    """Where the images of ``args`` come from, recorded in checkpoints so that ``export`` and
    ``audit --checkpoint`` load the same images from any folder: the data file's absolute
    path and its path relative to the output folder (found again if both are moved together),
    ``key``, ``scale`` and ``num_images``; ``data`` is ``None`` for the embedded digits."""
    data = getattr(args, "data", None)
    source = {"data": None, "key": None, "scale": None, "num_images": args.num_images}
    if data is not None:
        path = Path(data).resolve()
        relative = os.path.relpath(path, out.resolve()) if out is not None else None
        source.update(data=str(path), data_relative=relative, key=args.key, scale=args.scale)
    return source


def _find_data_file(source: Mapping, base: Optional[Path]) -> Path:
    """The recorded data file: as recorded (absolute, or relative to the current folder for
    old checkpoints), else relative to ``base`` (the checkpoint's folder)."""
    recorded = Path(source["data"])
    candidates = [recorded]
    if base is not None:
        candidates.append(base / (source.get("data_relative") or recorded))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise FileNotFoundError(
        f"the checkpoint's training data is not found (looked for {tried}); pass --data to say "
        "where it is now"
    )


def _images_from(source: Mapping, base: Optional[Path] = None) -> torch.Tensor:
    """The images a :func:`_data_source` record describes (``base``: see
    :func:`_find_data_file`)."""
    from .data import load_default_images, load_images

    count = source.get("num_images")
    if not source.get("data"):
        return load_default_images(count, seed=source.get("shuffle_seed"))[0]
    path = _find_data_file(source, base)
    images = load_images(path, source.get("key"), scale=source.get("scale"))
    if count is not None and count > len(images):
        raise ValueError(f"--num-images {count}, but {path} holds {len(images)} images")
    return images[:count] if count is not None else images


def _load_data(args: argparse.Namespace) -> torch.Tensor:
    """The images of ``--data`` (or the embedded digits); a missing file is named as given."""
    data = getattr(args, "data", None)
    if data is not None and not Path(data).is_file():
        what = "is a folder, not a file" if Path(data).is_dir() else "no such file"
        raise ValueError(f"--data {data}: {what}")
    return _images_from(_data_source(args))


def _checkpoint_images(args: argparse.Namespace, checkpoint: Path, state: dict) -> torch.Tensor:
    """``--data`` when given; else the images ``checkpoint`` was trained on, checked against
    its data fingerprint (``--num-images`` then keeps the first N of them)."""
    from .checkpoint import data_fingerprint

    if args.data is not None:
        images = _load_data(args)
    else:
        images = _images_from(state["metadata"], checkpoint.parent)
        recorded = (state.get("settings") or {}).get("data")
        found = data_fingerprint(images) if recorded is not None else None
        if found != recorded:
            raise ValueError(
                f"the data file recorded in {checkpoint} has changed since training "
                f"(SHA-256 {found[7:19]}..., trained on {recorded[7:19]}...); pass --data to "
                "use these or other images on purpose"
            )
        images = images[: args.num_images]
    config = state["metadata"]
    if list(images.shape[1:]) != list(config["image_shape"]):
        raise ValueError(
            f"the images have shape {tuple(images.shape[1:])}, but {checkpoint} was trained "
            f"on {tuple(config['image_shape'])}"
        )
    return images


def _image_list(text: str) -> list[int]:
    """``0-7,12`` -> ``[0, 1, ..., 7, 12]`` (image indices, in order, without repeats)."""
    found: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, dash, high = part.partition("-")
            found += range(int(low), int(high) + 1) if dash else [int(low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices like 0-7,12, got {text!r}") from None
    if not found or min(found) < 0:
        raise argparse.ArgumentTypeError(f"expected indices >= 0 like 0-7,12, got {text!r}")
    return list(dict.fromkeys(found))


def _posterior_summary(vae, images, progress: bool, batch: int = 1024):
    """Every image's ``q(y | x)`` and the posterior mean and sd of its latent map ``z``, exact
    (the guide's own parameters, no draws), as an xarray Dataset (float32)."""
    import numpy as np
    import torch
    import xarray as xr
    from tqdm.auto import tqdm

    parts: list[tuple] = []
    starts = range(0, len(images), batch)
    with torch.no_grad():
        for start in tqdm(starts, desc="summary", unit="batch", disable=not progress):
            logits, mean, var = vae.encode(images[start : start + batch])
            parts.append((logits.softmax(-1), mean, var.sqrt()))
    y_prob, z_mean, z_sd = (torch.cat(p).cpu().numpy().astype(np.float32) for p in zip(*parts))
    z_dims = ("image", "channel", "row", "col")
    return xr.Dataset(
        {"y_prob": (("image", "cluster"), y_prob), "z_mean": (z_dims, z_mean),
         "z_sd": (z_dims, z_sd)},
        coords={"image": np.arange(len(images))},
        attrs={"description": "q(y | x) and the mean and sd of q(z | x), per image"},
    )  # fmt: skip


def _summary_table(summary):
    """``summary.csv``: one row per image, what a person reads: its most probable cluster,
    that cluster's probability, and the mean posterior sd of its latent map."""
    import pandas as pd

    y_prob = summary["y_prob"].values
    return pd.DataFrame(
        {
            "image": summary["image"].values,
            "cluster": y_prob.argmax(-1),
            "p_cluster": y_prob.max(-1).round(4),
            "z_sd_mean": summary["z_sd"].values.mean((1, 2, 3)).round(4),
        }
    )


def _megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.0f} kB"


def _export(
    vae,
    images,
    out: Path,
    num_samples: int,
    seed: int,
    losses: Optional[Sequence[float]] = None,
    shown: Sequence[int] = range(8),
    progress: bool = True,
) -> dict[str, Path]:
    """``posterior_summary.nc`` (every image, summarised), ``summary.csv`` (one row per
    image), ``posterior.nc`` (ArviZ InferenceData: all ``num_samples`` draws of the images
    ``shown`` only, under their indices) and ``posterior_z.png``; sizes are printed first."""
    from .inference_data import quiet_arviz, to_inference_data
    from .plots import plot_posterior_z

    shown = list(shown)
    if max(shown) >= len(images):
        raise ValueError(f"--images {max(shown)}: there are {len(images)} images (0-based)")
    summary = _posterior_summary(vae, images, progress)
    table = _summary_table(summary)
    idata = to_inference_data(
        vae.model, vae.guide, images[shown], num_samples=num_samples, seed=seed,
        elbo_trace=losses,
    )  # fmt: skip
    with quiet_arviz():
        idata = idata.assign_coords({"images": shown}, groups=["posterior", "posterior_predictive",
                                    "log_likelihood", "observed_data"])  # fmt: skip
    paths = {name: out / name for name in ("posterior_summary.nc", "summary.csv", "posterior.nc")}
    draws_bytes = sum(ds.nbytes for _, ds in idata.items())
    print(
        f"writing to {out}/: posterior_summary.nc {_megabytes(summary.nbytes)} ({len(images)} "
        f"images), summary.csv {_megabytes(len(table) * 32)}, posterior.nc "
        f"{_megabytes(draws_bytes)} ({num_samples} draws of {len(shown)} images)"
    )
    summary.to_netcdf(paths["posterior_summary.nc"])
    table.to_csv(paths["summary.csv"], index=False)
    idata.to_netcdf(str(paths["posterior.nc"]))
    paths["posterior_z.png"] = plot_posterior_z(idata.posterior["z"], out / "posterior_z.png")
    return paths


# ----------------------------------------------------------------------- demo
def _prepare_out(args: argparse.Namespace, checkpoints: Sequence[Path]) -> None:
    """Before any work: refuse to replace existing checkpoints without ``--overwrite`` (or
    ``--resume``), and make sure ``--out`` can be written."""
    from .checkpoint import check_writable, refuse_overwrite

    if args.resume and not any(path.exists() for path in checkpoints):
        names = ", ".join(path.name for path in checkpoints)
        raise ValueError(
            f"--resume: no checkpoint to continue in {args.out} (looked for {names}); leave "
            "out --resume to start afresh, or give the --out of the run to continue"
        )
    if not args.resume and not args.overwrite:
        for path in checkpoints:
            refuse_overwrite(
                path,
                "continue it with --resume, or pass --overwrite to replace it (or use "
                "another --out)",
            )
    check_writable(args.out)


def _fit(
    args,
    config: dict,
    source: dict,
    images,
    routes: Mapping[str, str],
    checkpoint: Path,
    group: Any = None,
    **options,
):
    """A fresh ConvClusterVAE trained with RoutedELBO from the command-line options;
    returns ``(vae, TrainResult)`` (the ELBO, with its routes, is ``result.elbo``). The model
    configuration and the sites' ``routes`` are settings a resume must match; ``source``
    (where the images came from) is recorded with the configuration for ``export``/``audit``.
    ``group``: the :class:`~pyro_reparam_conv.distributed.Group` to train in (``None``: this
    process); only its rank 0 prints."""
    import pyro

    from .distributed import SINGLE
    from .elbo import RoutedELBO
    from .train import train

    group = group if group is not None else SINGLE
    if args.resume and not checkpoint.exists() and group.main:
        print(f"{checkpoint}: no checkpoint yet, starting at step 0")
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = _build_model(config, routes)
    result = train(
        vae.model,
        vae.guide,
        images,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        elbo=RoutedELBO(),
        device=args.device,
        seed=args.seed,
        checkpoint_path=checkpoint,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changed=args.allow_changed,
        settings={f"{site}_estimator": route for site, route in routes.items()} | config,
        progress=not args.no_progress,
        metadata={**config, **source},
        process_group=group,
        **options,
    )
    if result.start_step and result.step > result.start_step and group.main:
        changes = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in result.changed.items())
        print(
            f"{checkpoint}: resumed at step {result.start_step}"
            + (f" with accepted changes: {changes}" if changes else "")
        )
    return vae, result


def _record_path(checkpoint: Path) -> Path:
    """The results file of the run whose checkpoint is ``checkpoint``: ``checkpoint.pt`` ->
    ``results.json``, ``checkpoint_NAME.pt`` -> ``results_NAME.json``."""
    return checkpoint.with_name(checkpoint.stem.replace("checkpoint", "results", 1) + ".json")


def _finite(value: Any) -> Any:
    """``value`` for JSON: a NaN/Inf float becomes ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _run_record(result, checkpoint: Path) -> dict:
    """This run's routes and timing. A call that trained steps writes them to the run's own
    results file (:func:`_record_path`); a resume that had nothing left to train reads them
    back (``trained_now`` 0), so a rerun never replaces them with empty ones."""
    import torch

    path = _record_path(checkpoint)
    trained = result.step - result.start_step
    if trained <= 0 and path.is_file():
        return {**json.loads(path.read_text()), "trained_now": 0}
    record = {
        "steps": result.step,
        "trained_now": trained,
        "seconds_per_step": result.seconds_per_step if trained > 0 else None,
        "device": str(result.device),
        "threads": torch.get_num_threads(),
        "routes": {site: r.estimator for site, r in result.elbo.routes.items()},
        "reasons": {site: r.reason for site, r in result.elbo.routes.items()},
        "described": [str(r) for r in result.elbo.routes.values()],
    }
    if trained > 0:
        _write_json(path, record)
    return record


def _nothing_trained(checkpoint: Path, result, steps: int, record: dict) -> str:
    """What a resume that had nothing left to train says."""
    stored = (
        " (results as stored by the run that trained it)"
        if record.get("routes")
        else f" (no {_record_path(checkpoint).name} stored with it: no routes or timing to show)"
    )
    return (
        f"{checkpoint}: already at step {result.start_step} (--steps {steps}): nothing "
        f"trained; pass a larger --steps to continue it{stored}"
    )


def _evaluate_elbo(vae, images: torch.Tensor, seed: int, num_particles: int = 8) -> float:
    """ELBO per image on ``images``: a Monte Carlo estimate with ``Trace_ELBO`` (the same
    estimator for every run, whatever its training routes)."""
    import pyro
    import torch

    pyro.set_rng_seed(seed)
    elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)
    with torch.no_grad():
        return -elbo.loss(vae.model, vae.guide, images) / len(images)


def _encoder_variance(vae, batch: torch.Tensor, num_data: int, draws: int, seed: int):
    """Total per-draw gradient variance of the encoder (body and z head) for each demo run's
    routes, all at ``vae``'s parameters (RoutedELBO as in training)."""
    from .diagnostics import compare_estimators

    configurations = {
        name: {site: e for site, e in routes.items() if e != "auto"}
        for name, routes in DEMO_RUNS.items()
    }
    frame = compare_estimators(
        vae.model,
        vae.guide,
        batch,
        num_data=num_data,
        estimators=configurations,
        num_draws=draws,
        seed=seed,
    )
    encoder = frame[frame["param"].str.startswith(("encoder.", "z_head."))]
    return frame, encoder.groupby("estimator")["variance"].sum().to_dict()


def _per_step(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.4f}"


def _format_table(rows: list[dict]) -> str:
    headers = list(rows[0])
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def run_demo(args: argparse.Namespace) -> dict:
    """Train each of :data:`DEMO_RUNS`, compare, plot and export; returns the results as data."""
    import torch

    from .data import load_default_images
    from .metrics import normalized_mutual_information
    from .plots import (
        plot_elbo_curves,
        plot_estimator_comparison,
        plot_posterior,
        plot_reconstructions,
    )

    out: Path = args.out
    _prepare_out(args, [out / f"checkpoint_{name}.pt" for name in DEMO_RUNS])
    images, labels = load_default_images(args.num_images, seed=args.seed)
    source = {"data": None, "num_images": args.num_images, "shuffle_seed": args.seed}
    config = _model_config(args, images.shape[1:])
    shown = images[:10]
    runs, reconstructions = {}, {}
    for name, routes in DEMO_RUNS.items():
        checkpoint = out / f"checkpoint_{name}.pt"
        vae, result = _fit(args, config, source, images, routes, checkpoint, desc=name)
        device = result.device
        vae.eval()
        with torch.no_grad():
            reconstructions[name] = vae.reconstruct(shown.to(device)).cpu().numpy()
            y_logits, z_mean, z_var = vae.encode(images.to(device))
        record = _run_record(result, checkpoint)
        if record["trained_now"] == 0:
            print(_nothing_trained(checkpoint, result, args.steps, record))
        runs[name] = {
            "result": result,
            "elbo": _evaluate_elbo(vae, images.to(device), args.seed),
            "nmi": normalized_mutual_information(y_logits.argmax(-1).cpu(), labels),
            **record,
        }
        if name == "default":  # while its parameters are the param store's
            frame, variance = _encoder_variance(
                vae,
                images[: args.batch_size].to(device),
                len(images),
                args.variance_draws,
                args.seed,
            )
            plot_posterior(
                y_logits.softmax(-1).cpu().numpy(),
                labels.numpy(),
                z_mean.cpu().numpy(),
                z_var.sqrt().cpu().numpy(),
                out / "posterior.png",
                title="q(y, z | x) after training with the default routes",
            )
            exported = _export(
                vae,
                images.to(device),
                out,
                args.num_samples,
                args.seed,
                result.losses,
                shown=range(min(args.export_images, len(images))),
                progress=not args.no_progress,
            )
    default = runs["default"]
    frame.to_csv(out / "estimator_comparison.csv", index=False)
    plot_estimator_comparison(frame, out / "estimator_comparison.png")
    plot_elbo_curves(
        {name: run["result"].losses for name, run in runs.items()},
        out / "elbo_curves.png",
        num_data=len(images),
    )
    plot_reconstructions(shown.numpy(), reconstructions, out / "reconstructions.png")

    rows = [
        {
            "run": name,
            "routes": ", ".join(f"{k}:{v}" for k, v in sorted(run["routes"].items())),
            "ELBO/image": f"{run['elbo']:.3f}",
            "NMI(y, digit)": f"{run['nmi']:.3f}",
            "encoder grad var": f"{variance.get(name, float('nan')):.3g}",
            "s/step": _per_step(run.get("seconds_per_step")),
            "steps": str(run["result"].step),
        }
        for name, run in runs.items()
    ]
    report = (
        f"{len(images)} digits, {args.steps} steps of batch {args.batch_size}, seed {args.seed}, "
        f"device {default['result'].device}, {torch.get_num_threads()} torch thread(s)\n"
        f"{_format_table(rows)}\n"
        f"ELBO/image: Trace_ELBO, 8 particles, all {len(images)} images. NMI: argmax q(y | x) "
        f"against the digit labels. Encoder gradient variance: {args.variance_draws} "
        "single-particle draws of each run's routes at the default run's final parameters."
    )
    costs = runs["z_score"]["reasons"].get("z", "").rpartition("; ")[2]
    if "costs" in costs:  # element- or site-level costs of z on the score function, and why
        report += f"\nz_score: {costs}."
    (out / "results.txt").write_text(report + "\n")
    summary = {
        name: {
            "elbo_per_image": run["elbo"],
            "nmi": run["nmi"],
            "encoder_grad_variance": variance.get(name),
            "seconds_per_step": run.get("seconds_per_step"),
            "threads": run.get("threads", torch.get_num_threads()),
            "steps": run["result"].step,
            "routes": run["routes"],
            "reasons": run["reasons"],
        }
        for name, run in runs.items()
    }
    _write_json(out / "results.json", summary)
    print(report)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}/")
    return {"summary": summary, "files": exported}


# ----------------------------------------------------------------------- train / export
def run_train(args: argparse.Namespace) -> int:
    """Train the built-in model on the user's images; with ``--nproc N`` outside torchrun,
    launch torchrun with N workers that run this same command; under torchrun, train
    data-parallel (rank 0 prints, plots and writes checkpoints)."""
    from . import distributed
    from .train import Interrupted, resolve_device

    if args.nproc is not None and not distributed.launched_by_torchrun():
        status, message = distributed.launch(args.nproc, args.argv)
        if message:
            print(f"pyro-reparam-conv train: error: {message}", file=sys.stderr)
        return status
    device = resolve_device(args.device)
    with distributed.joined("auto", device, args.dist_timeout) as group:
        try:
            return _train_in(args, group, device)
        except (distributed.RankFailedError, Interrupted) as err:
            if not group.distributed or not getattr(err, "agreed", True):
                raise
            # every rank stopped at the same point: the one that reports prints its line
            # before any leaves (torchrun stops the others as soon as one has exited)
            status = _report(err, "train")
            distributed.barrier(group, "the end")
            return status


def _check_layout_options(args: argparse.Namespace, group, device: torch.device) -> None:
    if args.nproc is not None and args.nproc != group.size:
        raise ValueError(
            f"--nproc {args.nproc}, but torchrun started {group.size} processes; give the "
            "same number to both, or leave --nproc out under torchrun"
        )
    if group.size > 1 and device.type == "cuda" and device.index is not None:
        raise ValueError(
            f"--device {device}: with {group.size} processes each one takes cuda:LOCAL_RANK; "
            "pass --device cuda (or auto)"
        )


def _train_in(args: argparse.Namespace, group, device: torch.device) -> int:
    from .distributed import all_or_none
    from .plots import plot_elbo_curves

    checkpoint = args.out / "checkpoint.pt"
    with all_or_none(group, "set-up"):
        _check_layout_options(args, group, device)
        if group.main:
            _prepare_out(args, [checkpoint])
        images = _load_data(args)
        config = _model_config(args, images.shape[1:])
        source = _data_source(args, args.out)
    _, result = _fit(
        args,
        config,
        source,
        images,
        {"y": args.y_estimator, "z": args.z_estimator},
        checkpoint,
        group,
        checkpoint_every=args.checkpoint_every,
        noise_shards=args.noise_shards,
    )
    if not group.main:
        return 0
    record = _run_record(result, checkpoint)
    if record["trained_now"] == 0:
        print(_nothing_trained(checkpoint, result, args.steps, record))
    else:
        plot_elbo_curves({"train": result.losses}, args.out / "elbo.png", num_data=len(images))
    print(_train_summary(result, record))
    return 0


def _train_summary(result, record: dict) -> str:
    """The routes and the step count, time per step and layout of a ``train`` run."""
    lines = list(record.get("described", []))
    layout = ""
    if result.world_size > 1 or result.noise_shards > 1:
        processes = "process" if result.world_size == 1 else "processes"
        layout = f" ({result.world_size} {processes}, {result.noise_shards} noise shards)"
    per_step = record.get("seconds_per_step")
    timing = f"{per_step * 1e3:.1f} ms/step" if per_step is not None else "no timing stored"
    lines.append(
        f"{result.step} steps, {timing} on {record.get('device', result.device)}{layout}; "
        f"checkpoint {result.checkpoint_path}"
    )
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    import pyro

    from .checkpoint import check_writable
    from .train import load_checkpoint, load_params

    out = args.out or args.checkpoint.parent
    check_writable(out)
    state = load_checkpoint(args.checkpoint)
    images = _checkpoint_images(args, args.checkpoint, state)
    pyro.clear_param_store()
    vae = _build_model(state["metadata"])
    load_params(vae.model, vae.guide, args.checkpoint, images[:2])
    shown = args.images if args.images is not None else range(min(8, len(images)))
    paths = _export(
        vae, images, out, args.num_samples, args.seed, state["losses"], shown, not args.no_progress
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------- audit / compare
@contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` while the user's module is imported (as ``python``
    puts the current folder or a script's folder there)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def _import_user_module(option: str, name: str) -> ModuleType:
    """Run ``path/to/file.py`` (registered in ``sys.modules`` under its stem when that name is
    free, so ``dataclasses`` and pickling work) or import ``package.module`` from the current
    folder or ``sys.path``."""
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--{option}: file {name} not found")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
        return module
    try:
        with _on_sys_path(Path.cwd()):
            return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.split(".")[0] != err.name.split(".")[0]:
            raise ValueError(f"--{option}: importing {name} failed: {err}") from err
        raise ValueError(
            f"--{option}: no module {name!r} in the current folder ({Path.cwd()}) or on "
            "sys.path; run from its folder or give path/to/file.py:function"
        ) from err


def _load_callables(specs: Mapping[str, Optional[str]]) -> dict[str, Callable]:
    """``{option: module:function or path/to/file.py:function}`` -> ``{option: function}``.
    Each module is imported (each file run) once, however many options name it, so model,
    guide and inputs share its module-level objects (networks, data)."""
    modules: dict[str, ModuleType] = {}
    found: dict[str, Callable] = {}
    for option, spec in specs.items():
        if spec is None:
            continue
        module_name, sep, attr = spec.rpartition(":")
        if not sep or not module_name or not attr:
            raise ValueError(
                f"--{option} {spec!r}: expected module:function or path/to/file.py:function"
            )
        key = str(Path(module_name).resolve()) if module_name.endswith(".py") else module_name
        if key not in modules:
            modules[key] = _import_user_module(option, module_name)
        try:
            found[option] = getattr(modules[key], attr)
        except AttributeError:
            raise ValueError(f"--{option} {spec!r}: {module_name} has no {attr!r}") from None
    return found


def _split_inputs(inputs: Any) -> tuple[tuple, dict]:
    """What ``--inputs`` returned -> ``(args, kwargs)``."""
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
        return tuple(inputs[0]), dict(inputs[1])
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def _check_call(
    option: str, spec: str, fn: Callable, args: tuple, kwargs: dict, inputs: Optional[str]
) -> None:
    """The user's model/guide must accept the ``--inputs``: say so before running it."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin or C callable)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        given = (
            f"--inputs gave {len(args)} positional and {sorted(kwargs)} keyword arguments"
            if inputs
            else "no --inputs were given"
        )
        raise ValueError(
            f"--{option} {spec} takes {signature} but {given} ({err}); give --inputs "
            "module:function returning its arguments"
        ) from None


def _diagnostic_target(args: argparse.Namespace) -> tuple[Callable, Callable, tuple, dict]:
    """(model, guide, args, kwargs): the user's (``--model/--guide/--inputs``) or the built-in
    (with ``--checkpoint``: its parameters, configuration and data)."""
    import pyro

    if args.model or args.guide or args.inputs:
        if not (args.model and args.guide):
            raise ValueError("give both --model and --guide (and --inputs if they take arguments)")
        specs = {"model": args.model, "guide": args.guide, "inputs": args.inputs}
        fns = _load_callables(specs)
        model_args, model_kwargs = _split_inputs(fns["inputs"]() if args.inputs else ())
        for option in ("model", "guide"):
            _check_call(option, specs[option], fns[option], model_args, model_kwargs, args.inputs)
        return fns["model"], fns["guide"], model_args, model_kwargs
    pyro.clear_param_store()  # the built-in model's parameter names must not meet stale ones
    if args.checkpoint is not None:
        from .train import load_checkpoint, load_params

        state = load_checkpoint(args.checkpoint)
        images = _checkpoint_images(args, args.checkpoint, state)
        batch = images[: min(len(images), 64)]
        vae = _build_model(state["metadata"])
        load_params(vae.model, vae.guide, args.checkpoint, batch[:2])
    else:
        images = _load_data(args)
        batch = images[: min(len(images), 64)]
        vae = _build_model(_model_config(args, images.shape[1:]))
    return vae.model, vae.guide, (batch,), {"num_data": len(images)}


def run_audit(args: argparse.Namespace) -> int:
    import pyro

    from .diagnostics import audit_gradients

    pyro.set_rng_seed(args.seed)
    model, guide, model_args, model_kwargs = _diagnostic_target(args)
    report = audit_gradients(
        model,
        guide,
        *model_args,
        check_bias=args.check_bias,
        num_draws=args.num_draws,
        **model_kwargs,
    )
    print(report)
    return 1 if report.no_gradient or report.unmatched_sites or report.pathwise_bias else 0


def run_compare(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable
    from .diagnostics import compare_estimators
    from .plots import plot_estimator_comparison

    check_writable(args.out)
    model, guide, model_args, model_kwargs = _diagnostic_target(args)
    estimators = tuple(e.strip() for e in args.estimators.split(",") if e.strip())
    frame = compare_estimators(
        model,
        guide,
        *model_args,
        estimators=estimators,
        num_draws=args.num_draws,
        seed=args.seed,
        **model_kwargs,
    )
    frame.to_csv(args.out / "estimator_comparison.csv", index=False)
    plot_estimator_comparison(frame, args.out / "estimator_comparison.png")
    print(_compare_table(frame))
    print("the columns: `pyro-reparam-conv compare --help`")
    print(f"wrote estimator_comparison.csv/.png to {args.out}/")
    return 0


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _compare_table(frame) -> str:
    """``compare``'s table, under 100 characters wide, then each label's routes (a label with
    a ``*`` left some sites on another route: they are named, with the reason)."""
    skipped = frame.attrs.get("skipped") or {}
    star = lambda name: name + ("*" if skipped.get(name) else "")  # noqa: E731
    rows = [
        {
            "estimator": _short(star(row.estimator), 14),
            "param": _short(str(row.param), 24),
            "mean_norm": f"{row.mean_norm:.3g}",
            "variance": f"{row.variance:.3g}",
            "snr": f"{row.snr:.3g}",
            "ms/draw": f"{row.seconds_per_draw * 1e3:.1f}",
            "z_vs_unbiased": f"{row.z_vs_unbiased:.2f}",
            "agrees": "-" if row.agrees is None else str(row.agrees),
        }
        for row in frame.itertuples()
    ]
    lines = [_format_table(rows), "routes:"]
    for name, routes in frame.groupby("estimator", sort=False)["routes"].first().items():
        lines.append(f"  {star(name)}: {routes}")
        lines += [f"    {site} not {name}: {why}" for site, why in skipped.get(name, {}).items()]
    return "\n".join(lines)


COMMANDS = {
    "demo": run_demo,
    "train": run_train,
    "export": run_export,
    "audit": run_audit,
    "compare": run_compare,
}


def _one_line(err: BaseException) -> str:
    """An exception as one line: ``file: reason`` for OS errors, whitespace runs (a message
    spanning lines) joined, very long messages cut."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        message = f"{err.filename}: {err.strerror}"
    else:
        message = str(err) or type(err).__name__
    message = " ".join(message.split())
    return message if len(message) <= 1000 else message[:1000] + " ..."


#: exceptions that are user errors: one line on stderr and exit status 2
_USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _report(err: BaseException, command: str) -> int:
    """Say why a command stopped, in one line on stderr, and return its exit status: 2 for a
    user error, 1 for another error that a rank raised, 128 + signal for SIGINT/SIGTERM
    (with a word on the checkpoint for ``demo``/``train``). Under torchrun the line is said
    once: by the rank that failed (by rank 0 when no single rank did, and for signals); an
    error of one rank alone is said by it, with its rank."""
    from .distributed import RankFailedError

    prog, rank = f"pyro-reparam-conv {command}", _rank()
    if isinstance(err, KeyboardInterrupt):
        signum = int(getattr(err, "signum", signal.SIGINT))
        saved = ""
        if command in ("demo", "train"):
            saved = "; the last completed step is checkpointed, continue with --resume"
        if rank == 0:
            print(f"{prog}: stopped by {signal.Signals(signum).name}{saved}", file=sys.stderr)
        return 128 + signum
    if isinstance(err, RankFailedError):
        if err.rank == rank or (err.rank is None and rank == 0):
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2 if {cls.__name__ for cls in _USER_ERRORS} & set(err.origin) else 1
    who = f"rank {rank}: " if _torchrun_world_size() > 1 else ""
    print(f"{prog}: error: {who}{_one_line(err)}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    from .distributed import RankFailedError

    prog = f"pyro-reparam-conv {args.command}"
    if args.command != "train" and _torchrun_world_size() > 1:
        if _rank() == 0:
            print(
                f"{prog}: error: {args.command} runs in one process; under torchrun run "
                "`train` (or `train --nproc N` without torchrun)",
                file=sys.stderr,
            )
        return 2
    created = _missing_folders(getattr(args, "out", None))
    status = 1
    try:
        status = COMMANDS[args.command](args)
    except (RankFailedError, KeyboardInterrupt, *_USER_ERRORS) as err:
        status = _report(err, args.command)
    finally:
        if status not in (0, None) and not isinstance(status, dict):
            _remove_empty(created)
    return status if isinstance(status, int) else 0


def _missing_folders(folder: Optional[Path]) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    if folder is None:
        return []
    folder = Path(folder).absolute()
    return [p for p in [folder, *folder.parents] if not p.exists()]


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed command created and left empty (deepest first)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or never made): keep it and what is above it
            return


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, one line already printed)
        return int(exit_.code or 0)
    args.argv = argv  # what `train --nproc N` hands to the processes it launches
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
