"""A Bayesian CNN on the embedded 8x8 digits (or Fashion-MNIST, 28x28, where Debian's
package ``fashion-mnist`` put its files): PyroSample weights, AutoNormal, RoutedELBO.

The conv and linear weights are ``pyro.nn.PyroSample`` sites with ``N(0, 1)`` priors; the
guide is Pyro's ``AutoNormal``. ``RoutedELBO`` checks on the first step how the model uses
each weight and, from the second step on, routes the conv weights to flipout and the
linear weight to local reparameterization (each example sees its own weight draw: less
gradient variance than one draw per batch), the biases stay plain pathwise draws; the
routes say why. After training: test accuracy and expected calibration error (15 bins) of
the posterior predictive, and ``to_inference_data`` of the weight posterior with its
predictive.

Run:  python examples/bayesian_cnn.py   (about a minute on one CPU thread)
      python examples/bayesian_cnn.py --fashion-mnist [--steps 3000]   (28x28 clothes)
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Predictive
from pyro.infer.autoguide import AutoNormal, init_to_sample
from pyro.nn import PyroModule, PyroSample

from pyro_reparam_conv import RoutedELBO, to_inference_data
from pyro_reparam_conv.data import load_default_images


def normal_prior(*shape):
    return PyroSample(dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))


class BayesianCNN(PyroModule):
    def __init__(self):
        super().__init__()
        self.conv1 = PyroModule[torch.nn.Conv2d](1, 8, 3, padding=1)
        self.conv2 = PyroModule[torch.nn.Conv2d](8, 16, 3, padding=1)
        self.fc = PyroModule[torch.nn.Linear](16, 10)
        for layer in (self.conv1, self.conv2, self.fc):
            layer.weight = normal_prior(*layer.weight.shape)
            layer.bias = normal_prior(*layer.bias.shape)

    def forward(self, x, y=None, total=None):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        logits = self.fc(F.relu(self.conv2(h)).mean((-1, -2)))
        total = total or x.shape[0]  # the likelihood of a minibatch scaled to the data set
        with pyro.plate("data", total, subsample=torch.arange(x.shape[0])):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits


#: where Debian's ``fashion-mnist`` package installs the data set (idx files, gzipped)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's format: zero bytes, a type code, the number of dims, each dim as
    a big-endian int32, then the data), gzipped, of unsigned bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\0\0\x08":
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(folder: Path = FASHION_MNIST, train: int = 10000, test: int = 1000):
    """``(x_train, y_train, x_test, y_test)``: the first ``train`` / ``test`` images of
    Fashion-MNIST's training and test sets, ``(N, 1, 28, 28)`` in [0, 1]."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no Fashion-MNIST (apt install fashion-mnist)")
    found = []
    for part, n in (("train", train), ("t10k", test)):
        images = _idx(folder / f"{part}-images-idx3-ubyte.gz")[:n]
        labels = _idx(folder / f"{part}-labels-idx1-ubyte.gz")[:n]
        found += [torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255,
                  torch.tensor(labels, dtype=torch.long)]  # fmt: skip
    return tuple(found)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15):
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += (
                inside.float().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
            )
    return ece.item()


def main(
    steps: int = 3000, batch: int = 64, num_samples: int = 100, seed: int = 0,
    fashion_mnist: bool = False,
) -> dict:  # fmt: skip
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if fashion_mnist:
        x_train, y_train, x_test, y_test = load_fashion_mnist()
    else:
        images, labels = load_default_images(seed=seed)
        x_train, y_train = images[:1500], labels[:1500]
        x_test, y_test = images[1500:], labels[1500:]

    model = BayesianCNN()
    # means start at a prior draw: at the prior's median (0) every unit is the same
    guide = AutoNormal(model, init_loc_fn=init_to_sample, init_scale=0.05)
    elbo = RoutedELBO()  # flipout / local reparameterization where the first step proves them
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for step in range(steps):
        index = torch.randint(0, len(x_train), (batch,))
        loss = svi.step(x_train[index], y_train[index], total=len(x_train))
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss:10.1f}")
    print("\nroutes:")
    for route in elbo.routes.values():
        print(f"  {route}")

    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["_RETURN"])
    with torch.no_grad():
        probs = predictive(x_test)["_RETURN"].softmax(-1).mean(0)
    accuracy = (probs.argmax(-1) == y_test).float().mean().item()
    ece = expected_calibration_error(probs, y_test)
    print(f"\ntest accuracy {accuracy:.3f}, expected calibration error {ece:.3f} "
          f"({len(x_test)} images, {num_samples} posterior draws)")  # fmt: skip

    data = to_inference_data(model, guide, x_test, y_test, num_samples=num_samples, seed=seed)
    print(f"\n{data}")
    weights = data.posterior["conv1.weight"]
    print(f"conv1.weight posterior: dims {dict(weights.sizes)}, "
          f"mean sd {float(weights.std(('chain', 'draw')).mean()):.3f}")  # fmt: skip
    return {"accuracy": accuracy, "ece": ece, "routes": dict(elbo.routes), "data": data}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--fashion-mnist", action="store_true",
                        help=f"Fashion-MNIST from {FASHION_MNIST} instead of the digits")
    options = parser.parse_args()
    main(steps=options.steps, fashion_mnist=options.fashion_mnist)
