"""Ready conv latent-variable models with their amortized guides."""

from .conv_cluster_vae import ConvClusterVAE

__all__ = ["ConvClusterVAE"]
