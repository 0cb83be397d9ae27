"""The demo, the command line's main job, as a function that returns records.

:func:`run_demo` trains :class:`~pyro_reparam_conv.models.ConvClusterVAE` on the embedded
digits with the same budget on each of :data:`DEMO_RUNS` (the default routes, then each of the
model's latent sites forced onto the score function), measures each run (ELBO per image, NMI
of ``q(y | x)`` to the digit labels, encoder gradient variance, time per step), writes the
figures, the estimator comparison and the export of the default run, and returns a frozen
:class:`DemoResult`. It prints no table: :mod:`pyro_reparam_conv.report` renders the result
(the terminal table, ``results.txt``, ``results.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from .models import ConvClusterVAE
from .runs import (
    MODEL_OPTIONS,
    FitOptions,
    export,
    fit,
    model_config,
    nothing_trained,
    prepare_out,
    run_record,
)

__all__ = ["DEMO_RUNS", "DemoOptions", "DemoResult", "DemoRun", "demo_runs", "run_demo"]


def demo_runs(sites: tuple = ConvClusterVAE.SITES) -> dict[str, dict[str, str]]:
    """The demo's runs: name -> the estimator of each site ("auto": the automatic route):
    ``default``, then ``<site>_score`` for each site, that site on the score function."""
    auto = {site: "auto" for site in sites}
    return {"default": auto, **{f"{site}_score": {**auto, site: "score"} for site in sites}}


#: the demo's runs: ``default``, ``y_score``, ``z_score``
DEMO_RUNS = demo_runs()


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs: the training of each run, the model, the data and the measures."""

    out: Path
    fit: FitOptions
    model: Mapping[str, int]
    num_images: int = 1024
    variance_draws: int = 100
    export_images: int = 8
    num_samples: int = 200

    @classmethod
    def from_args(cls, args: Any) -> "DemoOptions":
        """From the parsed ``demo`` options."""
        return cls(
            out=Path(args.out),
            fit=FitOptions.from_args(args),
            model={name: getattr(args, name) for name in MODEL_OPTIONS},
            num_images=args.num_images,
            variance_draws=args.variance_draws,
            export_images=args.export_images,
            num_samples=args.num_samples,
        )


@dataclass(frozen=True)
class DemoRun:
    """One run's results: its routes (and why), what it scored and what it cost."""

    name: str
    routes: Mapping[str, str]
    reasons: Mapping[str, str]
    elbo_per_image: float
    nmi: float
    #: encoder gradient variance of this run's routes at the default run's parameters
    encoder_grad_variance: Optional[float]
    seconds_per_step: Optional[float]
    threads: int
    steps: int
    losses: tuple = ()
    #: steps this call trained (0: a resume with nothing left to train)
    trained_now: int = 0
    #: per score-function map site, its cost level and why (a route's ``CostLevel``)
    costs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoResult:
    """Every run's record, the set-up they share and the files written."""

    options: DemoOptions
    runs: tuple[DemoRun, ...]
    num_images: int
    device: str
    threads: int
    #: the export of the default run: name -> path
    files: Mapping[str, Path] = field(default_factory=dict)

    @property
    def by_name(self) -> dict[str, DemoRun]:
        return {run.name: run for run in self.runs}


@dataclass(frozen=True)
class _Data:
    """The digits, their labels, where they come from, and the model configuration."""

    images: torch.Tensor
    labels: torch.Tensor
    source: dict
    config: dict

    @property
    def shown(self) -> torch.Tensor:
        """The images whose reconstructions are plotted."""
        return self.images[:10]


def _checkpoint(out: Path, name: str) -> Path:
    return out / f"checkpoint_{name}.pt"


def _evaluate_elbo(vae, images: torch.Tensor, seed: int, num_particles: int = 8) -> float:
    """ELBO per image on ``images``: a Monte Carlo estimate with ``Trace_ELBO`` (the same
    estimator for every run, whatever its training routes)."""
    import pyro

    pyro.set_rng_seed(seed)
    elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)
    with torch.no_grad():
        return -elbo.loss(vae.model, vae.guide, images) / len(images)


def _encoder_variance(vae, batch: torch.Tensor, num_data: int, draws: int, seed: int):
    """Total per-draw gradient variance of the encoder (the model's ``ENCODER_PREFIXES``) for
    each demo run's routes, all at ``vae``'s parameters (RoutedELBO as in training)."""
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
    encoder = frame[frame["param"].str.startswith(type(vae).ENCODER_PREFIXES)]
    return frame, encoder.groupby("estimator")["variance"].sum().to_dict()


@dataclass(frozen=True)
class _Trained:
    """One run just trained: the model, :func:`~pyro_reparam_conv.train.train`'s result, the
    run's record (``results_<name>.json``), its ELBO per image and NMI, its reconstructions
    of the shown images and ``q(y, z | x)`` of every image (``y_logits, z_mean, z_var``)."""

    vae: Any
    result: Any
    record: dict
    elbo: float
    nmi: float
    reconstruction: Any
    encoded: tuple


