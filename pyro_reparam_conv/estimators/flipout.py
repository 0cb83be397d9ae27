"""Weight estimators: flipout and local reparameterization for Normal weights of layers.

A guide site ``w ~ q = Normal(mu, sigma)`` (factorized, any ``Independent`` wrapper) whose
value the model uses only as the ``weight`` of ``F.linear``, ``F.conv1d/2d/3d`` or
``F.conv_transpose1d/2d/3d`` is still drawn by ``rsample``, so its ``log q`` / analytic KL
terms are the pathwise estimator's. What changes is the layer: while the model runs
(:mod:`pyro_reparam_conv.weight_layers`), the layer call that takes ``w`` as its weight is
computed so that every example of the batch sees its own weight draw:

- **flipout** (Wen et al. 2018, "Flipout: Efficient Pseudo-Independent Weight Perturbations
  on Mini-Batches"): ``y = f(x, mu) + f(x * s_in, w - mu) * s_out`` with independent random
  signs ``s_in`` (per example and input channel) and ``s_out`` (per example and output
  channel). Example ``n`` sees the weight ``mu + (w - mu) * s_out[n] s_in[n]^T``, which has
  the law ``q`` exactly (each entry of ``w - mu`` is a centred Normal, independent of the
  others, so sign flips leave their joint law unchanged): every example's output, and the
  ELBO's expectation, are those of a weight draw, so the gradient is unbiased; examples are
  pseudo-independent, which lowers its variance. The gradient reaches ``mu`` through
  ``f(x, mu)`` and ``sigma`` through ``w - mu = sigma * eps``.
- **local reparameterization** (Kingma, Salimans & Welling 2015, "Variational Dropout and the
  Local Reparameterization Trick"): ``y = f(x, mu) + sqrt(f(x^2, sigma^2)) * eps`` with
  ``eps ~ Normal(0, 1)`` per output element. For ``F.linear`` each output row is exactly
  the law of ``x w^T`` (a sum of independent Normals), examples independent: exact. For a
  convolution it draws every output pixel independently, but pixels that share a kernel are
  correlated under ``q``: the marginals are right, the joint is not, so **it changes the
  objective** for any likelihood that couples pixels; it is opt-in, and its route says so.

Neither is chosen by the routing table (``automatic = False``): a site asks for one with
``infer={"estimator": "flipout"}`` (or :func:`~pyro_reparam_conv.force_estimator`), or the
ELBO routes a factorized Normal there itself (``RoutedELBO(layer_estimators="auto")``, the
default; :class:`~pyro_reparam_conv.learned.Learned`). Either way the ELBO checks, on the
first step of a site (a plain draw), that its value is used only as the weight of one layer
call and that the layer's examples reach the model's terms through terms of their own
(:mod:`pyro_reparam_conv.per_example`), and keeps the plain draw, saying why in the route,
wherever either fails (and, later, wherever any other use shows up).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributions import Normal

from ..distributions import distribution_name, unwrap_independent
from .base import register
from .pathwise import PathwiseEstimator

__all__ = ["LAYERS", "Flipout", "LocalReparameterization"]

#: layer functions whose second argument (``weight``) such a site may be, with their number
#: of spatial dims (``F.linear``: 0)
LAYERS = {
    F.linear: 0,
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
}  # fmt: skip


#: the positional arguments of each layer after ``(input, weight, bias)``
_OPTIONS = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), ("stride", "padding", "dilation", "groups")),
    **dict.fromkeys(
        (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
        ("stride", "padding", "output_padding", "groups", "dilation"),
    ),
}


def batched_layer(func, spatial: int, x, weight, bias=None, *rest, **kwargs):
    """``func(x, weight, bias, ...)`` for a ``weight`` with leading batch dims (Pyro's
    vectorized particles, plates): weight ``b`` of the broadcast batch is applied to the
    entries ``b`` of ``x``'s batch dims (``x``: ``(*batch, channels, *spatial)``, its conv
    batch dim the rightmost). The dims along which the weight varies become groups of one
    grouped convolution; the others stay the layer's batch."""
    if spatial == 0:  # F.linear: a broadcasting matrix product
        out = torch.matmul(x.unsqueeze(-2), weight.transpose(-1, -2)).squeeze(-2)
        return out if bias is None else out + bias
    options = {**dict(zip(_OPTIONS[func], rest)), **kwargs}
    groups = options.pop("groups", 1)
    shape, channels = weight.shape[-spatial - 2 :], x.shape[-spatial - 1 :]
    batch = torch.broadcast_shapes(x.shape[: -spatial - 1], weight.shape[: -spatial - 2])
    lead = (1,) * (len(batch) + spatial + 2 - weight.dim()) + tuple(weight.shape[: -spatial - 2])
    varying = [i for i, n in enumerate(lead) if n != 1]
    shared = [i for i, n in enumerate(lead) if n == 1]
    v, s = math.prod(batch[i] for i in varying), math.prod(batch[i] for i in shared)
    inner = list(range(len(batch), len(batch) + spatial + 1))
    xs = x.expand(batch + channels).permute(varying + shared + inner)
    xs = xs.reshape((v, s) + channels).transpose(0, 1).reshape((s, v * channels[0]) + channels[1:])
    ws = weight.reshape([lead[i] for i in varying] + list(shape)).reshape(
        (v * shape[0],) + shape[1:]
    )
    y = func(xs, ws, None, groups=groups * v, **options)  # (s, v * out, *spatial')
    y = y.reshape((s, v, y.shape[1] // v) + y.shape[2:]).transpose(0, 1)
    y = y.reshape([batch[i] for i in varying + shared] + list(y.shape[2:]))
    order = varying + shared
    y = y.permute([order.index(i) for i in range(len(batch))] + inner)
    if bias is not None:
        y = y + bias.reshape(bias.shape + (1,) * spatial)
    return y


def _signs(like: torch.Tensor, spatial: int) -> torch.Tensor:
    """Random +-1 per leading index and channel of ``like`` (``(*batch, channels,
    *spatial)``; ``F.linear``: ``(*batch, features)``), broadcast over its spatial dims."""
    shape = like.shape[: like.dim() - spatial] + (1,) * spatial
    return torch.randint(0, 2, shape, dtype=like.dtype, device=like.device) * 2 - 1


class _WeightEstimator(PathwiseEstimator):
    """A pathwise draw of a factorized Normal weight, whose layer is computed per example:
    the layer at the weight's mean plus a subclass's ``perturbation(apply, spatial, x,
    weight, loc, scale)``, what the weight's randomness adds to the output per example
    (``apply(x, w)`` is the layer without bias)."""

    automatic = False
    priority = 1
    hint_when_refused = "; use 'pathwise' (a plain weight draw)"

    def why_not(self, fn) -> Optional[str]:
        base, _ = unwrap_independent(fn)
        if not isinstance(base, Normal):
            return f"{self.name} needs a factorized Normal weight, not {distribution_name(fn)}"
        return None

    def because(self, fn) -> str:
        return f"{distribution_name(fn)} weight"

    def layer(self, func, spatial: int, x, weight, loc, scale, args: tuple, kwargs: dict):
        """The layer ``func(x, weight, *args, **kwargs)`` computed this estimator's way, with
        ``loc``, ``scale`` the guide's parameters (broadcast to ``weight``'s shape): the
        layer at ``loc`` (with its bias) plus :meth:`perturbation`."""
        kwargs = dict(kwargs)
        bias = args[0] if args else kwargs.pop("bias", None)
        rest = args[1:]

        def apply(inputs, w):  # the layer without bias, its other arguments as given
            return func(inputs, w, None, *rest, **kwargs)

        mean = func(x, loc, bias, *rest, **kwargs)
        return mean + self.perturbation(apply, spatial, x, weight, loc, scale)


class Flipout(_WeightEstimator):
    name = "flipout"

    def note(self, fn, infer: dict) -> str:
        return (
            "flipout (Wen et al. 2018): each example's layer sees the draw's perturbation with "
            "its own random signs per input and output channel, the law of a weight draw: "
            "unbiased"
        )

    def perturbation(self, apply, spatial, x, weight, loc, scale):
        noise = apply(x * _signs(x, spatial), weight - loc)
        return noise * _signs(noise, spatial)


class LocalReparameterization(_WeightEstimator):
    name = "local_reparam"

    def note(self, fn, infer: dict) -> str:
        return (
            "local reparameterization (Kingma, Salimans & Welling 2015): exact for linear "
            "layers; in a convolution each output pixel is drawn independently, which changes "
            "the objective"
        )

    def perturbation(self, apply, spatial, x, weight, loc, scale):
        variance = apply(x * x, scale * scale)
        std = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
        # the output depends on the site: its provenance, on tracked steps, says so
        std = std + weight.detach().sum() * 0
        return std * torch.randn_like(std)


register(Flipout())
register(LocalReparameterization())
