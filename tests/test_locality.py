"""Element-level Rao-Blackwellization of score-function map sites (pyro_reparam_conv.locality).

Footprints are checked against receptive fields computed by hand (and contain them where a
border clips them); costs that are not local fall back to site level with a reason; the
element-level score-function gradient of a linear-Gaussian conv model is checked against
its closed-form ELBO gradient (Monte Carlo mean within 4.5 standard errors per element), for
a stride-1, a stride-2 and a transposed-convolution decoder; its variance is below the
site-level one by about the factor the footprint predicts.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.locality import find_footprint

B, C, H, W = 2, 2, 6, 6
NOISE = 0.7


def decoders():
    torch.manual_seed(0)
    return {
        "conv3": torch.nn.Conv2d(C, 1, 3, padding=1),
        "stride2": torch.nn.Conv2d(C, 1, 3, stride=2, padding=1),
        "transposed": torch.nn.ConvTranspose2d(C, 1, 4, stride=2, padding=1),
    }


def make_model(decoder):
    def model(x):
        with pyro.plate("images", B):
            z = pyro.sample("z", dist.Normal(torch.zeros(B, C, H, W), 1.0).to_event(3))
            pyro.sample("x", dist.Normal(decoder(z), NOISE).to_event(3), obs=x)

    return model


def guide(x, rao_blackwell="element", estimator="score"):
    g = torch.Generator().manual_seed(1)
    m = pyro.param("m", lambda: 0.3 * torch.randn(B, C, H, W, generator=g))
    log_s = pyro.param("log_s", torch.full((B, C, H, W), -0.4))
    with pyro.plate("images", B):
        infer = {"estimator": estimator, "rao_blackwell": rao_blackwell}
        pyro.sample("z", dist.Normal(m, log_s.exp()).to_event(3), infer=infer)


def exact_gradients(decoder, x):
    """-ELBO of z ~ N(0, 1), x ~ N(conv(z), s^2), q = N(m, exp(log_s)^2), in closed form:
    E||x - conv(z)||^2 = ||x - conv(m)||^2 + conv_{w^2}(var) (a linear decoder)."""
    guide(x)
    m, log_s = pyro.param("m"), pyro.param("log_s")
    var = (2 * log_s).exp()
    mean_out = decoder(m)
    weight = decoder.weight
    if isinstance(decoder, torch.nn.ConvTranspose2d):
        var_out = F.conv_transpose2d(var, weight**2, stride=decoder.stride, padding=decoder.padding)
    else:
        var_out = F.conv2d(var, weight**2, stride=decoder.stride, padding=decoder.padding)
    n = mean_out[0].numel()
    lik = -0.5 * (((x - mean_out) ** 2 + var_out) / NOISE**2).sum() - B * n * math.log(NOISE)
    prior = -0.5 * (m**2 + var).sum()
    entropy = log_s.sum()
    return dict(zip(("m", "log_s"), torch.autograd.grad(-(lik + prior + entropy), [m, log_s])))


def data(decoder):
    with torch.no_grad():
        out = decoder(torch.zeros(B, C, H, W))
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(2))


def gradient_draws(model, guide_fn, x, n, seed, **elbo_kwargs):
    """``n`` gradient draws of m and log_s, and the score-function cost of z in each (under
    the key "cost", broadcast to z's elements)."""
    pyro.set_rng_seed(seed)
    elbo = RoutedELBO(**elbo_kwargs)
    draws = {"m": [], "log_s": [], "cost": []}
    for _ in range(n):
        tables = elbo.site_terms(model, guide_fn, x)
        _, loss = elbo.loss_and_surrogate(tables)
        params = [pyro.param("m"), pyro.param("log_s")]
        for name, g in zip(("m", "log_s"), torch.autograd.grad(loss, params)):
            draws[name].append(g)
        (row,) = tables[0].scored()
        draws["cost"].append(row.cost.expand(B, C, H, W) if row.cost.dim() == 4 else
                             row.cost.reshape(B, 1, 1, 1).expand(B, C, H, W))  # fmt: skip
    return {k: torch.stack(v) for k, v in draws.items()}, elbo


# ------------------------------------------------------------------------ footprints
def got_pixels(found, term, position, image=0):
    """The pixels of ``term`` (of image ``image``, channels merged) whose box contains the
    map position ``position`` of image ``image`` (any channel)."""
    box = found.sums[term].box  # (2n, B, C_t, H_t, W_t): -lo and hi per dim of z (B, C, H, W)
    n = box.shape[0] // 2
    lo, hi = -box[:n], box[n:]
    inside = (lo[0] <= image) & (image <= hi[0])
    for d, p in zip((2, 3), position):
        inside &= (lo[d] <= p) & (p <= hi[d])
    rows, cols = inside[image].any(0).nonzero(as_tuple=True)
    return {(int(r), int(c)) for r, c in zip(rows, cols)}


@pytest.mark.parametrize(
    "name, position, pixels",
    [
        ("conv3", (2, 3), {(r, c) for r in (1, 2, 3) for c in (2, 3, 4)}),
        ("conv3", (0, 0), {(r, c) for r in (0, 1) for c in (0, 1)}),  # clipped by the border
        ("stride2", (2, 3), {(1, 1), (1, 2)}),  # output i gets inputs 2i-1..2i+1
        ("transposed", (2, 3), {(r, c) for r in (3, 4, 5, 6) for c in (5, 6, 7, 8)}),
    ],
)
def test_footprints_equal_the_receptive_fields_by_hand(name, position, pixels):
    decoder = decoders()[name]
    x = data(decoder)
    model = make_model(decoder)
    found = find_footprint(model, guide, "z", x)
    assert got_pixels(found, "x", position) == pixels


def test_a_structural_probe_sees_through_dead_relus_and_zero_weights():
    """A ReLU that is off for this draw, and a weight that is zero now, hide nothing."""
    torch.manual_seed(0)
    first = torch.nn.Conv2d(C, 2, 3, padding=1)
    second = torch.nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        first.bias.fill_(-100.0)  # every unit of the ReLU is off
        second.weight.zero_()
    decoder = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    x = data(decoder)
    found = find_footprint(make_model(decoder), guide, "z", x)
    assert found.sizes["x"] == (9, H * W)
    assert first.bias[0].item() == -100.0 and second.weight.abs().sum() == 0  # restored


@pytest.mark.parametrize(
    "layers, reason",
    [
        (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * H * W, H * W),
                                     torch.nn.Unflatten(1, (1, H, W))), "not local"),
        (lambda: torch.nn.Sequential(torch.nn.Conv2d(C, 2, 3, padding=1), torch.nn.GroupNorm(1, 2),
                                     torch.nn.Conv2d(2, 1, 1)), "not local"),
        (lambda: torch.nn.Sequential(torch.nn.Conv2d(C, 2, 3, padding=1), torch.nn.BatchNorm2d(2),
                                     torch.nn.Conv2d(2, 1, 1)), "other elements of the plate"),
    ],
    ids=["dense", "groupnorm", "batchnorm"],
)  # fmt: skip
def test_costs_that_are_not_local_stay_site_level_and_say_why(layers, reason):
    decoder = layers()
    x = data(decoder)
    elbo = RoutedELBO()
    elbo.loss(make_model(decoder), guide, x)
    route = elbo.routes["z"].reason
    assert "site-level costs" in route and reason in route, route


