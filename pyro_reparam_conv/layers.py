"""Stochastic convolution layers: (mean, var) -> z ~ N(mean, var) elementwise -> conv(z).

Inside a Pyro model or guide the draw of ``z`` is a named ``pyro.sample`` site with
``Normal(mean, sqrt(var)).to_event(3)`` (channels, height, width form the event; leading
dims belong to the caller's plates), so inference sees it and any site-level ``infer``
options (for example ``{"estimator": "score"}``) apply. Outside Pyro the layer is a plain
torch module drawing the reparameterized sample ``z = mean + sqrt(var) * eps``, whose
gradient reaches ``mean``, ``var`` and everything upstream of them (Kingma & Welling, 2014).
"""

from __future__ import annotations

from typing import Any, Optional

import pyro
import torch
from pyro.nn import PyroModule
from pyro.poutine.runtime import am_i_wrapped, get_plates
from torch import nn

from .sampling import Parameterization, elementwise_normal

__all__ = [
    "ConvBlock",
    "ConvDecoder",
    "ConvEncoder",
    "GaussianConvHead",
    "StochasticConv2d",
    "sample_elementwise_normal",
]


def _event_dims(value_shape: torch.Size) -> int:
    """Trailing (C, H, W) are the event; leading dims stay batch dims only under a plate.

    A leading dim of size > 1 that no enclosing vectorized plate covers is folded into the
    event, so a layer used without ``pyro.plate`` still gives a valid site.
    """
    event_dim = min(3, len(value_shape))
    plate_dims = {f.dim for f in get_plates() if f.vectorized}
    batch_shape = value_shape[: len(value_shape) - event_dim]
    for offset, size in enumerate(reversed(batch_shape), start=1):
        if size != 1 and -offset not in plate_dims:
            return len(value_shape)
    return event_dim


def sample_elementwise_normal(
    name: str,
    mean: torch.Tensor,
    var: torch.Tensor,
    parameterization: Parameterization = "variance",
    *,
    infer: Optional[dict] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Draw ``z ~ Normal(mean, sqrt(var))`` elementwise, as Pyro site ``name`` when under Pyro.

    Argument errors name the site, e.g. ``"z.var must be strictly positive ..."``.
    """
    fn = elementwise_normal(
        mean,
        var,
        parameterization,
        validate=validate,
        mean_name=f"{name}.mean",
        var_name=f"{name}.var",
    )
    if not am_i_wrapped():
        return fn.rsample()
    shape = torch.broadcast_shapes(mean.shape, var.shape)
    if fn.batch_shape != shape:
        fn = fn.expand(shape)
    return pyro.sample(name, fn.to_event(_event_dims(shape)), infer=dict(infer or {}))


class StochasticConv2d(PyroModule):
    """``forward(mean, var) = conv2d(z)`` with ``z ~ Normal(mean, sqrt(var))`` elementwise.

    :param in_channels, out_channels, kernel_size: as :class:`torch.nn.Conv2d`; every other
        ``Conv2d`` keyword (stride, padding, dilation, groups, bias, padding_mode, dtype,
        device) is passed through ``conv_kwargs``.
    :param name: the Pyro sample site name of ``z``; defaults to ``"<module path>.z"``.
        Give the model's and the guide's layers the same name when they share a latent.
    :param parameterization: how ``var`` encodes the variance: ``"variance"``,
        ``"softplus"`` or ``"log"`` (see :mod:`pyro_reparam_conv.sampling`).
    :param infer: the site's ``infer`` dict, e.g. ``{"estimator": "score"}``.
    :param validate: override the global validation switch for this layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        name: Optional[str] = None,
        parameterization: Parameterization = "variance",
        infer: Optional[dict] = None,
        validate: Optional[bool] = None,
        **conv_kwargs: Any,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.site_name = name
        self.parameterization = parameterization
        self.infer = dict(infer or {})
        self.validate = validate

    @property
    def name(self) -> str:
        return self.site_name or self._pyro_get_fullname("z")

    def sample(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Draw ``z`` (the sample site) without applying the convolution."""
        return sample_elementwise_normal(
            self.name,
            mean,
            var,
            self.parameterization,
            infer=self.infer,
            validate=self.validate,
        )

    def forward(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return self.conv(self.sample(mean, var))


class GaussianConvHead(PyroModule):
    """Two parallel convolutions giving ``(mean, var)`` with ``var = softplus(.) + min_var``.

    The building block an amortized conv guide uses to output an elementwise Gaussian.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        *,
        min_var: float = 1e-6,
        **conv_kwargs: Any,
    ) -> None:
        super().__init__()
        conv_kwargs.setdefault("padding", "same")
        self.mean = nn.Conv2d(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.raw_var = nn.Conv2d(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.min_var = min_var

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(h), nn.functional.softplus(self.raw_var(h)) + self.min_var


class ConvBlock(nn.Sequential):
    """``SiLU(GroupNorm(conv(x)))``: a 3x3 convolution (stride 1 keeps H, W; 2 halves them)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        groups = 8 if out_channels % 8 == 0 else 1
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
        )


class ConvEncoder(nn.Sequential):
    """Images ``(B, C, H, W)`` -> features ``(B, hidden, H / 2^d, W / 2^d)``
    (``d = num_downsamples``).

    One stride-1 :class:`ConvBlock`, then ``d`` stride-2 blocks. The body of an amortized
    guide: heads such as :class:`GaussianConvHead` turn the features into ``(mean, var)``.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int = 32, num_downsamples: int = 1
    ) -> None:
        blocks = [ConvBlock(in_channels, hidden_channels)]
        blocks += [
            ConvBlock(hidden_channels, hidden_channels, stride=2) for _ in range(num_downsamples)
        ]
        super().__init__(*blocks)


class ConvDecoder(nn.Sequential):
    """Latent map ``(B, Cz, h, w)`` -> per-pixel outputs ``(B, C, h 2^d, w 2^d)``.

    Mirror of :class:`ConvEncoder`: a :class:`ConvBlock`, ``d`` upsampling stages
    (``ConvTranspose2d(k=4, s=2, p=1)`` doubling H and W, then a block), and a final 3x3
    convolution giving unconstrained values (e.g. the logits of a pixel likelihood).
    """

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        hidden_channels: int = 32,
        num_upsamples: int = 1,
    ) -> None:
        layers: list[nn.Module] = [ConvBlock(latent_channels, hidden_channels)]
        for _ in range(num_upsamples):
            layers.append(
                nn.ConvTranspose2d(hidden_channels, hidden_channels, 4, stride=2, padding=1)
            )
            layers.append(ConvBlock(hidden_channels, hidden_channels))
        layers.append(nn.Conv2d(hidden_channels, out_channels, 3, padding=1))
        super().__init__(*layers)
