"""Command line: ``pyro-reparam-conv demo | train | export | audit | compare``.

- ``demo``: the main job. Trains :class:`~pyro_reparam_conv.models.ConvClusterVAE` on the
  embedded digits twice with the same budget, the latent map ``z`` once on the pathwise route
  and once forced onto the score-function route, and writes the comparison (table, ELBO
  curves, reconstructions, posterior plots, ``posterior.nc``, ``summary.csv``).
- ``train`` / ``export``: the same model on the user's ``.npy`` / ``.npz`` images; training
  checkpoints are atomic and ``--resume`` continues exactly; ``export`` turns a checkpoint
  into ArviZ files.
- ``audit`` / ``compare``: gradient diagnostics for the built-in model or for the user's own
  model and guide given as ``module:function`` (or ``path/to/file.py:function``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyro
import torch

__all__ = ["build_parser", "main"]

MODEL_OPTIONS = ("latent_channels", "num_classes", "hidden_channels", "num_downsamples")


# ----------------------------------------------------------------------- arguments
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--latent-channels", type=int, default=4, help="channels of z (default 4)")
    group.add_argument("--num-classes", type=int, default=10, help="clusters of y (default 10)")
    group.add_argument("--hidden-channels", type=int, default=32, help="conv width (default 32)")
    group.add_argument("--num-downsamples", type=int, default=1, help="stride-2 stages (default 1)")


def _add_training_options(parser: argparse.ArgumentParser, steps: int) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=steps, help=f"SVI steps (default {steps})")
    group.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    group.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:k]")
    group.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint(s) in --out"
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_data_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        type=Path,
        required=required,
        help="images as .npy or .npz, shape (N, H, W) or (N, C, H, W); default: embedded digits",
    )
    group.add_argument("--key", help="array name inside a .npz holding several arrays")
    group.add_argument("--num-images", type=int, help="use only the first N images")


def _add_user_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("your own model (instead of the built-in one)")
    group.add_argument("--model", help="module:function (or file.py:function) of a Pyro model")
    group.add_argument("--guide", help="module:function of its guide")
    group.add_argument(
        "--inputs", help="module:function returning the model's args tuple, or (args, kwargs)"
    )
    group.add_argument(
        "--checkpoint", type=Path, help="built-in model: load parameters from a checkpoint"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-reparam-conv",
        description="Pathwise vs score-function gradients in conv latent-variable models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="the main job: pathwise vs score-function training on the digits"
    )
    _add_training_options(demo, steps=600)
    _add_model_options(demo)
    demo.add_argument("--num-images", type=int, default=1024, help="digits used (default 1024)")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    demo.add_argument(
        "--variance-draws",
        type=int,
        default=100,
        help="gradient draws per estimator for the encoder variance (default 100)",
    )
    demo.add_argument(
        "--export-images", type=int, default=64, help="images in posterior.nc (default 64)"
    )
    demo.add_argument("--num-samples", type=int, default=200, help="posterior draws (default 200)")

    train = sub.add_parser("train", help="train the conv model on your images")
    _add_data_options(train)
    _add_training_options(train, steps=1000)
    _add_model_options(train)
    train.add_argument("--z-estimator", choices=("auto", "pathwise", "score"), default="auto")
    train.add_argument("--out", type=Path, default=Path("train_output"), help="output folder")
    train.add_argument("--checkpoint-every", type=int, default=100)

    export = sub.add_parser("export", help="checkpoint -> posterior.nc, summary.csv, plots")
    export.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    _add_data_options(export)
    export.add_argument(
        "--num-samples", type=int, default=200, help="posterior draws (default 200)"
    )
    export.add_argument("--out", type=Path, default=None, help="folder (default: the checkpoint's)")
    export.add_argument("--seed", type=int, default=0)

    audit = sub.add_parser("audit", help="routes per site and parameters without gradient")
    _add_user_model_options(audit)
    _add_model_options(audit)
    _add_data_options(audit)
    audit.add_argument("--seed", type=int, default=0)

    compare = sub.add_parser("compare", help="gradient variance / SNR / cost per estimator")
    _add_user_model_options(compare)
    _add_model_options(compare)
    _add_data_options(compare)
    compare.add_argument(
        "--estimators",
        default="pathwise,score,score+avg,score+loo",
        help="comma-separated (default pathwise,score,score+avg,score+loo)",
    )
    compare.add_argument("--num-draws", type=int, default=200)
    compare.add_argument("--out", type=Path, default=Path("compare_output"))
    compare.add_argument("--seed", type=int, default=0)
    return parser


# ----------------------------------------------------------------------- pieces
def _model_config(args: argparse.Namespace, image_shape: Sequence[int]) -> dict:
    config = {name: getattr(args, name) for name in MODEL_OPTIONS}
    config["image_shape"] = [int(s) for s in image_shape]
    return config


def _build_model(config: dict, z_estimator: str = "auto"):
    from .models import ConvClusterVAE

    z_infer = {} if z_estimator == "auto" else {"estimator": z_estimator}
    options = {name: config[name] for name in MODEL_OPTIONS}
    return ConvClusterVAE(tuple(config["image_shape"]), z_infer=z_infer, **options)


def _load_data(args: argparse.Namespace) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    from .data import load_default_images, load_images

    if getattr(args, "data", None) is None:
        return load_default_images(getattr(args, "num_images", None))
    images = load_images(args.data, args.key)
    if args.num_images is not None:
        images = images[: args.num_images]
    return images, None


def _most_informed(z, count: int = 4):
    """The ``count`` elements of the first image's ``z`` with the smallest posterior sd (the
    ones the data informs most; others may sit at the prior), as a Dataset for ArviZ."""
    first = z.isel({z.dims[2]: 0}).stack(element=list(z.dims[3:]))
    chosen = first.std(("chain", "draw")).argsort().values[:count]
    picked = first.isel(element=chosen)
    labels = [f"z[0, {', '.join(map(str, index))}]" for index in picked["element"].values]
    picked = picked.drop_vars(["element", *z.dims[3:]]).assign_coords(element=labels)
    return picked.to_dataset(name="z")


def _export(
    model,
    guide,
    images: torch.Tensor,
    out: Path,
    num_samples: int,
    seed: int,
    losses: Optional[Sequence[float]] = None,
) -> dict[str, Path]:
    """posterior.nc, summary.csv and an ArviZ posterior plot of the best-informed z elements."""
    from .inference_data import quiet_arviz, to_inference_data
    from .plots import save_figure

    idata = to_inference_data(
        model, guide, images, num_samples=num_samples, seed=seed, elbo_trace=losses
    )
    with quiet_arviz() as az:
        paths = {"posterior.nc": out / "posterior.nc", "summary.csv": out / "summary.csv"}
        idata.to_netcdf(str(paths["posterior.nc"]))
        az.summary(idata, var_names=["y", "z"]).to_csv(paths["summary.csv"])
        axes = az.plot_posterior(_most_informed(idata.posterior["z"]))
        paths["posterior_z.png"] = save_figure(axes.ravel()[0].figure, out / "posterior_z.png")
    return paths


# ----------------------------------------------------------------------- demo
def _fit(args, config: dict, images: torch.Tensor, z_estimator: str, checkpoint: Path, **options):
    """A fresh ConvClusterVAE trained with RoutedELBO from the command-line options;
    returns ``(vae, TrainResult)`` (the ELBO, with its routes, is ``result.elbo``)."""
    from .elbo import RoutedELBO
    from .train import train

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = _build_model(config, z_estimator)
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
        progress=not args.no_progress,
        metadata=config,
        **options,
    )
    return vae, result


@torch.no_grad()
def _evaluate_elbo(vae, images: torch.Tensor, seed: int, num_particles: int = 8) -> float:
    """ELBO per image on ``images``: a Monte Carlo estimate with ``Trace_ELBO`` (same for both runs)."""
    pyro.set_rng_seed(seed)
    elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)
    return -elbo.loss(vae.model, vae.guide, images) / len(images)


def _encoder_variance(vae, batch: torch.Tensor, num_data: int, draws: int, seed: int):
    """Total per-draw gradient variance of the encoder (body and z head) per estimator."""
    from .diagnostics import compare_estimators

    frame = compare_estimators(
        vae.model,
        vae.guide,
        batch,
        num_data=num_data,
        estimators=("pathwise", "score"),
        num_draws=draws,
        seed=seed,
    )
    # PyroModule names submodule parameters "encoder$$$0.0.weight" in the param store.
    names = frame["param"].str.replace("$$$", ".", regex=False)
    encoder = frame[names.str.startswith(("encoder.", "z_head."))]
    return frame, encoder.groupby("estimator")["variance"].sum().to_dict()


def _format_table(rows: list[dict]) -> str:
    headers = list(rows[0])
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def run_demo(args: argparse.Namespace) -> dict:
    """Train pathwise vs score, compare, plot and export; returns the results as data."""
    from .data import load_default_images
    from .plots import (
        plot_elbo_curves,
        plot_estimator_comparison,
        plot_posterior,
        plot_reconstructions,
    )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_default_images(args.num_images, seed=args.seed)
    config = _model_config(args, images.shape[1:])
    shown = images[:10]
    runs, reconstructions, variance = {}, {}, {}
    for route in ("pathwise", "score"):
        vae, result = _fit(
            args, config, images, route, out / f"checkpoint_{route}.pt", desc=f"z {route}"
        )
        device = result.device
        vae.eval()
        with torch.no_grad():
            reconstructions[f"z {route}"] = vae.reconstruct(shown.to(device)).cpu().numpy()
        runs[route] = {
            "result": result,
            "elbo": _evaluate_elbo(vae, images.to(device), args.seed),
            "routes": {name: r.estimator for name, r in result.elbo.routes.items()},
        }
        if route == "pathwise":
            batch = images[: args.batch_size].to(device)
            frame, variance = _encoder_variance(
                vae, batch, len(images), args.variance_draws, args.seed
            )
            frame.to_csv(out / "estimator_comparison.csv", index=False)
            plot_estimator_comparison(frame, out / "estimator_comparison.png")
            with torch.no_grad():
                y_logits, z_mean, z_var = vae.encode(images.to(device))
            plot_posterior(
                y_logits.softmax(-1).cpu().numpy(),
                labels.numpy(),
                z_mean.cpu().numpy(),
                z_var.sqrt().cpu().numpy(),
                out / "posterior.png",
                title="q(y, z | x) after pathwise training",
            )
            exported = _export(
                vae.model,
                vae.guide,
                images[: args.export_images].to(device),
                out,
                args.num_samples,
                args.seed,
                result.losses,
            )
    plot_elbo_curves(
        {f"z {r}": runs[r]["result"].losses for r in runs},
        out / "elbo_curves.png",
        num_data=len(images),
    )
    plot_reconstructions(shown.numpy(), reconstructions, out / "reconstructions.png")

    rows = []
    for route, run in runs.items():
        result = run["result"]
        rows.append(
            {
                "z route": route,
                "ELBO/image": f"{run['elbo']:.3f}",
                "encoder grad var": f"{variance.get(route, float('nan')):.3g}",
                "s/step": f"{result.seconds_per_step:.4f}",
                "routes": ", ".join(f"{k}:{v}" for k, v in sorted(run["routes"].items())),
                "steps": str(result.step),
            }
        )
    table = _format_table(rows)
    ratio = variance.get("score", float("nan")) / variance.get("pathwise", float("nan"))
    report = (
        f"{len(images)} digits, {args.steps} steps of batch {args.batch_size}, seed {args.seed}, "
        f"device {runs['pathwise']['result'].device}\n{table}\n"
        f"ELBO/image: Trace_ELBO, 8 particles, all {len(images)} images. Encoder gradient "
        f"variance: {args.variance_draws} single-particle draws per estimator at the pathwise "
        f"run's final parameters; score/pathwise = {ratio:.3g}x."
    )
    (out / "results.txt").write_text(report + "\n")
    summary = {
        route: {
            "elbo_per_image": run["elbo"],
            "encoder_grad_variance": variance.get(route),
            "seconds_per_step": run["result"].seconds_per_step,
            "routes": run["routes"],
        }
        for route, run in runs.items()
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}/")
    return {"summary": summary, "files": exported}


# ----------------------------------------------------------------------- train / export
def run_train(args: argparse.Namespace) -> int:
    from .plots import plot_elbo_curves

    images, _ = _load_data(args)
    config = _model_config(args, images.shape[1:])
    config["data"] = str(args.data) if args.data else None
    config["key"] = args.key
    _, result = _fit(
        args,
        config,
        images,
        args.z_estimator,
        args.out / "checkpoint.pt",
        checkpoint_every=args.checkpoint_every,
    )
    plot_elbo_curves({"train": result.losses}, args.out / "elbo.png", num_data=len(images))
    for route in result.elbo.routes.values():
        print(route)
    print(
        f"{result.step} steps, {result.seconds_per_step * 1e3:.1f} ms/step on {result.device}; "
        f"checkpoint {result.checkpoint_path}"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .train import load_checkpoint, load_params

    state = load_checkpoint(args.checkpoint)
    config = state["metadata"]
    if args.data is None and config.get("data"):
        args.data, args.key = Path(config["data"]), config.get("key")
    images, _ = _load_data(args)
    if list(images.shape[1:]) != list(config["image_shape"]):
        raise ValueError(
            f"--data images have shape {tuple(images.shape[1:])}, but {args.checkpoint} was "
            f"trained on {tuple(config['image_shape'])}"
        )
    pyro.clear_param_store()
    vae = _build_model(config)
    load_params(vae.model, vae.guide, args.checkpoint, images[:2])
    out = args.out or args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = _export(vae.model, vae.guide, images, out, args.num_samples, args.seed, state["losses"])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------- audit / compare
def _load_callable(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise ValueError(f"{spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{spec!r}: {module_name} has no attribute {attr!r}") from None


def _diagnostic_target(args: argparse.Namespace) -> tuple[Callable, Callable, tuple, dict]:
    """(model, guide, args, kwargs): the user's (``--model/--guide/--inputs``) or the built-in."""
    user = [args.model, args.guide]
    if any(user):
        if not all(user):
            raise ValueError("give both --model and --guide (and --inputs if they take arguments)")
        inputs: Any = _load_callable(args.inputs)() if args.inputs else ()
        if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
            model_args, model_kwargs = inputs
        else:
            model_args, model_kwargs = (
                tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,),
                {},
            )
        return (
            _load_callable(args.model),
            _load_callable(args.guide),
            tuple(model_args),
            model_kwargs,
        )
    images, _ = _load_data(args)
    batch = images[: min(len(images), 64)]
    pyro.clear_param_store()  # the built-in model's parameter names must not meet stale ones
    if args.checkpoint is not None:
        from .train import load_checkpoint, load_params

        config = load_checkpoint(args.checkpoint)["metadata"]
        vae = _build_model(config)
        load_params(vae.model, vae.guide, args.checkpoint, batch[:2])
    else:
        vae = _build_model(_model_config(args, images.shape[1:]))
    return vae.model, vae.guide, (batch,), {"num_data": len(images)}


def run_audit(args: argparse.Namespace) -> int:
    from .diagnostics import audit_gradients

    pyro.set_rng_seed(args.seed)
    model, guide, model_args, model_kwargs = _diagnostic_target(args)
    report = audit_gradients(model, guide, *model_args, **model_kwargs)
    print(report)
    return 1 if report.no_gradient else 0


def run_compare(args: argparse.Namespace) -> int:
    from .diagnostics import compare_estimators
    from .plots import plot_estimator_comparison

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
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "estimator_comparison.csv", index=False)
    plot_estimator_comparison(frame, args.out / "estimator_comparison.png")
    print(frame.to_string(index=False))
    for estimator, skipped in (frame.attrs.get("skipped") or {}).items():
        if skipped:
            print(f"{estimator}: skipped {skipped}")
    print(f"wrote estimator_comparison.csv/.png to {args.out}/")
    return 0


COMMANDS = {
    "demo": run_demo,
    "train": run_train,
    "export": run_export,
    "audit": run_audit,
    "compare": run_compare,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"pyro-reparam-conv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"pyro-reparam-conv {args.command}: interrupted; the last completed step is "
            "checkpointed, continue with --resume",
            file=sys.stderr,
        )
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
