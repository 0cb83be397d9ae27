"""The built-in model's runs, shared by the commands and the demo: where the images come from
(recorded in checkpoints so that ``export`` and ``audit --checkpoint`` find them from any
folder), the model of a configuration, one training run with :class:`RoutedELBO`, its
record file (``results.json``), and the export of a trained model to files.

torch and Pyro are imported inside the functions: the command line imports this module only
inside its commands.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MODEL_OPTIONS",
    "FitOptions",
    "build_model",
    "checkpoint_images",
    "data_source",
    "export",
    "fit",
    "load_data",
    "model_config",
    "nothing_trained",
    "prepare_out",
    "record_path",
    "run_record",
    "write_json",
]

#: the options of :class:`~pyro_reparam_conv.models.ConvClusterVAE` a configuration records
MODEL_OPTIONS = ("latent_channels", "num_classes", "hidden_channels", "num_downsamples")


@dataclass(frozen=True)
class FitOptions:
    """How one run trains (the command line's training options)."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    device: str
    resume: bool
    overwrite: bool
    allow_changed: tuple = ()
    progress: bool = True

    @classmethod
    def from_args(cls, args: Any) -> "FitOptions":
        """From parsed options (``--no-progress`` is ``progress=False``)."""
        names = ("steps", "batch_size", "lr", "seed", "device", "resume", "overwrite")
        return cls(
            **{name: getattr(args, name) for name in names},
            allow_changed=tuple(args.allow_changed),
            progress=not args.no_progress,
        )


def model_config(options: Mapping[str, Any], image_shape: Sequence[int]) -> dict:
    """The model configuration: :data:`MODEL_OPTIONS` (from ``options``, e.g. the parsed
    command line's ``vars``) and the images' shape."""
    config = {name: options[name] for name in MODEL_OPTIONS}
    config["image_shape"] = [int(s) for s in image_shape]
    return config


def build_model(config: Mapping, routes: Mapping[str, str] = {}):
    """The model of ``config``; ``routes`` maps its sites (``ConvClusterVAE.SITES``) to an
    estimator (or "auto")."""
    from .models import ConvClusterVAE

    infer = {
        f"{site}_infer": {} if routes.get(site, "auto") == "auto" else {"estimator": routes[site]}
        for site in ConvClusterVAE.SITES
    }
    options = {name: config[name] for name in MODEL_OPTIONS}
    return ConvClusterVAE(tuple(config["image_shape"]), **infer, **options)


def data_source(args: Any, out: Optional[Path] = None) -> dict:
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


def load_data(args: Any) -> torch.Tensor:
    """The images of ``--data`` (or the embedded digits); a missing file is named as given."""
    data = getattr(args, "data", None)
    if data is not None and not Path(data).is_file():
        what = "is a folder, not a file" if Path(data).is_dir() else "no such file"
        raise ValueError(f"--data {data}: {what}")
    return _images_from(data_source(args))


def checkpoint_images(args: Any, checkpoint: Path, state: dict) -> torch.Tensor:
    """``--data`` when given; else the images ``checkpoint`` was trained on, checked against
    its data fingerprint (``--num-images`` then keeps the first N of them)."""
    from .checkpoint import data_fingerprint

    if args.data is not None:
        images = load_data(args)
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


def export(
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


def prepare_out(out: Path, checkpoints: Sequence[Path], options: FitOptions) -> None:
    """Before any work (:meth:`~pyro_reparam_conv.train.Checkpointer.check_start`): refuse to
    replace existing checkpoints without ``--overwrite`` (or ``--resume``), refuse
    ``--resume`` with none to continue, and make sure ``--out`` can be written."""
    from .train import Checkpointer

    names = ", ".join(path.name for path in checkpoints)
    Checkpointer.check_start(
        checkpoints,
        resume=options.resume,
        overwrite=options.overwrite,
        how="continue it with --resume, or pass --overwrite to replace it (or use another --out)",
        folder=out,
        missing=f"--resume: no checkpoint to continue in {out} (looked for {names}); leave "
        "out --resume to start afresh, or give the --out of the run to continue",
    )


def fit(
    options: FitOptions,
    config: dict,
    source: dict,
    images,
    routes: Mapping[str, str],
    checkpoint: Path,
    group: Any = None,
    **more: Any,
):
    """A fresh ConvClusterVAE trained with RoutedELBO as ``options`` say (``more``: other
    arguments of :func:`~pyro_reparam_conv.train.train`);
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
    if options.resume and not checkpoint.exists() and group.main:
        print(f"{checkpoint}: no checkpoint yet, starting at step 0")
    pyro.clear_param_store()
    pyro.set_rng_seed(options.seed)
    vae = build_model(config, routes)
    result = train(
        vae.model,
        vae.guide,
        images,
        steps=options.steps,
        batch_size=options.batch_size,
        lr=options.lr,
        elbo=RoutedELBO(),
        device=options.device,
        seed=options.seed,
        checkpoint_path=checkpoint,
        resume=options.resume,
        overwrite=options.overwrite,
        allow_changed=options.allow_changed,
        settings={f"{site}_estimator": route for site, route in routes.items()} | config,
        progress=options.progress,
        metadata={**config, **source},
        process_group=group,
        **more,
    )
    if result.start_step and result.step > result.start_step and group.main:
        changes = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in result.changed.items())
        print(
            f"{checkpoint}: resumed at step {result.start_step}"
            + (f" with accepted changes: {changes}" if changes else "")
        )
    return vae, result


def record_path(checkpoint: Path) -> Path:
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


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def run_record(result, checkpoint: Path) -> dict:
    """This run's routes and timing. A call that trained steps writes them to the run's own
    results file (:func:`record_path`); a resume that had nothing left to train reads them
    back (``trained_now`` 0), so a rerun never replaces them with empty ones."""
    import torch

    path = record_path(checkpoint)
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
        "costs": {site: str(r.costs) for site, r in result.elbo.routes.items() if r.costs},
        "described": [str(r) for r in result.elbo.routes.values()],
    }
    if trained > 0:
        write_json(path, record)
    return record


def nothing_trained(checkpoint: Path, result, steps: int, record: dict) -> str:
    """What a resume that had nothing left to train says."""
    stored = (
        " (results as stored by the run that trained it)"
        if record.get("routes")
        else f" (no {record_path(checkpoint).name} stored with it: no routes or timing to show)"
    )
    return (
        f"{checkpoint}: already at step {result.start_step} (--steps {steps}): nothing "
        f"trained; pass a larger --steps to continue it{stored}"
    )