def test_routes_say_which_costs_and_the_footprint_size():
    decoder = decoders()["conv3"]
    x = data(decoder)
    elbo = RoutedELBO()
    elbo.loss(make_model(decoder), guide, x)
    assert "element-level costs: footprint <= 9 of 36 pixels of 'x'" in elbo.routes["z"].reason
    elbo.loss(make_model(decoder), lambda x: guide(x, "site"), x)
    assert "site-level costs: infer['rao_blackwell']='site'" in elbo.routes["z"].reason
    order = RoutedELBO(dependency_tracking="order")
    order.loss(make_model(decoder), guide, x)
    assert "site-level costs: no dependencies are tracked" in order.routes["z"].reason
    with pytest.raises(ValueError, match=r"site 'z': infer\['rao_blackwell'\] must be one of"):
        RoutedELBO().loss(make_model(decoder), lambda x: guide(x, "pixel"), x)


# ------------------------------------------------------------------ unbiased, and lower
@pytest.mark.parametrize("name", ["conv3", "stride2", "transposed"])
def test_element_level_score_gradient_is_unbiased_against_the_closed_form(name):
    decoder = decoders()[name]
    x = data(decoder)
    model = make_model(decoder)
    exact = exact_gradients(decoder, x)
    draws, elbo = gradient_draws(model, guide, x, 1500, 3)
    assert "element-level costs" in elbo.routes["z"].reason
    for key in ("m", "log_s"):
        samples = draws[key]
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
        z = ((mean - exact[key]).abs() / se).max()
        assert z < 4.5, (key, z)


def test_element_level_variance_is_lower_by_the_factor_of_the_footprint():
    """Without a baseline the score term of element e is (z_e - m_e) / s_e^2 * c_e, its
    variance about E[score_e^2] E[c_e^2]: the gradient variance falls by the factor
    E[c^2] / E[c_e^2] by which the footprint shrinks the cost's second moment (measured:
    33x here, a 3x3 footprint of 9 of 36 pixels and the element's own 2 terms against the
    image's 36 pixels and 2 * 72 own terms)."""
    decoder = decoders()["conv3"]
    x = data(decoder)
    model = make_model(decoder)
    element, _ = gradient_draws(model, guide, x, 400, 4, baseline=None)
    site, _ = gradient_draws(model, lambda x: guide(x, "site"), x, 400, 4, baseline=None)
    measured = site["m"].var(0).sum() / element["m"].var(0).sum()
    predicted = site["cost"].pow(2).mean() / element["cost"].pow(2).mean()
    assert measured > 10, measured
    assert 0.6 < measured / predicted < 1.6, (measured, predicted)
