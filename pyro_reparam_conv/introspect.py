"""What a model/guide pair is made of: the ``nn.Module`` objects behind the callables, the
plate nesting depth of their traces, a NaN-tolerant probe trace of both, the sample sites
that do not match between them, and the display names of their parameters. Shared by
training, diagnostics, plots and the ArviZ export."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from .sampling import validation_enabled

__all__ = [
    "display_name",
    "max_plate_nesting",
    "modules_behind",
    "probe_traces",
    "unmatched_sites",
]


def display_name(name: str) -> str:
    """A parameter's name as a user reads it: PyroModule stores submodule parameters as
    ``"encoder$$$0.0.weight"`` in the param store; this gives ``"encoder.0.0.weight"`` (the
    ``nn.Module.named_parameters`` spelling). Other names are returned unchanged."""
    return name.replace("$$$", ".")


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


class _SafeDraw(Messenger):
    """Draw guide latents without failing: a draw that errors or is not finite is recorded in
    ``bad`` and replaced by a finite placeholder so the rest of the model can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or isinstance(fn, _Subsample):
            return
        try:
            value = fn.sample()
            ok = bool(torch.isfinite(value).all())
        except (RuntimeError, ValueError):
            value, ok = None, False
        if not ok:
            self.bad.append(f"{msg['name']} (guide)")
            if getattr(fn, "has_enumerate_support", False):
                value = fn.enumerate_support(expand=True)[0]
            else:
                value = torch.zeros(fn.shape())
        msg["value"] = value


def probe_traces(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    """Guide and replayed model traces, with validation off and NaN-tolerant draws; returns
    ``(non_finite_guide_draws, guide_trace, model_trace)``. Gradients are on, as in training
    (a guide may call ``retain_grad()`` or ``torch.autograd.grad`` on its own tensors); no
    backward pass runs, so parameters and their ``.grad`` are untouched."""
    probe = _SafeDraw()
    with torch.enable_grad(), pyro.validation_enabled(False), validation_enabled(False):
        guide_trace = poutine.trace(probe(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return probe.bad, guide_trace, model_trace


def _sample_sites(trace: Trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not isinstance(site["fn"], _Subsample)
    }


def unmatched_sites(guide_trace: Trace, model_trace: Trace) -> dict[str, str]:
    """Sample sites that exist on one side only, as ``{name: "guide"}`` (a guide site, not
    marked ``infer={"is_auxiliary": True}``, with no latent site of that name in the model:
    its ``q`` is fitted to nothing) or ``{name: "model"}`` (a model latent the guide does not
    sample: it is drawn from the prior at every step). Enumerated model sites are not counted.
    The same rules as Pyro's ``check_model_guide_match`` warnings, as data."""
    guide = _sample_sites(guide_trace)
    model_latent = {n: s for n, s in _sample_sites(model_trace).items() if not s["is_observed"]}
    found = {
        name: "guide"
        for name, site in guide.items()
        if name not in model_latent and not site["infer"].get("is_auxiliary")
    }
    for name, site in model_latent.items():
        enumerated = site["infer"].get("_enumerate_dim") is not None or site["infer"].get(
            "enumerate"
        )
        if name not in guide and not enumerated:
            found[name] = "model"
    return found
