"""Gradient estimators: how a guide sample site enters the ELBO's surrogate loss.

- :mod:`.base`: the :class:`~.base.Estimator` interface and the registry (:data:`ESTIMATORS`).
- :mod:`.pathwise`: reparameterized draws, differentiated through ``rsample``.
- :mod:`.enumerate`: the exact sum over a finite support, per plate element.
- :mod:`.disarm`: an antithetic pair for Bernoulli sites (DisARM).
- :mod:`.multisample`: K values side by side for Bernoulli sites: ARMS, double control
  variates on leave-one-out, and leave-one-out REINFORCE for any site (opt-in).
- :mod:`.stein`: RODEO, leave-one-out with discrete Stein control variates for Bernoulli
  sites (opt-in).
- :mod:`.gumbel`: straight-through Gumbel-softmax (biased; opt-in only).
- :mod:`.score`: score-function (REINFORCE) terms.
- :mod:`.measure_valued`: Weibull / double-sided Maxwell differences for Normal sites
  (unbiased for costs that are not differentiable; opt-in only).
- :mod:`.implicit`: implicit reparameterization through a differentiable CDF (mixtures,
  von Mises, any continuous univariate distribution without ``rsample``).
- :mod:`.flipout`: flipout and local reparameterization for Normal weights of linear and
  conv layers (opt-in).

What the ELBO does around them lives outside this package: baselines of score-function
terms (:mod:`pyro_reparam_conv.baselines`) and the analytic KL of the fast path
(:mod:`pyro_reparam_conv.analytic_kl`).

A new estimator is one module here that registers an :class:`~.base.Estimator` subclass,
plus its import line below (see ``docs/architecture.md``).
"""

# each module registers its estimator; the registry lists them in this order
from . import pathwise, score  # noqa: F401

# isort: split
from . import disarm, enumerate, gumbel  # noqa: F401

# isort: split
from . import flipout, measure_valued  # noqa: F401

# isort: split
from . import implicit  # noqa: F401

# isort: split
from . import multisample, stein  # noqa: F401
from .base import ESTIMATORS, Estimator, get, register, unregister

__all__ = ["ESTIMATORS", "Estimator", "get", "register", "unregister"]
