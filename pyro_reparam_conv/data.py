"""The embedded default image data set and loaders for the user's own image arrays.

Default data: the 8x8 handwritten digits of the UCI "Optical Recognition of Handwritten
Digits" data set (E. Alpaydin, C. Kaynak, 1998; https://doi.org/10.24432/C50P49), licensed
CC BY 4.0, as redistributed in scikit-learn's ``sklearn/datasets/data/digits.csv.gz``:
1797 grey-scale images with integer pixels 0..16 and their digit labels 0..9. It ships in
``data_files/digits.npz`` (``images`` uint8 (1797, 8, 8), ``labels`` uint8 (1797,)), so
nothing is downloaded at run time.

User data (:func:`load_images`): a ``.npy`` array or one array of a ``.npz`` archive, of shape

- ``(N, H, W)``: single-channel images, or
- ``(N, C, H, W)``: channels first (PyTorch's layout), ``C`` anything.

Fashion-MNIST (:func:`load_fashion_mnist`): the four idx files of Xiao, Rasul & Vollgraf
2017 ("Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms",
MIT licence), as Debian's ``dataset-fashion-mnist`` package installs them under
``/usr/share/datasets/fashion-mnist`` (gzipped or not), or from a folder the caller gives.
:func:`binarize` is the dynamic binarization of the discrete-latent VAE protocol (a fresh
``x ~ Bernoulli(pixel)`` every time a batch is used; Dong, Mnih & Tucker 2020).

Channels-last ``(N, H, W, C)`` is *not* guessed (an 8x8 image with 3 channels and a 3x8
image with 8 channels look alike); transpose it yourself with ``np.moveaxis(a, -1, 1)``.
Integer and boolean arrays are divided by their dtype's maximum (uint8: 255) unless
``scale`` is given; float arrays are used as they are (or divided by ``scale``). Pixel
values must then lie in ``[0, 1]`` (the models' likelihood is a density on ``[0, 1]``): values
outside are an error that counts them and gives the range found. Images come back as float32
``(N, C, H, W)`` tensors.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_DATA",
    "FASHION_MNIST_DIR",
    "as_image_tensor",
    "binarize",
    "binarized_batches",
    "load_default_images",
    "load_fashion_mnist",
    "load_images",
    "read_idx",
]

DEFAULT_DATA = "digits.npz"
DIGITS_MAX = 16  # pixel values of the UCI digits are integers 0..16

PathLike = Union[str, Path]


def _data_file(name: str) -> Path:
    return Path(str(resources.files("pyro_reparam_conv").joinpath("data_files", name)))


def load_default_images(
    num_images: Optional[int] = None, *, seed: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded 8x8 digits as ``(images, labels)``.

    ``images`` is float32 ``(N, 1, 8, 8)`` in ``[0, 1]`` (raw value / 16), ``labels`` int64
    ``(N,)``. ``num_images`` keeps the first ``N`` (after a shuffle when ``seed`` is given).
    """
    with np.load(_data_file(DEFAULT_DATA)) as archive:
        images = archive["images"]
        labels = archive["labels"].astype(np.int64)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(images))
        images, labels = images[order], labels[order]
    if num_images is not None:
        if not 1 <= num_images <= len(images):
            raise ValueError(f"num_images must be in 1..{len(images)}, got {num_images}")
        images, labels = images[:num_images], labels[:num_images]
    x = torch.from_numpy(images.astype(np.float32) / DIGITS_MAX).unsqueeze(1)
    return x, torch.from_numpy(labels)


def as_image_tensor(array: np.ndarray, where: str, scale: Optional[float] = None) -> torch.Tensor:
    """Validate ``array`` as images and return float32 ``(N, C, H, W)``.

    ``where`` names the source in error messages (file and key). Raises ``ValueError`` for a
    wrong number of dimensions, an empty array, a non-numeric dtype, NaN/Inf values or pixel
    values outside ``[0, 1]`` after scaling.
    """
    if array.dtype.kind not in "buif":
        raise ValueError(f"{where}: dtype {array.dtype} is not numeric; images must be numbers")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim != 4:
        raise ValueError(
            f"{where}: expected images of shape (N, H, W) or (N, C, H, W), got "
            f"{array.ndim} dimensions {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"{where}: the array is empty (shape {array.shape})")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            n_nan = int(np.isnan(array).sum())
            raise ValueError(
                f"{where}: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values out of "
                f"{array.size}; every pixel must be finite"
            )
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"{where}: scale must be a finite positive number, got {scale!r}")
    if scale is None:
        scale = (
            1.0
            if array.dtype.kind in "f"
            else float(1 if array.dtype.kind == "b" else np.iinfo(array.dtype).max)
        )
    images = np.ascontiguousarray(array, dtype=np.float32) / np.float32(scale)
    _check_unit_range(images, where, scale)
    return torch.from_numpy(images)


