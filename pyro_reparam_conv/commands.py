"""The commands ``train`` (in one process of a group), ``export``, ``audit`` and ``compare``:
what each does once its options are parsed (``cli`` parses, dispatches and reports errors;
``demo`` is :mod:`pyro_reparam_conv.demo`).

``audit`` / ``compare`` run on the built-in model (or a checkpoint of it) or on the user's own
model and guide given as ``module:function`` (or ``path/to/file.py:function``): that imports
and runs the user's code, each module once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

from .report import compare_table, train_summary
from .runs import (
    FitOptions,
    build_model,
    checkpoint_images,
    data_source,
    export,
    fit,
    load_data,
    model_config,
    nothing_trained,
    prepare_out,
    run_record,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["run_audit", "run_compare", "run_export", "train_in"]


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


def train_in(args: argparse.Namespace, group, device: torch.device) -> int:
    from .distributed import all_or_none
    from .models import ConvClusterVAE
    from .plots import plot_elbo_curves

    options = FitOptions.from_args(args)
    checkpoint = args.out / "checkpoint.pt"
    with all_or_none(group, "set-up"):
        _check_layout_options(args, group, device)
        if group.main:
            prepare_out(args.out, [checkpoint], options)
        images = load_data(args)
        config = model_config(vars(args), images.shape[1:])
        source = data_source(args, args.out)
    _, result = fit(
        options,
        config,
        source,
        images,
        {site: getattr(args, f"{site}_estimator") for site in ConvClusterVAE.SITES},
        checkpoint,
        group,
        checkpoint_every=args.checkpoint_every,
        noise_shards=args.noise_shards,
    )
    if not group.main:
        return 0
    record = run_record(result, checkpoint)
    if record["trained_now"] == 0:
        print(nothing_trained(checkpoint, result, args.steps, record))
    else:
        plot_elbo_curves({"train": result.losses}, args.out / "elbo.png", num_data=len(images))
    print(train_summary(result, record))
    return 0


def run_export(args: argparse.Namespace) -> int:
    import pyro

    from .checkpoint import check_writable
    from .train import load_checkpoint, load_params

    out = args.out or args.checkpoint.parent
    check_writable(out)
    state = load_checkpoint(args.checkpoint)
    images = checkpoint_images(args, args.checkpoint, state)
    pyro.clear_param_store()
    vae = build_model(state["metadata"])
    load_params(vae.model, vae.guide, args.checkpoint, images[:2])
    shown = args.images if args.images is not None else range(min(8, len(images)))
    paths = export(
        vae, images, out, args.num_samples, args.seed, state["losses"], shown, not args.no_progress
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


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
        images = checkpoint_images(args, args.checkpoint, state)
        batch = images[: min(len(images), 64)]
        vae = build_model(state["metadata"])
        load_params(vae.model, vae.guide, args.checkpoint, batch[:2])
    else:
        images = load_data(args)
        batch = images[: min(len(images), 64)]
        vae = build_model(model_config(vars(args), images.shape[1:]))
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
    print(compare_table(frame))
    print("the columns: `pyro-reparam-conv compare --help`")
    print(f"wrote estimator_comparison.csv/.png to {args.out}/")
    return 0
