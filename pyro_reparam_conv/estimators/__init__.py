"""Gradient estimators: how a guide sample site enters the ELBO's surrogate loss.

- :mod:`.base`: the :class:`~.base.Estimator` interface and the registry (:data:`ESTIMATORS`).
- :mod:`.pathwise`: reparameterized draws, differentiated through ``rsample``.
- :mod:`.score`: score-function (REINFORCE) terms.
- :mod:`.baselines`: control variates for score-function terms.
- :mod:`.analytic_kl`: where ``-KL(q || p)`` replaces a pathwise site's ``log p - log q``.

A new estimator is one module here that registers an :class:`~.base.Estimator` subclass,
plus its import line below (see ``docs/architecture.md``).
"""

from . import pathwise, score  # noqa: F401  (each registers its estimator)
from .base import ESTIMATORS, Estimator, get, register, unregister

__all__ = ["ESTIMATORS", "Estimator", "get", "register", "unregister"]
