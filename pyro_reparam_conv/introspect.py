"""What a model/guide pair is made of: the ``nn.Module`` objects behind the callables and the
plate nesting depth of their traces. Shared by training, diagnostics and the ArviZ export."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from pyro.poutine import Trace

__all__ = ["max_plate_nesting", "modules_behind"]


def modules_behind(*fns: Any) -> list[torch.nn.Module]:
    """The distinct ``nn.Module`` objects that model/guide callables run: a callable that is a
    module, the object of a bound method, and the same through ``functools.partial``."""
    found: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(fn: Any) -> None:
        if fn is None or id(fn) in seen:
            return
        seen.add(id(fn))
        if isinstance(fn, torch.nn.Module):
            found.append(fn)
            return
        visit(getattr(fn, "__self__", None))
        if isinstance(fn, partial):
            visit(fn.func)
            for arg in fn.args:
                if callable(arg):
                    visit(arg)

    for fn in fns:
        visit(fn)
    return found


def max_plate_nesting(*traces: Trace) -> int:
    """How many batch dims the vectorized plates of ``traces`` use (0 without plates)."""
    dims = [
        -frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)