def _check_unit_range(images: np.ndarray, where: str, scale: float) -> None:
    outside = int(((images < 0) | (images > 1)).sum())
    if outside:
        low, high = float(images.min()), float(images.max())
        scaled = f" after dividing by {scale:g}" if scale != 1 else ""
        raise ValueError(
            f"{where}: {outside} of {images.size} pixel values lie outside [0, 1]{scaled} "
            f"(range found {low:g} .. {high:g}); images must be in [0, 1]: rescale them, e.g. "
            "divide by their maximum (command line: --scale MAX; Python: scale=MAX)"
        )


#: the first bytes of each format: NumPy's .npy header, a zip archive (.npz)
_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def _np_load(path: Path):
    """``np.load`` without pickle; a file that is not a NumPy array/archive (or holds Python
    objects) is reported as a ``ValueError`` naming the file."""
    magic = _MAGIC.get(path.suffix.lower())
    with open(path, "rb") as f:
        start = f.read(len(magic or b""))
    if magic and start != magic:
        raise ValueError(
            f"{path}: cannot be read as a NumPy {path.suffix} file: it does not begin as one "
            f"does (write it with numpy.{'save' if path.suffix.lower() == '.npy' else 'savez'})"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        why = "it holds Python objects, not numbers" if "allow_pickle" in str(err) else err
        raise ValueError(f"{path}: cannot be read as a NumPy {path.suffix} file ({why})") from err


def load_images(
    path: PathLike, key: Optional[str] = None, *, scale: Optional[float] = None
) -> torch.Tensor:
    """Load images from a ``.npy`` file or the array ``key`` of a ``.npz`` archive.

    Without ``key`` a ``.npz`` must hold exactly one array (or one named ``images``).
    Returns float32 ``(N, C, H, W)``; see the module docstring for layouts and scaling.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise ValueError(f"{path}: key={key!r} given, but a .npy file holds a single array")
        array, where = _np_load(path), str(path)
    elif suffix == ".npz":
        with _np_load(path) as archive:
            names = list(archive.files)
            if key is None:
                if "images" in names:
                    key = "images"
                elif len(names) == 1:
                    key = names[0]
                else:
                    raise ValueError(
                        f"{path}: holds arrays {names}; choose one with --key NAME (command "
                        "line) or key=NAME (load_images)"
                    )
            if key not in names:
                raise ValueError(f"{path}: no array {key!r}; it holds {names}")
            where = f"{path}[{key!r}]"
            try:
                array = archive[key]
            except ValueError as err:  # e.g. an object array, which needs pickle
                raise ValueError(f"{where}: cannot be read as a numeric array ({err})") from err
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .npy or .npz")
    return as_image_tensor(array, where, scale)


#: where Debian's ``dataset-fashion-mnist`` package installs the idx files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """The array of an idx file (LeCun's MNIST format: two zero bytes, a type code, the number
    of dims, the big-endian sizes, the data), gzipped or not."""
    import gzip

    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (it does not begin with 0, 0, a type code)")
    ndim = raw[3]
    sizes = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(sizes))
    if len(raw) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw)} bytes do not hold an idx array of shape {sizes}")
    return np.frombuffer(raw, dtype, count, offset=4 + 4 * ndim).reshape(sizes)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST: no {stem}(.gz) in {folder}; install Debian's package with "
        "`apt-get install dataset-fashion-mnist` (it puts the four idx files in "
        f"{FASHION_MNIST_DIR}), or pass path=FOLDER holding train-images-idx3-ubyte(.gz), "
        "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)"
    )


def load_fashion_mnist(
    split: str = "train", path: Optional[PathLike] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's ``split`` (``"train"``: 60000 images, ``"test"``: 10000) as
    ``(images, labels)``: float32 ``(N, 784)`` grey levels in ``[0, 1]`` (byte / 255) and
    int64 ``(N,)``. ``path``: the folder of the idx files (default
    :data:`FASHION_MNIST_DIR`); a missing file says how to install them."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(path) if path is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"Fashion-MNIST in {folder}: images of shape {images.shape} and labels of shape "
            f"{labels.shape} do not match (expected (N, 28, 28) and (N,))"
        )
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def binarize(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dynamic binarization: ``x ~ Bernoulli(images)``, a fresh draw at every call."""
    return torch.bernoulli(images, generator=generator)


def binarized_batches(images: torch.Tensor, batch_size: int, seed: int, steps: int):
    """``steps`` batches of ``batch_size`` images drawn with replacement and dynamically
    binarized, from one generator seeded with ``seed``: the same sequence for every
    estimator compared (``benchmarks/bernoulli_vae.py`` and its storchastic rows)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        yield binarize(images[index], generator)
