"""Gradient estimators: how a guide sample site enters the surrogate loss.

- :mod:`.pathwise`: reparameterized terms, differentiated through ``rsample``.
- :mod:`.score`: score-function (REINFORCE) terms with Rao-Blackwellized costs.
- :mod:`.baselines`: control variates for the score-function terms.
"""
