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

__all__ = ["DEFAULT_DATA", "load_default_images", "load_images", "as_image_tensor"]

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
