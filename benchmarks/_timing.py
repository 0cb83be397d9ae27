"""Small timing and table helpers shared by the benchmark scripts (no extra dependencies)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels so wall-clock time covers the work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each function; ``warmup`` untimed calls each, then ``repeats`` rounds.

    Rounds are interleaved (one call of every function per round) so that drift in machine
    load or clock speed hits every function alike. Use :func:`median` on the result.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def environment(device: torch.device | str) -> list[str]:
    """Lines describing the machine and library versions, for the top of a benchmark's output."""
    import pyro

    lines = [
        f"python {platform.python_version()} | torch {torch.__version__} | pyro {pyro.__version__}",
        f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()} "
        f"| cpu cores: {os.cpu_count()} | torch threads: {torch.get_num_threads()}".replace(
            "  ", " "
        ),
    ]
    if torch.device(device).type == "cuda":
        lines.append(f"device: cuda ({torch.cuda.get_device_name()})")
    else:
        lines.append("device: cpu")
    return lines


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
