"""Validated (mean, var) inputs (every bad case raises ValueError naming the argument) and the
noise-reusing Normal they build."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_reparam_conv import (
    StochasticConv2d,
    elementwise_normal,
    to_variance,
    validation_enabled,
)


def good_pair(shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype) + 0.1


@pytest.mark.parametrize(
    "mean, var, match",
    [
        (torch.zeros(2, 3), -torch.ones(2, 3), r"var must be strictly positive, but 6 of 6"),
        (torch.zeros(2, 3), torch.zeros(2, 3), r"var must be strictly positive"),
        (torch.zeros(2, 3), torch.tensor([[1.0, float("nan"), 1.0]] * 2), r"var has 2 NaN"),
        (
            torch.zeros(2, 3),
            torch.tensor([[1.0, float("inf"), 1.0]] * 2),
            r"var has 0 NaN and 2 inf",
        ),
        (torch.tensor([float("nan"), 0.0]), torch.ones(2), r"mean has 1 NaN"),
        (
            torch.zeros(2, 3),
            torch.ones(2, 4),
            r"mean shape \(2, 3\) and var shape \(2, 4\) do not broadcast",
        ),
        (torch.zeros(2, dtype=torch.long), torch.ones(2), r"mean must have a floating-point dtype"),
        (torch.zeros(2), torch.ones(2, dtype=torch.int32), r"var must have a floating-point dtype"),
        (
            torch.zeros(2),
            torch.ones(2, dtype=torch.float64),
            r"mean has dtype torch.float32 but var",
        ),
        ([0.0, 1.0], torch.ones(2), r"mean must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(mean, var, match):
    with pytest.raises(ValueError, match=match):
        elementwise_normal(mean, var)


def test_unknown_parameterization_is_rejected():
    with pytest.raises(ValueError, match=r"parameterization must be one of"):
        elementwise_normal(*good_pair(), parameterization="sigma")


def test_layer_error_names_the_site():
    layer = StochasticConv2d(3, 2, 3, name="h1")
    mean, _ = good_pair()
    with pytest.raises(ValueError, match=r"h1\.var must be strictly positive"):
        layer(mean, torch.randn(2, 3, 4, 4))


def test_validation_can_be_switched_off_globally_and_per_call():
    mean = torch.zeros(3)
    var = -torch.ones(3)
    with validation_enabled(False):
        d = elementwise_normal(mean, var)  # no check: the scale is NaN
        assert torch.isnan(d.scale).all()
    assert torch.isnan(elementwise_normal(mean, var, validate=False).scale).all()
    with pytest.raises(ValueError):
        elementwise_normal(mean, var)


@pytest.mark.parametrize(
    "param, expected",
    [
        ("variance", lambda v: v),
        ("softplus", lambda v: torch.log1p(torch.exp(v))),
        ("log", torch.exp),
    ],
)
def test_parameterizations_give_the_stated_variance(param, expected):
    raw = torch.linspace(-3, 3, 7) if param != "variance" else torch.linspace(0.1, 3, 7)
    torch.testing.assert_close(to_variance(raw, param), expected(raw))
    d = elementwise_normal(torch.zeros(7), raw, param)
    torch.testing.assert_close(d.scale**2, expected(raw))


def test_unconstrained_parameterizations_accept_negative_values():
    mean = torch.zeros(2, 3, 4, 4)
    raw = torch.randn(2, 3, 4, 4)
    for param in ("softplus", "log"):
        z = elementwise_normal(mean, raw, param).rsample()
        assert torch.isfinite(z).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_broadcasting_var_and_dtypes(dtype):
    mean = torch.zeros(2, 3, 4, 4, dtype=dtype)
    var = torch.full((3, 1, 1), 2.0, dtype=dtype)
    d = elementwise_normal(mean, var)
    assert d.batch_shape == (2, 3, 4, 4)
    assert d.rsample().dtype == dtype


def test_log_prob_at_its_own_rsample_reuses_the_noise_exactly():
    """NoiseReusingNormal: log q(z) at its own draw = -eps^2/2 - log s - log(2 pi)/2 equals
    Normal.log_prob in value and in gradient (d/d mean is exactly 0, d/d var is -1/(2 var));
    the draw consumes the random stream as Normal.rsample does; other values fall back."""
    torch.manual_seed(0)
    mean = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    var = torch.rand(2, 3, 4, 4, dtype=torch.float64).add(0.1).requires_grad_()
    fn = elementwise_normal(mean, var).to_event(3)
    reference = dist.Normal(mean, var.sqrt()).to_event(3)
    torch.manual_seed(1)
    z = fn.rsample()
    torch.manual_seed(1)
    assert torch.equal(z, reference.rsample())
    got, expected = fn.log_prob(z), reference.log_prob(z)
    torch.testing.assert_close(got, expected)
    d_got = torch.autograd.grad(got.sum(), [mean, var], retain_graph=True, allow_unused=True)
    d_exp = torch.autograd.grad(expected.sum(), [mean, var])
    assert d_got[0] is None and torch.equal(d_exp[0], torch.zeros_like(mean))
    torch.testing.assert_close(d_got[1], d_exp[1])
    torch.testing.assert_close(d_got[1], -0.5 / var.detach())
    other = z.detach().clone()
    torch.testing.assert_close(fn.log_prob(other), reference.log_prob(other))


def test_noise_reusing_normal_keeps_the_analytic_kl_route():
    from pyro_reparam_conv import RoutedELBO, sample_elementwise_normal

    def model():
        with pyro.plate("batch", 2):
            pyro.sample("z", dist.Normal(torch.zeros(2, 3, 4, 4), 1.0).to_event(3))

    def guide():
        mean = pyro.param("mean", torch.zeros(2, 3, 4, 4))
        with pyro.plate("batch", 2):
            sample_elementwise_normal("z", mean, torch.full((2, 3, 4, 4), 0.5))

    elbo = RoutedELBO()
    elbo.loss(model, guide)
    assert elbo.routes["z"].analytic_kl


@pytest.mark.parametrize(
    "param, raw, match",
    [
        ("log", 89.0, r"z\.var with parameterization='log' gives a variance that is infinite "
                      r"at 1 of 3 elements \(raw value 89\)"),
        ("softplus", -200.0, r"z\.var with parameterization='softplus' gives a variance that is "
                             r"zero \(it underflowed\) at 1 of 3 elements \(raw value -200\)"),
        ("log", -200.0, r"z\.var with parameterization='log' gives a variance that is zero"),
    ],
)  # fmt: skip
def test_a_variance_that_overflows_or_underflows_after_its_map_is_refused(param, raw, match):
    """exp(89) is inf in float32 and softplus(-200) is 0: inf samples or NaN gradients."""
    var = torch.tensor([0.0, raw, 1.0])
    with pytest.raises(ValueError, match=match):
        elementwise_normal(torch.zeros(3), var, param, mean_name="z.mean", var_name="z.var")
    with pytest.raises(ValueError, match=match):
        from pyro_reparam_conv import validate_mean_var

        validate_mean_var(torch.zeros(3), var, param, mean_name="z.mean", var_name="z.var")
    d = elementwise_normal(torch.zeros(3), var, param, validate=False)  # the user's choice
    assert not torch.isfinite(d.scale.log()).all()
    # float64 has the room: the same raw value is fine there
    elementwise_normal(torch.zeros(3, dtype=torch.float64), var.double(), param)


def test_one_validation_switch_shared_with_pyro():
    from pyro.infer.util import is_validation_enabled as pyro_flag

    import pyro_reparam_conv

    mean, var = torch.zeros(3), -torch.ones(3)
    for flag in (False, True):
        pyro.enable_validation(flag)
        assert pyro_reparam_conv.is_validation_enabled() is flag is pyro_flag()
    pyro_reparam_conv.enable_validation(False)
    assert not pyro_flag()
    elementwise_normal(mean, var)  # not validated: Pyro's switch is off
    pyro.enable_validation(True)
    with pytest.raises(ValueError):
        elementwise_normal(mean, var)


def test_log_prob_of_a_draw_edited_in_place_is_recomputed():
    fn = elementwise_normal(torch.zeros(4), torch.full((4,), 0.5))
    z = fn.rsample()
    before = fn.log_prob(z)
    z.mul_(3.0)  # the very tensor, edited: its version counter moves
    torch.testing.assert_close(fn.log_prob(z), dist.Normal(0.0, 0.5**0.5).log_prob(z))
    assert not torch.allclose(fn.log_prob(z), before)
