"""Train the conv latent-variable model with SVI, see the routes, export to ArviZ.

The model (``ConvClusterVAE``) has a per-image cluster ``y`` (Categorical: no ``rsample``,
but a support of 10 values, so RoutedELBO sums over it exactly: route ``enumerate``) and a
latent map ``z`` (elementwise Normal from a conv encoder: pathwise). Pass
``y_infer={"estimator": "score"}`` (score function with a baseline) or
``z_infer={"estimator": "score"}`` to feel the difference.

Run:  python examples/train_conv_vae.py [--steps 300] [--out conv_vae_output]
A second run refuses to replace the first one's checkpoint: pass --resume to continue it
(with a larger --steps to train more) or --overwrite to start afresh.
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


def main(steps: int, out: Path, resume: bool = False, overwrite: bool = False) -> None:
    torch.set_num_threads(1)  # these small convolutions run fastest on one thread
    images, labels = load_default_images(512, seed=0)
    pyro.set_rng_seed(0)
    vae = ConvClusterVAE(image_shape=(1, 8, 8), latent_channels=4, num_classes=10)

    # Which estimator does each site get, and does every parameter receive a gradient?
    print(audit_gradients(vae.model, vae.guide, images[:64], num_data=len(images)))

    elbo = RoutedELBO()  # pathwise for z, the exact sum over its 10 values for y
    result = train(
        vae.model,
        vae.guide,
        images,
        steps=steps,
        batch_size=64,
        lr=3e-3,
        elbo=elbo,
        checkpoint_path=out / "checkpoint.pt",
        resume=resume,
        overwrite=overwrite,
        device="cpu",
    )
    if result.start_step:
        print(f"resumed {out / 'checkpoint.pt'} at step {result.start_step}")
    if result.step == result.start_step:
        print(f"nothing trained: the checkpoint is at step {result.step} (--steps {steps})")
        elbo.loss(vae.model, vae.guide, images[:64], num_data=len(images))  # for its routes
    else:
        print(f"trained steps {result.start_step + 1}..{result.step}")
    last = result.losses[-50:]
    print(f"ELBO/image (last {len(last)} steps): {-sum(last) / len(last) / len(images):.3f}")
    for route in elbo.routes.values():
        print(route)

    idata = to_inference_data(
        vae.model, vae.guide, images[:32], num_samples=200, seed=0, elbo_trace=result.losses
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

        # y is a cluster label: its mean over draws means nothing; show q(y | x) instead
        with torch.no_grad():
            y_logits, _, _ = vae.encode(images[:4])
        print("q(y | x) of images 0-3:\n", y_logits.softmax(-1).numpy().round(2))
        z0 = {"images": [0], "z_dim_1": [0]}  # image 0, channel 0 of the latent map
        print(az.summary(idata, var_names=["z"], coords=z0, kind="stats").head())
        # PSIS-LOO runs, but with a latent per image every Pareto k is high: leaving an image
        # out removes the only data its own z sees. Trust az.loo for global parameters.
        print(az.loo(idata))
    idata.to_netcdf(str(out / "posterior.nc"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("conv_vae_output"))
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    start.add_argument("--overwrite", action="store_true", help="replace it")
    args = parser.parse_args()
    if (args.out / "checkpoint.pt").exists() and not (args.resume or args.overwrite):
        parser.error(f"{args.out / 'checkpoint.pt'} exists: pass --resume or --overwrite")
    if args.resume and not (args.out / "checkpoint.pt").exists():
        parser.error(f"--resume: no checkpoint in {args.out}")
    main(args.steps, args.out, args.resume, args.overwrite)
