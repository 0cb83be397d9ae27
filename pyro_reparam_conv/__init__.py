"""pyro_reparam_conv: correct, visible and fast gradients through sampling in stochastic conv nets.

Public API (``docs/architecture.md`` in the repository): :class:`RoutedELBO`, routing and the
estimator registry, diagnostics, layers and sampling helpers, training and the ArviZ export.
"""

from .diagnostics import GradientAudit, audit_gradients, compare_estimators
from .elbo import NonFiniteLossError, RoutedELBO
from .inference_data import to_inference_data
from .layers import GaussianConvHead, StochasticConv2d, sample_elementwise_normal
from .routing import ESTIMATORS, Route, force_estimator
from .sampling import (
    elementwise_normal,
    enable_validation,
    is_validation_enabled,
    to_variance,
    validate_mean_var,
    validation_enabled,
)

__version__ = "0.1.0"

__all__ = [
    "GradientAudit",
    "audit_gradients",
    "compare_estimators",
    "to_inference_data",
    "ESTIMATORS",
    "NonFiniteLossError",
    "Route",
    "RoutedELBO",
    "force_estimator",
    "GaussianConvHead",
    "StochasticConv2d",
    "elementwise_normal",
    "enable_validation",
    "is_validation_enabled",
    "sample_elementwise_normal",
    "to_variance",
    "validate_mean_var",
    "validation_enabled",
]
