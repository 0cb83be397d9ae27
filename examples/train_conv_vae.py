"""Train the conv latent-variable model with SVI, see the routes, export to ArviZ.

The model (``ConvClusterVAE``) has a per-image cluster ``y`` (Categorical: no ``rsample``,
so RoutedELBO gives it the score-function gradient with a baseline) and a latent map ``z``
(elementwise Normal from a conv encoder: pathwise). Swap ``z_infer`` to
``{"estimator": "score"}`` to feel the difference.

Run:  python examples/train_conv_vae.py [--steps 300] [--out conv_vae_output]
"""

import argparse
import warnings
from pathlib import Path

import pyro
import torch

from pyro_reparam_conv import RoutedELBO, audit_gradients, to_inference_data
from pyro_reparam_conv.data import load_default_images
from pyro_reparam_conv.models import ConvClusterVAE
from pyro_reparam_conv.train import train


def main(steps: int, out: Path) -> None:
    torch.set_num_threads(1)  # these small convolutions run fastest on one thread
    images, labels = load_default_images(512, seed=0)
    pyro.set_rng_seed(0)
    vae = ConvClusterVAE(image_shape=(1, 8, 8), latent_channels=4, num_classes=10)

    # Which estimator does each site get, and does every parameter receive a gradient?
    print(audit_gradients(vae.model, vae.guide, images[:64], num_data=len(images)))

    elbo = RoutedELBO()  # pathwise for z, score function + decaying-average baseline for y
    result = train(
        vae.model,
        vae.guide,
        images,
        steps=steps,
        batch_size=64,
        lr=3e-3,
        elbo=elbo,
        checkpoint_path=out / "checkpoint.pt",
        resume=True,
        device="cpu",
    )
    print(f"ELBO/image (last 50 steps): {-sum(result.losses[-50:]) / 50 / len(images):.3f}")
    for route in elbo.routes.values():
        print(route)

    idata = to_inference_data(
        vae.model, vae.guide, images[:32], num_samples=200, seed=0, elbo_trace=result.losses
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

        print(az.summary(idata, var_names=["y"], kind="stats").head())
        # PSIS-LOO runs, but with a latent per image every Pareto k is high: leaving an image
        # out removes the only data its own z sees. Trust az.loo for global parameters.
        print(az.loo(idata))
    idata.to_netcdf(str(out / "posterior.nc"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("conv_vae_output"))
    args = parser.parse_args()
    main(args.steps, args.out)
