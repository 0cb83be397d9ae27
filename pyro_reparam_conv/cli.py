"""Command line: ``pyro-reparam-conv demo | train | export | audit | compare``.

- ``demo``: the main job (:mod:`pyro_reparam_conv.demo`, rendered by
  :mod:`pyro_reparam_conv.report`). Trains :class:`~pyro_reparam_conv.models.ConvClusterVAE` on
  the embedded digits with the same budget on each of ``demo.DEMO_RUNS`` (the default routes;
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
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

# torch and Pyro are imported by the commands, not here: `--help` and usage errors stay fast.
__all__ = ["build_parser", "main"]

#: ``distributed.DEFAULT_TIMEOUT`` and the variables torchrun sets for its workers, repeated
#: here so that parsing imports no torch (tests/test_cli_help.py checks they agree)
DEFAULT_TIMEOUT = 300.0
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_THREADS = 1


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


def _demo_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
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


def _train_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
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
    _add_parallel_options(train)


def _add_parallel_options(train: argparse.ArgumentParser) -> None:
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


def _export_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
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


def _audit_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    audit = command("audit", "routes per site, parameters without gradient, unmatched sites")
    _add_user_model_options(audit)
    _add_model_options(audit)
    _add_data_options(audit)
    audit.add_argument("--seed", type=int, default=0, help="seed of the audit's draws (default 0)")
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


def _compare_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
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


#: one function per command, adding its parser
_SUBPARSERS = (_demo_parser, _train_parser, _export_parser, _audit_parser, _compare_parser)


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

    for add in _SUBPARSERS:
        add(command)
    return parser


# ----------------------------------------------------------------------- dispatch
def run_demo(args: argparse.Namespace) -> int:
    """The demo (:func:`pyro_reparam_conv.demo.run_demo`), its table printed and written
    (:mod:`pyro_reparam_conv.report`)."""
    from .demo import DemoOptions, run_demo
    from .report import write_demo_results, written_files

    result = run_demo(DemoOptions.from_args(args))
    print(write_demo_results(result))
    print(written_files(args.out))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Train the built-in model on the user's images; with ``--nproc N`` outside torchrun,
    launch torchrun with N workers that run this same command; under torchrun, train
    data-parallel (rank 0 prints, plots and writes checkpoints)."""
    from . import distributed
    from .commands import train_in
    from .train import Interrupted, resolve_device

    if args.nproc is not None and not distributed.launched_by_torchrun():
        status, message = distributed.launch(args.nproc, args.argv)
        if message:
            print(f"pyro-reparam-conv train: error: {message}", file=sys.stderr)
        return status
    device = resolve_device(args.device)
    with distributed.joined("auto", device, args.dist_timeout) as group:
        try:
            return train_in(args, group, device)
        except (distributed.RankFailedError, Interrupted) as err:
            if not group.distributed or not getattr(err, "agreed", True):
                raise
            # every rank stopped at the same point: the one that reports prints its line
            # before any leaves (torchrun stops the others as soon as one has exited)
            status = _report(err, "train")
            distributed.barrier(group, "the end")
            return status


def _in_commands(name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of :mod:`pyro_reparam_conv.commands`, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(".commands", __package__), name)(args)

    return run


COMMANDS = {
    "demo": run_demo,
    "train": run_train,
    "export": _in_commands("run_export"),
    "audit": _in_commands("run_audit"),
    "compare": _in_commands("run_compare"),
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
        if status not in (0, None):
            _remove_empty(created)
    return status or 0


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
