"""Issue 5 benchmark: the seed workload, hand-written PyTorch vs Pyro ELBOs vs RoutedELBO.

Run (defaults take well under two minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/seed_workload.py [--device cpu|cuda] [--batch-sizes 1 4]
        [--size 64] [--repeats 20] [--warmup 3] [--no-compile] [--threads N]

Workload: learnable ``mean`` and softplus-parameterized ``var`` of shape (B, 16, S, S),
``z ~ Normal(mean, sqrt(var))`` elementwise, ``y ~ Normal(Conv2d(16, 32, 3, padding=1)(z), 1)``
observed, ``z ~ Normal(0, 1)`` a priori. One step = loss + backward + zeroing the grads (no
optimizer update). Methods:

(a) hand-written PyTorch: sample, conv, Normal log-likelihood, log prior - log q, backward;
(b) hand-written with the analytic KL(q || N(0, 1)), under ``torch.compile`` (eager, with a
    note, where compiling fails or ``--no-compile``);
(c) Pyro ``Trace_ELBO``; (d) Pyro ``TraceMeanField_ELBO``;
(e) ``RoutedELBO(fast_path=False)``; (f) ``RoutedELBO()`` (fast path: analytic KL and the
fast kernels of ``pyro_reparam_conv.kernels``); (f') the same with the reference kernels
(Pyro's and torch's own functions: what the kernels save); (g), (h)
``RoutedELBO(fast_path=False)`` and ``Trace_ELBO`` with the guide written with the package's
``sample_elementwise_normal`` (whose log q reuses the noise of the draw).

Time per step is the median (and the minimum) over ``--repeats`` interleaved rounds after
``--warmup`` calls (``perf_counter`` on CPU; CUDA events, synchronized, on GPU); on a shared
machine the minimum is the less noisy of the two. ``--threads N`` sets
``torch.set_num_threads`` (default 1, as the other benchmarks here; 0: torch's own). Peak memory is
``torch.cuda.max_memory_allocated`` per method on GPU, "n/a" on CPU. Pyro's and this
package's argument validation is switched off for the timings (it is a debugging aid).
The Python overhead is the same step at a tiny size (1 x 16 x 8 x 8), where the arithmetic
is negligible.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_reparam_conv import (  # noqa: E402
    RoutedELBO,
    sample_elementwise_normal,
    sampling,
)
from pyro_reparam_conv.kernels import REFERENCE  # noqa: E402


class ReferenceKernelsELBO(RoutedELBO):
    """``RoutedELBO()`` computing with Pyro's and torch's functions instead of the kernels."""

    kernels = REFERENCE


LOG_2PI = math.log(2 * math.pi)
C_IN, C_OUT = 16, 32


class Workload:
    """Parameters, the model's convolution and data for one (B, S)."""

    def __init__(self, batch: int, size: int, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, C_IN, size, size)
        self.shape = shape
        # Pyro params (in the param store), so Pyro's ELBOs see trainable parameters and run
        # backward; the hand-written steps use the very same tensors.
        pyro.clear_param_store()
        self.mean = pyro.param("mean", (0.1 * torch.randn(shape, generator=g)).to(device))
        self.raw_var = pyro.param("raw_var", torch.full(shape, -1.0, device=device))
        self.conv = nn.Conv2d(C_IN, C_OUT, 3, padding=1).to(device)
        self.y = torch.randn((batch, C_OUT, size, size), generator=g).to(device)
        self.params = [self.mean, self.raw_var, *self.conv.parameters()]
        assert all(p.requires_grad and p.is_leaf for p in self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------ hand-written
    def hand_loss(self) -> torch.Tensor:
        std = F.softplus(self.raw_var).sqrt()
        eps = torch.randn_like(self.mean)
        z = self.mean + std * eps
        out = self.conv(z)
        log_lik = -0.5 * ((self.y - out) ** 2).sum() - 0.5 * LOG_2PI * out.numel()
        log_prior = -0.5 * (z**2).sum()
        log_q = -0.5 * (eps**2).sum() - std.log().sum()  # log q from the noise; 2pi terms cancel
        return -(log_lik + log_prior - log_q)

    def hand_kl_loss(self, eps: torch.Tensor) -> torch.Tensor:
        var = F.softplus(self.raw_var)
        z = self.mean + var.sqrt() * eps
        out = self.conv(z)
        log_lik = -0.5 * ((self.y - out) ** 2).sum() - 0.5 * LOG_2PI * out.numel()
        kl = 0.5 * (var + self.mean**2 - 1 - var.log()).sum()
        return -(log_lik - kl)

    # ------------------------------------------------------------------- Pyro
    def model(self) -> None:
        batch = self.shape[0]
        pyro.module("conv", self.conv)
        with pyro.plate("batch", batch, dim=-1):
            prior = dist.Normal(torch.zeros((), device=self.y.device), 1.0)
            z = pyro.sample("z", prior.expand(self.shape).to_event(3))
            out = self.conv(z)
            pyro.sample("y", dist.Normal(out, 1.0).to_event(3), obs=self.y)

    def guide(self) -> None:
        mean, raw_var = pyro.param("mean"), pyro.param("raw_var")
        with pyro.plate("batch", self.shape[0], dim=-1):
            std = F.softplus(raw_var).sqrt()
            pyro.sample("z", dist.Normal(mean, std).to_event(3))

    def package_guide(self) -> None:
        """The same guide through the package's site builder (noise-reusing log q)."""
        mean, raw_var = pyro.param("mean"), pyro.param("raw_var")
        with pyro.plate("batch", self.shape[0], dim=-1):
            sample_elementwise_normal("z", mean, raw_var, parameterization="softplus")


def _compiled_kl_step(w: Workload, use_compile: bool) -> tuple[Callable[[], None], str]:
    """The (b) step and a note on how it runs."""
    loss_fn = w.hand_kl_loss
    note = "eager (--no-compile)"
    if use_compile:
        try:
            compiled = torch.compile(w.hand_kl_loss, dynamic=False)
            eps = torch.randn_like(w.mean)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled(eps).backward()
            w.zero_grad()
            loss_fn, note = compiled, "torch.compile"
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            note = f"eager (torch.compile failed: {type(e).__name__})"

    def step() -> None:
        eps = torch.randn_like(w.mean)  # drawn outside the compiled graph
        loss_fn(eps).backward()
        w.zero_grad()

    return step, note


def methods(w: Workload, use_compile: bool) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    def hand() -> None:
        w.hand_loss().backward()
        w.zero_grad()

    def pyro_step(elbo, guide=w.guide) -> Callable[[], None]:
        def step() -> None:
            elbo.loss_and_grads(w.model, guide)
            w.zero_grad()

        return step

    compiled, note = _compiled_kl_step(w, use_compile)
    routed = RoutedELBO()
    fns = {
        "(a) hand-written": hand,
        "(b) hand-written KL": compiled,
        "(c) Trace_ELBO": pyro_step(Trace_ELBO()),
        "(d) TraceMeanField_ELBO": pyro_step(TraceMeanField_ELBO()),
        "(e) RoutedELBO(fast_path=False)": pyro_step(RoutedELBO(fast_path=False)),
        "(f) RoutedELBO()": pyro_step(routed),
        "(f') RoutedELBO(), reference kernels": pyro_step(ReferenceKernelsELBO()),
        "(g) RoutedELBO(fast_path=False), package guide": pyro_step(
            RoutedELBO(fast_path=False), w.package_guide
        ),
        "(h) Trace_ELBO, package guide": pyro_step(Trace_ELBO(), w.package_guide),
    }
    notes = {"(b) hand-written KL": note}
    notes["(f) RoutedELBO() route"] = lambda: str(routed.routes.get("z", "not run"))
    return fns, notes


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_time(fn) -> float:
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(fn) -> float:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)

    return cpu_time


