"""Per-sample moments of the Gaussian gradient estimators by quadrature, for a scalar cost.

For ``x ~ N(mu, sigma^2)`` and a cost ``f`` (a NumPy function), the mean, variance and fourth
central moment of one draw of each estimator of ``d E f / d mu`` and ``d E f / d sigma``:

- pathwise: ``f'(x)`` and ``f'(x) eps`` (``x = mu + sigma eps``);
- score function, no baseline: ``f(x) eps / sigma`` and ``f(x) (eps^2 - 1) / sigma``;
- measure-valued (Mohamed et al. 2020, section 6): ``(f(mu + sigma W) - f(mu - sigma W')) /
  (sigma sqrt(2 pi))`` with ``W, W'`` Rayleigh(1), and ``(f(mu + sigma M) - f(mu + sigma X)) /
  sigma`` with ``M`` double-sided Maxwell, ``X`` standard normal; coupled: ``W' = W`` and
  ``X = U M`` with ``U ~ U(0, 1)``; uncoupled: independent.

Expectations: the trapezoid rule on fine grids (exponentially accurate for smooth integrands
that vanish at the ends: step 0.001 on ``[-12, 12]`` over ``N(0, 1)`` and, with weight
``m^2``, over the double-sided Maxwell; step 0.0005 on ``[0, 14]`` over the Rayleigh density
``w exp(-w^2 / 2)``), and for the coupled pair ``(M, U M)`` step 0.005 in ``m`` times
Gauss-Legendre (200 nodes) over ``U(0, 1)``: converged to 6 digits for ``cos(10 x)`` and
``exp(-10 x^2)``, where Gauss-Hermite with 80 nodes is off by 15%. Shared by
``tests/test_measure_valued.py`` and ``benchmarks/measure_valued.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial.legendre import leggauss


def _phi(x):
    return np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)


X = np.linspace(-12.0, 12.0, 24001)
WX = _phi(X) * (X[1] - X[0])  # E over N(0, 1)
M = np.linspace(-12.0, 12.0, 4801)
WM = M**2 * _phi(M) * (M[1] - M[0])  # E over the double-sided Maxwell, for the pair
U, WU = leggauss(200)
U, WU = (U + 1) / 2, WU / 2  # E over U(0, 1)
W_GRID = np.linspace(0.0, 14.0, 28001)
W_DENSITY = W_GRID * np.exp(-(W_GRID**2) / 2)  # Rayleigh(1)


def e_normal(g):
    return np.sum(WX * g(X))


def e_rayleigh(g):
    return np.trapezoid(g(W_GRID) * W_DENSITY, W_GRID)


def e_maxwell(g):  # double-sided Maxwell: density m^2 phi(m)
    return np.sum(WX * X**2 * g(X))


def e_maxwell_uniform(h):  # the paper's coupling: (M, U M)
    m, u = M[:, None], U[None, :]
    return np.sum(WM[:, None] * WU[None, :] * h(m, m * u))


def moments(e, g):
    """(mean, variance, 4th central moment) of g under the expectation e."""
    mean = e(g)
    var = e(lambda *a: (g(*a) - mean) ** 2)
    return mean, var, e(lambda *a: (g(*a) - mean) ** 4)


def difference_moments(a, b, c):
    """Moments of (A - B) / c for independent A, B with moments a, b."""
    mean = (a[0] - b[0]) / c
    var = (a[1] + b[1]) / c**2
    return mean, var, (a[2] + 6 * a[1] * b[1] + b[2]) / c**4


def measure_valued_moments(f, mu, sigma, coupled):
    """((mean, var, m4) for mu, (mean, var, m4) for sigma) of the measure-valued estimates."""
    c_mu = sigma * math.sqrt(2 * math.pi)
    if coupled:
        g_mu = moments(e_rayleigh, lambda w: (f(mu + sigma * w) - f(mu - sigma * w)) / c_mu)
        g_sigma = moments(
            e_maxwell_uniform, lambda m, x: (f(mu + sigma * m) - f(mu + sigma * x)) / sigma
        )
        return g_mu, g_sigma
    plus = moments(e_rayleigh, lambda w: f(mu + sigma * w))
    minus = moments(e_rayleigh, lambda w: f(mu - sigma * w))
    maxwell = moments(e_maxwell, lambda m: f(mu + sigma * m))
    normal = moments(e_normal, lambda x: f(mu + sigma * x))
    return difference_moments(plus, minus, c_mu), difference_moments(maxwell, normal, sigma)


def pathwise_moments(df, mu, sigma):
    """The pathwise estimates' moments; ``df`` is the cost's derivative."""
    g_mu = moments(e_normal, lambda x: df(mu + sigma * x))
    return g_mu, moments(e_normal, lambda x: df(mu + sigma * x) * x)


def score_moments(f, mu, sigma):
    """The score-function estimates' moments (no baseline)."""
    g_mu = moments(e_normal, lambda x: f(mu + sigma * x) * x / sigma)
    return g_mu, moments(e_normal, lambda x: f(mu + sigma * x) * (x**2 - 1) / sigma)
