"""Issue 23 benchmark: `pyro-reparam-conv export` at data-set scale (sizes and times).

Run (about a minute on a 2-core CPU)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_scale.py [--num-samples 200]

Two cases, each trained for 2 steps (the export's cost does not depend on training) with
the CLI's defaults and then exported with the defaults (200 draws of images 0-7 in
``posterior.nc``, every image summarised in ``posterior_summary.nc`` and ``summary.csv``):

- ``demo``: the demo's 1024 embedded 8 x 8 digits;
- ``16x16``: 10,000 random 16 x 16 images (``train --data``).

Prints, per case, the export's wall-clock seconds (the whole command, checkpoint and data
loading included) and the size of every file it wrote. One torch thread; the machine may be
shared, so the times are indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from pyro_reparam_conv.cli import main

FILES = ("posterior_summary.nc", "summary.csv", "posterior.nc", "posterior_z.png")


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def case(name: str, train_argv: list[str], folder: Path, num_samples: int) -> dict:
    out = folder / name
    status = _quiet(["train", *train_argv, "--out", str(out), "--steps", "2", "--no-progress"])
    assert status == 0, f"{name}: train failed ({status})"
    start = time.perf_counter()
    argv = ["export", str(out / "checkpoint.pt"), "--num-samples", str(num_samples)]
    status = _quiet([*argv, "--no-progress"])
    seconds = time.perf_counter() - start
    assert status == 0, f"{name}: export failed ({status})"
    sizes = {f: (out / f).stat().st_size for f in FILES}
    return {"case": name, "seconds": seconds, **sizes, "total": sum(sizes.values())}


def main_(num_samples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = np.random.default_rng(0).random((10_000, 16, 16)).astype(np.float32)
        np.save(folder / "imgs.npy", images)
        rows = [
            case("demo", ["--num-images", "1024"], folder, num_samples),
            case("16x16", ["--data", str(folder / "imgs.npy")], folder, num_samples),
        ]
    mb = lambda n: f"{n / 1e6:.2f}"  # noqa: E731
    print(f"export, {num_samples} draws of images 0-7, every image summarised; one thread")
    print(f"{'case':6}  {'images':>6}  {'seconds':>7}  " + "  ".join(f"{f} MB" for f in FILES)
          + "  total MB")  # fmt: skip
    for row, count in zip(rows, (1024, 10_000)):
        sizes = "  ".join(f"{mb(row[f]):>{len(f) + 3}}" for f in FILES)
        print(f"{row['case']:6}  {count:>6}  {row['seconds']:7.1f}  {sizes}  {mb(row['total']):>8}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=200)
    main_(parser.parse_args().num_samples)