def _train_run(options: DemoOptions, data: _Data, name: str, say: Callable) -> _Trained:
    """Train run ``name`` and measure it."""
    from .metrics import normalized_mutual_information

    checkpoint = _checkpoint(options.out, name)
    routes = DEMO_RUNS[name]
    vae, result = fit(options.fit, data.config, data.source, data.images, routes, checkpoint,
                      desc=name)  # fmt: skip
    images = data.images.to(result.device)
    vae.eval()
    with torch.no_grad():
        reconstruction = vae.reconstruct(data.shown.to(result.device)).cpu().numpy()
        y_logits, z_mean, z_var = vae.encode(images)
    record = run_record(result, checkpoint)
    if record["trained_now"] == 0:
        say(nothing_trained(checkpoint, result, options.fit.steps, record))
    return _Trained(
        vae=vae,
        result=result,
        record=record,
        elbo=_evaluate_elbo(vae, images, options.fit.seed),
        nmi=normalized_mutual_information(y_logits.argmax(-1).cpu(), data.labels),
        reconstruction=reconstruction,
        encoded=(y_logits, z_mean, z_var),
    )


def _inspect_default(options: DemoOptions, data: _Data, run: _Trained) -> tuple:
    """While the default run's parameters are the param store's: the encoder gradient
    variance of every run's routes, the posterior plot and the export; returns ``(frame,
    variance per run, exported files)``."""
    from .plots import plot_posterior

    vae, (y_logits, z_mean, z_var) = run.vae, run.encoded
    device, seed = run.result.device, options.fit.seed
    batch = data.images[: options.fit.batch_size].to(device)
    frame, variance = _encoder_variance(vae, batch, len(data.images), options.variance_draws, seed)
    plot_posterior(
        y_logits.softmax(-1).cpu().numpy(),
        data.labels.numpy(),
        z_mean.cpu().numpy(),
        z_var.sqrt().cpu().numpy(),
        options.out / "posterior.png",
        title="q(y, z | x) after training with the default routes",
    )
    shown = range(min(options.export_images, len(data.images)))
    exported = export(vae, data.images.to(device), options.out, options.num_samples, seed,
                      run.result.losses, shown=shown, progress=options.fit.progress)  # fmt: skip
    return frame, variance, exported


def _plot(options: DemoOptions, data: _Data, frame, trained: Mapping[str, _Trained]) -> None:
    """The estimator comparison (``.csv``/``.png``), the ELBO curves and reconstructions."""
    from .plots import plot_elbo_curves, plot_estimator_comparison, plot_reconstructions

    out = options.out
    frame.to_csv(out / "estimator_comparison.csv", index=False)
    plot_estimator_comparison(frame, out / "estimator_comparison.png")
    curves = {name: run.result.losses for name, run in trained.items()}
    plot_elbo_curves(curves, out / "elbo_curves.png", num_data=len(data.images))
    reconstructions = {name: run.reconstruction for name, run in trained.items()}
    plot_reconstructions(data.shown.numpy(), reconstructions, out / "reconstructions.png")


def _record(name: str, run: _Trained, variance: Mapping[str, float]) -> DemoRun:
    record, result = run.record, run.result
    return DemoRun(
        name=name,
        routes=dict(record["routes"]),
        reasons=dict(record["reasons"]),
        costs=dict(record.get("costs", {})),
        elbo_per_image=run.elbo,
        nmi=run.nmi,
        encoder_grad_variance=variance.get(name),
        seconds_per_step=record.get("seconds_per_step"),
        threads=record.get("threads", torch.get_num_threads()),
        steps=result.step,
        losses=tuple(result.losses),
        trained_now=record["trained_now"],
    )


def _load(options: DemoOptions) -> _Data:
    from .data import load_default_images

    seed = options.fit.seed
    images, labels = load_default_images(options.num_images, seed=seed)
    source = {"data": None, "num_images": options.num_images, "shuffle_seed": seed}
    config = model_config(options.model, images.shape[1:])
    return _Data(images, labels, source, config)


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> DemoResult:
    """Train each of :data:`DEMO_RUNS`, compare, plot and export; ``say`` gets the notes on
    the way (a resume with nothing left to train). Returns the results as records."""
    prepare_out(options.out, [_checkpoint(options.out, name) for name in DEMO_RUNS], options.fit)
    data = _load(options)
    trained: dict[str, _Trained] = {}
    for name in DEMO_RUNS:
        trained[name] = _train_run(options, data, name, say)
        if name == "default":  # while its parameters are the param store's
            frame, variance, exported = _inspect_default(options, data, trained[name])
    _plot(options, data, frame, trained)
    runs = tuple(_record(name, trained[name], variance) for name in DEMO_RUNS)
    return DemoResult(
        options=options,
        runs=runs,
        num_images=len(data.images),
        device=str(trained["default"].result.device),
        threads=torch.get_num_threads(),
        files=exported,
    )
