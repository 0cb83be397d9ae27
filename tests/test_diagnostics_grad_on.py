"""Issue #23, item 7: the diagnostics run the user's guide as training does (gradients on):
a guide that calls ``retain_grad()`` trains with SVI and is audited and compared as well,
with parameter values, ``.grad`` and the RNG left as they were."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from pyro_reparam_conv import RoutedELBO, audit_gradients, compare_estimators

pytestmark = pytest.mark.usefixtures("one_thread")


def model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def guide(x):
    w = pyro.param("w", torch.ones(3))
    x_mean = w * x
    x_mean.retain_grad()  # fails under torch.no_grad()
    pyro.sample("z", dist.Normal(x_mean, 1.0).to_event(1))


X = torch.tensor([0.5, 1.0, -1.0])


def test_a_guide_that_retains_grad_is_audited_and_compared():
    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), RoutedELBO())
    svi.step(X)
    w = pyro.param("w").unconstrained()
    w.grad = torch.full_like(w, 7.0)
    before, rng = w.detach().clone(), torch.get_rng_state()

    audit = audit_gradients(model, guide, X, check_bias=True, num_draws=20)
    assert audit.no_gradient == [] and audit.unmatched_sites == {}
    assert audit.routes["z"].estimator == "pathwise" and not audit.pathwise_bias
    frame = compare_estimators(model, guide, X, estimators=("pathwise", "score"), num_draws=4)
    assert set(frame["estimator"]) == {"pathwise", "score"}

    assert torch.equal(w.detach(), before) and torch.equal(w.grad, torch.full_like(w, 7.0))
    assert torch.equal(torch.get_rng_state(), rng)
