"""Ready conv latent-variable models with their amortized guides."""

from .bernoulli_vae import BernoulliVAE
from .conv_cluster_vae import ConvClusterVAE

__all__ = ["BernoulliVAE", "ConvClusterVAE"]
