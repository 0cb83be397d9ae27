"""How well a learned discrete latent matches known labels: normalized mutual information.

``NMI(a, b) = 2 I(a; b) / (H(a) + H(b))`` (the arithmetic normalization of Strehl & Ghosh
2002, scikit-learn's default), from the contingency table of two labelings: 1 when one
determines the other, 0 when they are independent; invariant to renaming the clusters. Used
by the demo to say whether ``q(y | x)`` has learned the digit classes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalized_mutual_information"]


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(a, b) -> float:
    """NMI of two labelings of the same items (any hashable labels; ``1.0`` when both are
    constant, as scikit-learn does)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"two labelings of the same items are needed, got {a.size} and {b.size}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= a.size
    pa, pb = joint.sum(1), joint.sum(0)
    ha, hb = _entropy(pa), _entropy(pb)
    if ha == 0 and hb == 0:
        return 1.0
    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, 2 * mutual / (ha + hb))
