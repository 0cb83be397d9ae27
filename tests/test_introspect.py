"""Model/guide introspection: display names of PyroModule parameters and sample sites that
exist on one side only (reported by the gradient audit)."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_reparam_conv import audit_gradients
from pyro_reparam_conv.introspect import display_name, probe_traces, unmatched_sites


def test_display_name_turns_pyro_module_names_into_module_names():
    assert display_name("encoder$$$0.0.weight") == "encoder.0.0.weight"
    assert display_name("z_head.raw_var$$$bias") == "z_head.raw_var.bias"
    assert display_name("loc") == "loc"


def model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    u = pyro.sample("u", dist.Normal(0.0, 1.0))  # the guide below forgets it
    pyro.sample("x", dist.Normal(z + u, 1.0), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("z", dist.Normal(loc, 1.0))
    pyro.sample("zz", dist.Normal(loc, 1.0))  # a typo: the model has no "zz"
    pyro.sample("aux", dist.Normal(loc, 1.0), infer={"is_auxiliary": True})


def test_unmatched_sites_names_each_side():
    _, guide_trace, model_trace = probe_traces(model, guide, (torch.tensor(0.3),), {})
    assert unmatched_sites(guide_trace, model_trace) == {"zz": "guide", "u": "model"}


@pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model")
@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
def test_the_audit_reports_unmatched_sites_loudly():
    audit = audit_gradients(model, guide, torch.tensor(0.3))
    assert audit.unmatched_sites == {"zz": "guide", "u": "model"}
    report = str(audit)
    assert "!! SITE IN THE GUIDE ONLY: 'zz'" in report
    assert "!! SITE IN THE MODEL ONLY: 'u'" in report
    assert "Every parameter receives a gradient." in report  # true, and not the last word


@pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model")
def test_a_guide_with_every_model_site_leaves_only_the_typo():
    def fuller_guide(x):
        guide(x)
        pyro.sample("u", dist.Normal(0.0, 1.0))

    audit = audit_gradients(model, fuller_guide, torch.tensor(0.3))
    assert audit.unmatched_sites == {"zz": "guide"}
