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

Validation (dtype, device, broadcasting, NaN/Inf, a variance that is not strictly positive
and finite, also after the parameterization's map: ``exp`` of a raw value above about 88
overflows float32, ``softplus`` of one below about -104 underflows to 0) follows Pyro's one
switch, which the ELBO reads too: ``pyro.enable_validation`` / ``pyro.validation_enabled``,
re-exported here as :func:`enable_validation`, :func:`validation_enabled` and
:func:`is_validation_enabled`. A ``validate=`` argument overrides it for one call.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import enable_validation, validation_enabled
from pyro.infer.util import is_validation_enabled

from .sparsity import checks_only

Parameterization = Literal["variance", "softplus", "log"]
PARAMETERIZATIONS: tuple[str, ...] = ("variance", "softplus", "log")

__all__ = [
    "PARAMETERIZATIONS",
    "NoiseReusingNormal",
    "elementwise_normal",
    "enable_validation",
    "is_validation_enabled",
    "to_variance",
    "validate_mean_var",
    "validation_enabled",
]


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


@checks_only
def _check_mapped_variance(
    var_name: str, raw: torch.Tensor, variance: torch.Tensor, parameterization: str
) -> None:
    """The variance an unconstrained ``raw`` maps to must be finite and > 0 (it overflows
    or underflows for large raw values, silently giving inf samples or NaN gradients)."""
    over = ~torch.isfinite(variance)
    under = variance <= 0
    if not bool(over.any() or under.any()):
        return
    bad, what, extreme = (over, "infinite", raw[over].max()) if bool(over.any()) else (
        under, "zero (it underflowed)", raw[under].min())  # fmt: skip
    tiny, big = torch.finfo(variance.dtype).tiny, torch.finfo(variance.dtype).max
    if parameterization == "log":
        keep = f"within about [{math.log(tiny):.4g}, {math.log(big):.4g}]"
    else:
        keep = f"above about {math.log(tiny):.4g}"
    raise ValueError(
        f"{var_name} with parameterization={parameterization!r} gives a variance that is {what} "
        f"at {_count(bad)} of {raw.numel()} elements (raw value {extreme.item():.4g}); in "
        f"{variance.dtype} keep raw values {keep} (clamp them, or add a floor such as "
        "softplus(raw) + 1e-6 to the variance)"
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
    mismatched dtype or device, shapes that do not broadcast, NaN/Inf elements, or a
    variance (after the parameterization's map) that is not strictly positive and finite.
    """
    shape = _validate_inputs(mean, var, parameterization, mean_name, var_name)
    if parameterization != "variance":
        with torch.no_grad():
            variance = to_variance(var, parameterization)
            _check_mapped_variance(var_name, var, variance, parameterization)
    return shape


@checks_only
def _validate_inputs(
    mean: torch.Tensor, var: torch.Tensor, parameterization: str, mean_name: str, var_name: str
) -> torch.Size:
    """Every check of :func:`validate_mean_var` but the mapped variance's."""
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
        validate = is_validation_enabled()
    if validate:
        _validate_inputs(mean, var, parameterization, mean_name, var_name)
    variance = to_variance(var, parameterization)
    if validate and parameterization != "variance":
        with torch.no_grad():
            _check_mapped_variance(var_name, var, variance, parameterization)
    return NoiseReusingNormal(mean, variance.sqrt(), validate_args=False)


class NoiseReusingNormal(dist.Normal):
    """``Normal(loc, scale)`` whose ``log_prob`` at its own latest ``rsample`` reuses the noise.

    ``rsample`` draws ``z = loc + scale * eps`` and keeps ``eps``; ``log_prob(z)`` for that very
    tensor, unmodified since (same version counter), is then
    ``-eps^2 / 2 - log(scale) - log(2 pi) / 2``, skipping the passes of ``(z - loc) / scale``.
    Values and gradients are those of ``Normal.log_prob``: as a function of ``(loc, scale)``,
    ``(z - loc) / scale`` is ``eps`` exactly. Any other value (a ``sample()``, an
    observation, a copy, the draw edited in place) takes ``Normal.log_prob``. Draws consume
    the random stream as ``Normal.rsample`` does.
    """

    #: its density is Normal's, so closed forms for ``Normal`` (e.g. KL) apply unchanged
    exact_normal_density = True
    #: the name reports show: the noise reuse is an implementation detail
    display_name = "Normal"

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + eps * self.scale
        self._noise = (value, _version(value), eps)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        noise = getattr(self, "_noise", None)
        if noise is None or noise[0] is not value or noise[1] is None:
            return super().log_prob(value)
        if noise[1] != _version(value):  # edited in place since the draw
            return super().log_prob(value)
        eps = noise[2]
        return -0.5 * eps.square() - self.scale.log() - _LOG_SQRT_2PI

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NoiseReusingNormal, _instance)
        return super().expand(batch_shape, _instance=new)


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by every in-place change); ``None`` for an inference
    tensor, which has none."""
    try:
        return t._version
    except RuntimeError:
        return None


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
