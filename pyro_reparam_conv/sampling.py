"""Validated elementwise Gaussians built from (mean, variance) tensors.

One place turns a pair ``(mean, var)`` into ``Normal(mean, sqrt(var))``, the distribution
whose reparameterized sample ``z = mean + sqrt(var) * eps, eps ~ N(0, I)`` carries
gradients to both arguments (Kingma & Welling, 2014, "Auto-Encoding Variational Bayes",
section 2.4). The variance may be given directly or through an unconstrained value:

========================  =====================================
``parameterization``      variance
========================  =====================================
``"variance"`` (default)  ``var`` itself, which must be > 0
``"softplus"``            ``log(1 + exp(var))``
``"log"``                 ``exp(var)``
========================  =====================================

Validation (dtype, device, broadcasting, NaN/Inf, non-positive variance) is on by default
and switched off the way Pyro's is: :func:`enable_validation` or the
:func:`validation_enabled` context manager; a ``validate=`` argument overrides both.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Optional

import pyro.distributions as dist
import torch
import torch.nn.functional as F

Parameterization = Literal["variance", "softplus", "log"]
PARAMETERIZATIONS: tuple[str, ...] = ("variance", "softplus", "log")

_VALIDATION_ENABLED = True


def enable_validation(is_validate: bool = True) -> None:
    """Turn input validation of Gaussian sites on or off globally (like ``pyro.enable_validation``)."""
    global _VALIDATION_ENABLED
    _VALIDATION_ENABLED = bool(is_validate)


def is_validation_enabled() -> bool:
    return _VALIDATION_ENABLED


@contextlib.contextmanager
def validation_enabled(is_validate: bool = True) -> Iterator[None]:
    """Context manager that sets validation within its block and restores it after."""
    old = _VALIDATION_ENABLED
    enable_validation(is_validate)
    try:
        yield
    finally:
        enable_validation(old)


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _check_finite(name: str, value: torch.Tensor) -> None:
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    n_nan = _count(torch.isnan(value))
    n_inf = value.numel() - _count(finite) - n_nan
    raise ValueError(
        f"{name} has {n_nan} NaN and {n_inf} infinite elements out of {value.numel()} "
        f"(shape {tuple(value.shape)}); every element must be finite"
    )


def validate_mean_var(
    mean: torch.Tensor,
    var: torch.Tensor,
    parameterization: Parameterization = "variance",
    *,
    mean_name: str = "mean",
    var_name: str = "var",
) -> torch.Size:
    """Check a (mean, var) pair and return their broadcast shape.

    Raises ``ValueError`` naming the argument for a non-tensor or non-floating input,
    mismatched dtype or device, shapes that do not broadcast, NaN/Inf elements, or (for
    ``parameterization="variance"``) variances that are not strictly positive.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )
    _check_tensor(mean_name, mean)
    _check_tensor(var_name, var)
    if mean.dtype != var.dtype:
        raise ValueError(
            f"{mean_name} has dtype {mean.dtype} but {var_name} has dtype {var.dtype}; "
            "cast them to the same floating dtype"
        )
    if mean.device != var.device:
        raise ValueError(
            f"{mean_name} is on {mean.device} but {var_name} is on {var.device}; "
            "move them to the same device"
        )
    try:
        shape = torch.broadcast_shapes(mean.shape, var.shape)
    except RuntimeError:
        raise ValueError(
            f"{mean_name} shape {tuple(mean.shape)} and {var_name} shape {tuple(var.shape)} "
            "do not broadcast"
        ) from None
    with torch.no_grad():
        _check_finite(mean_name, mean)
        _check_finite(var_name, var)
        if parameterization == "variance":
            bad = var <= 0
            if bool(bad.any()):
                n_bad = _count(bad)
                raise ValueError(
                    f"{var_name} must be strictly positive, but {n_bad} of {var.numel()} "
                    f"elements are <= 0 (min {var.min().item():.4g}). A variance from "
                    "torch.randn or a linear layer is unconstrained: pass "
                    "parameterization='softplus' (or 'log'), or apply "
                    "torch.nn.functional.softplus yourself"
                )
    return shape


def to_variance(var: torch.Tensor, parameterization: Parameterization = "variance") -> torch.Tensor:
    """Map ``var`` given in ``parameterization`` to the variance itself (see module table)."""
    if parameterization == "variance":
        return var
    if parameterization == "softplus":
        return F.softplus(var)
    if parameterization == "log":
        return var.exp()
    raise ValueError(
        f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
    )


def elementwise_normal(
    mean: torch.Tensor,
    var: torch.Tensor,
    parameterization: Parameterization = "variance",
    *,
    validate: Optional[bool] = None,
    mean_name: str = "mean",
    var_name: str = "var",
) -> dist.Normal:
    """Return ``Normal(mean, sqrt(variance))`` elementwise, validated unless switched off.

    The result has ``rsample``: ``z = mean + sqrt(variance) * eps`` is differentiable in
    ``mean`` and ``var`` (the pathwise, or reparameterization, gradient).
    """
    if validate is None:
        validate = _VALIDATION_ENABLED
    if validate:
        validate_mean_var(mean, var, parameterization, mean_name=mean_name, var_name=var_name)
    scale = to_variance(var, parameterization).sqrt()
    return NoiseReusingNormal(mean, scale, validate_args=False)


def distribution_name(fn) -> str:
    """``fn``'s name as reports show it, wrappers included: ``"Independent(Normal)"``."""
    names = []
    while fn is not None:
        names.append(getattr(type(fn), "display_name", type(fn).__name__))
        fn = getattr(fn, "base_dist", None)
    return "(".join(names) + ")" * (len(names) - 1)


class NoiseReusingNormal(dist.Normal):
    """``Normal(loc, scale)`` whose ``log_prob`` at its own latest ``rsample`` reuses the noise.

    ``rsample`` draws ``z = loc + scale * eps`` and keeps ``eps``; ``log_prob(z)`` for that very
    tensor is then ``-eps^2 / 2 - log(scale) - log(2 pi) / 2``, skipping the passes of
    ``(z - loc) / scale``. Values and gradients are those of ``Normal.log_prob``: as a
    function of ``(loc, scale)``, ``(z - loc) / scale`` is ``eps`` exactly. Any other value
    (a ``sample()``, an observation, a copy) takes ``Normal.log_prob``. Draws consume the
    random stream as ``Normal.rsample`` does.
    """

    #: its density is Normal's, so closed forms for ``Normal`` (e.g. KL) apply unchanged
    exact_normal_density = True
    #: the name reports show: the noise reuse is an implementation detail
    display_name = "Normal"

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + eps * self.scale
        self._noise = (value, eps)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        noise = getattr(self, "_noise", None)
        if noise is None or noise[0] is not value:
            return super().log_prob(value)
        eps = noise[1]
        return -0.5 * eps.square() - self.scale.log() - _LOG_SQRT_2PI

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NoiseReusingNormal, _instance)
        return super().expand(batch_shape, _instance=new)


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