def measure(
    fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, tuple[float, str, float]]:
    """Median ms per step (interleaved rounds), peak memory and minimum ms per method."""
    timer = _timer(device)
    peak: dict[str, str] = {}
    for name, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak[name] = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
        else:
            peak[name] = "n/a"
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: (statistics.median(t), peak[name], min(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="default: 1 8 32 on cuda, 1 4 on cpu",
    )
    parser.add_argument("--size", type=int, default=None, help="H = W; default 300 cuda, 64 cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default 50 cuda, 15 cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="run (b) eagerly")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's own)"
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    batch_sizes = args.batch_sizes or ([1, 8, 32] if cuda else [1, 4])
    size = args.size or (300 if cuda else 64)
    repeats = args.repeats or (50 if cuda else 15)

    pyro.enable_validation(False)
    sampling.enable_validation(False)
    try:
        from _timing import environment, format_table
    except ImportError:  # pragma: no cover - the shared helpers are optional
        environment = None

        def format_table(headers, rows):
            return "\n".join("  ".join(map(str, r)) for r in [headers, *rows])

    if environment is not None:
        print("\n".join(environment(device)))
    print(
        f"seed workload: mean/var (B, {C_IN}, {size}, {size}) -> z -> Conv2d({C_IN}, {C_OUT}, 3) "
        f"-> Normal(., 1) likelihood; median of {repeats} after {args.warmup} warm-up\n"
    )

    rows, notes = [], {}
    for batch in batch_sizes:
        torch.manual_seed(batch)
        w = Workload(batch, size, device)
        fns, method_notes = methods(w, not args.no_compile)
        notes.update(method_notes)
        result = measure(fns, device, repeats, args.warmup)
        trace_ms, _, trace_min = result["(c) Trace_ELBO"]
        hand_ms = result["(a) hand-written"][0]
        for name, (ms, peak, low) in result.items():
            rows.append(
                [
                    f"B={batch} {name}",
                    f"{ms:.2f}",
                    f"{ms / trace_ms:.2f}",
                    f"{ms / hand_ms:.2f}",
                    f"{low:.2f}",
                    f"{low / trace_min:.2f}",
                    peak,
                ]
            )
    headers = [
        "B x method",
        "ms/step",
        "/Trace_ELBO",
        "/hand-written",
        "min ms",
        "min/Trace min",
        "peak MiB",
    ]
    print(format_table(headers, rows))
    for name, note in notes.items():
        print(f"{name}: {note() if callable(note) else note}")

    # Python overhead: the same step at 1 x 16 x 8 x 8, where the arithmetic is negligible
    w = Workload(1, 8, device)
    fns, _ = methods(w, use_compile=False)
    fns.pop("(b) hand-written KL")
    result = measure(fns, device, max(repeats, 200), max(args.warmup, 20))
    trace_ms = result["(c) Trace_ELBO"][0]
    hand_ms = result["(a) hand-written"][0]
    print(f"\nPython overhead per step at 1 x {C_IN} x 8 x 8 (median of {max(repeats, 200)}):")
    rows = [
        [name, f"{ms:.3f}", f"{ms / trace_ms:.2f}", f"{ms - hand_ms:+.3f}"]
        for name, (ms, _, _) in result.items()
    ]
    print(format_table(["method", "ms/step", "/Trace_ELBO", "ms over hand-written"], rows))


if __name__ == "__main__":
    main()
