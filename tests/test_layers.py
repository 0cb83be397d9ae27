"""StochasticConv2d: the pathwise gradient is unbiased, reaches upstream layers, and the
layer is a sample site with rsample under Pyro."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F

from pyro_reparam_conv import StochasticConv2d


def exact_expected_energy(conv: torch.nn.Conv2d, mean, var):
    """E[sum(conv(z)^2)] for z ~ N(mean, var) elementwise, in closed form.

    conv(z)_o = b_o + sum_k w_k z_(o+k) is Gaussian with mean conv(mean)_o and variance
    sum_k w_k^2 var_(o+k) (padding contributes zeros), so
    E[conv(z)_o^2] = conv(mean)_o^2 + conv_{w^2, no bias}(var)_o.
    """
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    first = F.conv2d(mean, conv.weight, conv.bias, **kw)
    second = F.conv2d(var, conv.weight**2, None, **kw)
    return (first**2).sum() + second.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pathwise_gradient_is_unbiased(dtype):
    torch.manual_seed(0)
    layer = StochasticConv2d(2, 3, 3, padding=1, dtype=dtype)
    mean = torch.randn(1, 2, 5, 5, dtype=dtype)
    var = torch.rand(1, 2, 5, 5, dtype=dtype) + 0.2

    m0 = mean.clone().requires_grad_()
    v0 = var.clone().requires_grad_()
    exact_m, exact_v = torch.autograd.grad(exact_expected_energy(layer.conv, m0, v0), (m0, v0))

    # N independent draws as a batch of N copies: d(sum_n f_n)/d mean_n = grad of draw n.
    n = 20000
    m = mean.expand(n, -1, -1, -1).clone().requires_grad_()
    v = var.expand(n, -1, -1, -1).clone().requires_grad_()
    energy = (layer(m, v) ** 2).sum()
    gm, gv = torch.autograd.grad(energy, (m, v))
    for draws, exact in ((gm, exact_m), (gv, exact_v)):
        mc_mean = draws.mean(0, keepdim=True).double()
        std_err = draws.double().std(0, keepdim=True) / n**0.5
        z_scores = ((mc_mean - exact.double()) / std_err).abs()
        # 100 elements per tensor: a 5-standard-error band fails by chance with p ~ 6e-5
        assert z_scores.max() < 5.0, z_scores.max()


def test_gradient_reaches_upstream_layer_mean_and_var():
    torch.manual_seed(1)
    upstream = torch.nn.Conv2d(1, 4, 3, padding=1)  # outputs mean and raw variance channels
    layer = StochasticConv2d(2, 3, 3, padding=1, parameterization="softplus")
    x = torch.randn(4, 1, 8, 8)
    h = upstream(x)
    mean, raw_var = h[:, :2], h[:, 2:]
    mean.retain_grad()
    raw_var.retain_grad()
    layer(mean, raw_var).pow(2).sum().backward()
    for g in (
        mean.grad,
        raw_var.grad,
        upstream.weight.grad,
        upstream.bias.grad,
        layer.conv.weight.grad,
    ):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_is_a_sample_site_with_rsample_under_pyro():
    layer = StochasticConv2d(2, 3, 3, padding=1, name="z", infer={"estimator": "pathwise"})
    mean, var = torch.zeros(4, 2, 6, 6), torch.ones(4, 2, 6, 6)

    def model():
        with pyro.plate("batch", 4):
            return layer(mean, var)

    trace = poutine.trace(model).get_trace()
    site = trace.nodes["z"]
    assert site["type"] == "sample" and not site["is_observed"]
    assert site["fn"].has_rsample
    assert site["fn"].batch_shape == (4,) and site["fn"].event_shape == (2, 6, 6)
    assert site["infer"] == {"estimator": "pathwise"}
    assert site["value"].shape == (4, 2, 6, 6)


def test_without_a_plate_the_batch_folds_into_the_event():
    layer = StochasticConv2d(2, 3, 3, name="z")
    trace = poutine.trace(
        lambda: layer(torch.zeros(4, 2, 6, 6), torch.ones(4, 2, 6, 6))
    ).get_trace()
    assert trace.nodes["z"]["fn"].event_shape == (4, 2, 6, 6)


def test_default_site_name_follows_the_module_path():
    class Net(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.stoch = StochasticConv2d(2, 3, 3)

        def forward(self, m, v):
            with pyro.plate("batch", m.shape[0]):
                return self.stoch(m, v)

    trace = poutine.trace(Net()).get_trace(torch.zeros(2, 2, 5, 5), torch.ones(2, 2, 5, 5))
    assert "stoch.z" in trace.nodes


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(stride=2),
        dict(padding=2, dilation=2),
        dict(groups=2, bias=False),
        dict(padding=1, padding_mode="reflect"),
    ],
)
def test_conv_options_pass_through(conv_kwargs):
    layer = StochasticConv2d(4, 6, 3, **conv_kwargs)
    ref = torch.nn.Conv2d(4, 6, 3, **conv_kwargs)
    ref.load_state_dict(layer.conv.state_dict())
    mean = torch.randn(3, 4, 9, 9)
    tiny = torch.full_like(mean, 1e-12)
    torch.testing.assert_close(layer(mean, tiny), ref(mean), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        layer = StochasticConv2d(2, 3, 3, padding=1).to("cuda", dtype)
        m = torch.zeros(2, 2, 5, 5, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.ones(2, 2, 5, 5, device="cuda", dtype=dtype, requires_grad=True)
        layer(m, v).sum().backward()
        assert m.grad.device.type == "cuda" and v.grad.dtype == dtype
