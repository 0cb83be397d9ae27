"""Rendering: what the commands print and the demo's results files, from records.

- the demo's table (:func:`demo_report`), printed and written to ``results.txt``, and
  ``results.json`` (:func:`demo_summary`), from a :class:`~pyro_reparam_conv.demo.DemoResult`;
- ``train``'s routes and timing (:func:`train_summary`), from its run record;
- ``compare``'s table (:func:`compare_table`), from ``compare_estimators``'s frame.

No torch or Pyro here: everything rendered is plain data already.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .runs import write_json

if TYPE_CHECKING:  # pragma: no cover
    from .demo import DemoResult

__all__ = [
    "compare_table",
    "demo_report",
    "demo_summary",
    "format_table",
    "train_summary",
    "write_demo_results",
    "written_files",
]


def _per_step(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.4f}"


def format_table(rows: list[dict]) -> str:
    """``rows`` (dicts with the same keys, the headers) as aligned columns under a rule."""
    headers = list(rows[0])
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _variance(value: Optional[float]) -> str:
    return f"{float('nan') if value is None else value:.3g}"


def _demo_rows(result: DemoResult) -> list[dict]:
    return [
        {
            "run": run.name,
            "routes": ", ".join(f"{k}:{v}" for k, v in sorted(run.routes.items())),
            "ELBO/image": f"{run.elbo_per_image:.3f}",
            "NMI(y, digit)": f"{run.nmi:.3f}",
            "encoder grad var": _variance(run.encoder_grad_variance),
            "s/step": _per_step(run.seconds_per_step),
            "steps": str(run.steps),
        }
        for run in result.runs
    ]


def demo_report(result: DemoResult) -> str:
    """The demo's table with the set-up above it and what the columns measured below."""
    options, fit, runs = result.options, result.options.fit, result.by_name
    num_images = result.num_images
    report = (
        f"{num_images} digits, {fit.steps} steps of batch {fit.batch_size}, seed {fit.seed}, "
        f"device {result.device}, {result.threads} torch thread(s)\n"
        f"{format_table(_demo_rows(result))}\n"
        f"ELBO/image: Trace_ELBO, 8 particles, all {num_images} images. NMI: argmax q(y | x) "
        f"against the digit labels. Encoder gradient variance: {options.variance_draws} "
        "single-particle draws of each run's routes at the default run's final parameters."
    )
    costs = runs["z_score"].costs.get("z")
    if costs:  # element- or site-level costs of z on the score function, and why
        report += f"\nz_score: {costs}."
    return report


def demo_summary(result: DemoResult) -> dict:
    """``results.json``: each run's measures, routes and reasons."""
    return {
        run.name: {
            "elbo_per_image": run.elbo_per_image,
            "nmi": run.nmi,
            "encoder_grad_variance": run.encoder_grad_variance,
            "seconds_per_step": run.seconds_per_step,
            "threads": run.threads,
            "steps": run.steps,
            "routes": dict(run.routes),
            "reasons": dict(run.reasons),
        }
        for run in result.runs
    }


def write_demo_results(result: DemoResult) -> str:
    """Write ``results.txt`` and ``results.json`` into the demo's folder; returns the report."""
    out = result.options.out
    report = demo_report(result)
    (out / "results.txt").write_text(report + "\n")
    write_json(out / "results.json", demo_summary(result))
    return report


def written_files(out: Path) -> str:
    """``wrote a, b, ... to out/``: the files in ``out``."""
    return f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}/"


def train_summary(result, record: dict) -> str:
    """The routes and the step count, time per step and layout of a ``train`` run."""
    lines = list(record.get("described", []))
    layout = ""
    if result.world_size > 1 or result.noise_shards > 1:
        processes = "process" if result.world_size == 1 else "processes"
        layout = f" ({result.world_size} {processes}, {result.noise_shards} noise shards)"
    per_step = record.get("seconds_per_step")
    timing = f"{per_step * 1e3:.1f} ms/step" if per_step is not None else "no timing stored"
    lines.append(
        f"{result.step} steps, {timing} on {record.get('device', result.device)}{layout}; "
        f"checkpoint {result.checkpoint_path}"
    )
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def compare_table(frame) -> str:
    """``compare``'s table, under 100 characters wide, then each label's routes (a label with
    a ``*`` left some sites on another route: they are named, with the reason)."""
    skipped = frame.attrs.get("skipped") or {}
    star = lambda name: name + ("*" if skipped.get(name) else "")  # noqa: E731
    rows = [
        {
            "estimator": _short(star(row.estimator), 14),
            "param": _short(str(row.param), 24),
            "mean_norm": f"{row.mean_norm:.3g}",
            "variance": f"{row.variance:.3g}",
            "snr": f"{row.snr:.3g}",
            "ms/draw": f"{row.seconds_per_draw * 1e3:.1f}",
            "z_vs_unbiased": f"{row.z_vs_unbiased:.2f}",
            "agrees": "-" if row.agrees is None else str(row.agrees),
        }
        for row in frame.itertuples()
    ]
    lines = [format_table(rows), "routes:"]
    for name, routes in frame.groupby("estimator", sort=False)["routes"].first().items():
        lines.append(f"  {star(name)}: {routes}")
        lines += [f"    {site} not {name}: {why}" for site, why in skipped.get(name, {}).items()]
    return "\n".join(lines)
