"""Validation of (mean, var) inputs: every bad case raises ValueError naming the argument."""

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
