"""Issue #19, item 5: the demo's records render to the table and files the CLI has always
written, and the demo model names its own sites and encoder parameters."""

import json
from pathlib import Path

import pyro
import torch
from pyro.poutine.util import site_is_subsample

from pyro_reparam_conv.demo import DEMO_RUNS, DemoOptions, DemoResult, DemoRun
from pyro_reparam_conv.models import ConvClusterVAE
from pyro_reparam_conv.report import demo_report, write_demo_results
from pyro_reparam_conv.runs import FitOptions

Z_COSTS = "element-level costs: 9 of 64 pixels per element"
Z_REASON = f"Normal has rsample; forced; {Z_COSTS}"


def result(out: Path) -> DemoResult:
    fit = FitOptions(steps=4, batch_size=16, lr=3e-3, seed=0, device="cpu", resume=False,
                     overwrite=False)  # fmt: skip
    options = DemoOptions(out=out, fit=fit, model={}, num_images=48, variance_draws=4)
    runs = tuple(
        DemoRun(
            name=name,
            routes={"y": "enumerate", "z": "score" if name == "z_score" else "pathwise"},
            reasons={"z": Z_REASON} if name == "z_score" else {},
            costs={"z": Z_COSTS} if name == "z_score" else {},
            elbo_per_image=-12.3456,
            nmi=0.5,
            encoder_grad_variance=None if name == "y_score" else 1234.5,
            seconds_per_step=None if name == "default" else 0.01234,
            threads=1,
            steps=4,
        )
        for name in DEMO_RUNS
    )
    return DemoResult(options=options, runs=runs, num_images=48, device="cpu", threads=1)


def test_the_demo_table_and_files_from_records(tmp_path):
    text = write_demo_results(result(tmp_path))
    lines = text.splitlines()
    assert lines[0] == "48 digits, 4 steps of batch 16, seed 0, device cpu, 1 torch thread(s)"
    assert lines[1].split() == ["run", "routes", "ELBO/image", "NMI(y,", "digit)",
                                "encoder", "grad", "var", "s/step", "steps"]  # fmt: skip
    assert lines[3].split() == ["default", "y:enumerate,", "z:pathwise", "-12.346", "0.500",
                                "1.23e+03", "-", "4"]  # fmt: skip
    assert lines[4].split()[-3:] == ["nan", "0.0123", "4"]
    assert lines[-1] == "z_score: element-level costs: 9 of 64 pixels per element."
    assert (tmp_path / "results.txt").read_text() == text + "\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == list(DEMO_RUNS) == ["default", "y_score", "z_score"]
    assert saved["y_score"]["encoder_grad_variance"] is None
    assert saved["z_score"]["routes"] == {"y": "enumerate", "z": "score"}
    assert demo_report(result(tmp_path)) == text


def test_the_model_names_its_sites_and_encoder_parameters():
    vae = ConvClusterVAE(hidden_channels=8, latent_channels=2, num_classes=3)
    x = torch.rand(2, 1, 8, 8)
    guide = pyro.poutine.trace(vae.guide).get_trace(x)
    latent = [
        name
        for name, site in guide.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]
    assert tuple(latent) == ConvClusterVAE.SITES
    names = [name for name, _ in vae.named_parameters()]
    encoder = [n for n in names if n.startswith(ConvClusterVAE.ENCODER_PREFIXES)]
    assert encoder and all(n.split(".")[0] in ("encoder", "z_head") for n in encoder)
    assert "class_maps" not in encoder and not any(n.startswith("decoder.") for n in encoder)
