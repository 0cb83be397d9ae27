"""Evaluation dims through layers that do not broadcast: convolutions and pooling.

Values side by side (:mod:`.evaluations`) add dims left of every plate, as Pyro's parallel
enumeration does, and need model code that broadcasts over them. ``torch.nn.functional``'s
convolutions and pools do not: ``conv2d`` takes 3 or 4 dims. :class:`FoldLeadingDims`
runs such a layer with its extra leading dims folded into its batch dim and unfolds the
result, which is the layer applied to each leading index separately. The ELBO turns it on
for a model whose values side by side fail without it, and the side-by-side check
(:func:`~.evaluations.side_by_side_mismatch`) still compares with one value at a time, so
a layer that mixes its batch (batch normalization) is caught there, not trusted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["FoldLeadingDims", "SPATIAL_DIMS"]

#: layers that take ``(batch, channels, *spatial)`` and the number of spatial dims
SPATIAL_DIMS = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.lp_pool1d: 1, F.lp_pool2d: 2, F.lp_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.pixel_shuffle: 2, F.pixel_unshuffle: 2,
}  # fmt: skip


def _unfold(value, lead: torch.Size):
    if isinstance(value, torch.Tensor):
        return value.reshape(lead + value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_unfold(v, lead) for v in value)
    return value


class FoldLeadingDims(TorchFunctionMode):
    """Layers of :data:`SPATIAL_DIMS` given more than ``(batch, channels, *spatial)`` dims
    run on the leading dims folded into one batch dim."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spatial = SPATIAL_DIMS.get(func)
        x = args[0] if args else kwargs.get("input")
        if spatial is None or not isinstance(x, torch.Tensor) or x.dim() <= spatial + 2:
            return func(*args, **kwargs)
        lead = x.shape[: x.dim() - spatial - 1]
        folded = x.reshape((-1,) + tuple(x.shape[x.dim() - spatial - 1 :]))
        if args:
            return _unfold(func(folded, *args[1:], **kwargs), lead)
        return _unfold(func(**{**kwargs, "input": folded}), lead)
