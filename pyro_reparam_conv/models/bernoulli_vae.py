"""The VAE with 200 Bernoulli latents of the discrete-estimator protocol, as plain Pyro.

Generative model for binarized images ``x`` (``B, 784``), with ``h = 200`` latents::

    b_n ~ Bernoulli(logits = prior_logits)                  (h,), learned prior logits
    x_n ~ Bernoulli(logits = decoder(b_n))                  (784,)

and guide ``q(b_n | x_n) = Bernoulli(logits = encoder(x_n - mean))``. ``"linear"``: encoder
and decoder are one affine map each (784-200-784); ``"nonlinear"``: two hidden layers of 200
LeakyReLU(0.3) units each way (Yin & Zhou 2019, ARM; Dong, Mnih & Tucker 2020, DisARM, whose
experiment code this follows: the encoder sees the input less the training mean, and the
decoder's output bias starts at the logit of that mean).

The model and guide are plain Pyro (``pyro.plate("data")`` over the batch, the latent vector
``.to_event(1)``), so ``Trace_ELBO``, ``TraceGraph_ELBO`` and
:class:`~pyro_reparam_conv.RoutedELBO` train it unchanged; the latent site's ``infer`` dict is
``b_infer`` (e.g. ``{"estimator": "arms", "evaluations": 4}``). Both broadcast over extra
leading dims, as values side by side and vectorized particles need.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn

__all__ = ["BernoulliVAE"]

ARCHITECTURES = ("linear", "nonlinear")


def _network(sizes: list[int]) -> nn.Sequential:
    """Affine maps between ``sizes`` with LeakyReLU(0.3) between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.LeakyReLU(0.3))
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class BernoulliVAE(PyroModule):
    """:meth:`model` ``p(x, b)`` and :meth:`guide` ``q(b | x)`` of the protocol's VAE.

    :param arch: ``"linear"`` (784-200-784) or ``"nonlinear"`` (two hidden layers of 200).
    :param mean: the training images' mean pixel (``(784,)``), subtracted from the encoder's
        input and used for the decoder's initial output bias; default 0.5 everywhere.
    :param b_infer: the latent site's ``infer`` dict.
    """

    def __init__(
        self,
        arch: str = "linear",
        mean: Optional[torch.Tensor] = None,
        num_latents: int = 200,
        num_pixels: int = 784,
        hidden: int = 200,
        b_infer: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        inner = [hidden, hidden] if arch == "nonlinear" else []
        self.encoder = _network([num_pixels, *inner, num_latents])
        self.decoder = _network([num_latents, *inner, num_pixels])
        mean = torch.full((num_pixels,), 0.5) if mean is None else mean.reshape(num_pixels)
        self.register_buffer("mean", mean.clone().float())
        with torch.no_grad():
            self.decoder[-1].bias.copy_(torch.logit(self.mean.clamp(1e-3, 1 - 1e-3)))
        self.prior_logits = PyroParam(torch.zeros(num_latents))
        self.arch = arch
        self.b_infer = dict(b_infer or {})

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        prior = dist.Bernoulli(logits=self.prior_logits)
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", prior.expand([x.shape[0], *prior.batch_shape]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(b)).to_event(1), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        logits = self.encoder(x - self.mean)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1), infer=self.b_infer)

    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``log p(x, b_s) - log q(b_s | x)`` for ``num_samples`` draws ``b_s ~ q`` per image:
        ``(num_samples, B)``, without gradients."""
        with torch.no_grad():
            q = dist.Bernoulli(logits=self.encoder(x - self.mean)).to_event(1)
            b = q.sample((num_samples,))
            prior = dist.Bernoulli(logits=self.prior_logits).to_event(1)
            lik = dist.Bernoulli(logits=self.decoder(b)).to_event(1)
            return prior.log_prob(b) + lik.log_prob(x) - q.log_prob(b)

    def bound(self, x: torch.Tensor, num_samples: int = 100) -> torch.Tensor:
        """The ``num_samples``-sample importance-weighted bound on ``log p(x)`` per image
        (Burda, Grosse & Salakhutdinov 2016); ``num_samples=1`` is an ELBO estimate."""
        w = self.log_weights(x, num_samples)
        return torch.logsumexp(w, 0) - torch.log(torch.tensor(float(num_samples)))
