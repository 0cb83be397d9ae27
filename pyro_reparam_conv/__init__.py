"""pyro_reparam_conv: correct, visible and fast gradients through sampling in stochastic conv nets.

Public API (``docs/architecture.md`` in the repository): :class:`RoutedELBO`, routing and the
estimator registry, diagnostics, layers and sampling helpers, training and the ArviZ export.

The names are imported on first use (PEP 562), so ``import pyro_reparam_conv`` and the
command line's ``--help`` do not import torch or Pyro.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "GradientAudit": "diagnostics",
    "audit_gradients": "diagnostics",
    "compare_estimators": "diagnostics",
    "to_inference_data": "inference_data",
    "ESTIMATORS": "routing",
    "NonFiniteLossError": "elbo",
    "Route": "routing",
    "RoutedELBO": "elbo",
    "force_estimator": "routing",
    "GaussianConvHead": "layers",
    "StochasticConv2d": "layers",
    "elementwise_normal": "sampling",
    "enable_validation": "sampling",
    "is_validation_enabled": "sampling",
    "sample_elementwise_normal": "layers",
    "to_variance": "sampling",
    "validate_mean_var": "sampling",
    "validation_enabled": "sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    try:  # a submodule (``pyro_reparam_conv.estimators``) not imported yet
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
