"""Data loading: the embedded digits and user .npy/.npz arrays, with clear errors.

Every check here is exact (shapes, dtypes, values computed by hand from the stored integers).
"""

import numpy as np
import pytest
import torch

from pyro_reparam_conv.data import DIGITS_MAX, load_default_images, load_images


# ------------------------------------------------------------------ default data
def test_default_images_shape_range_and_labels():
    x, y = load_default_images()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    # pixels are integers 0..16 divided by 16: in [0, 1], both ends attained, on the 1/16 grid
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.equal(x * DIGITS_MAX, (x * DIGITS_MAX).round())
    assert set(y.tolist()) == set(range(10))


def test_default_images_subset_and_seeded_shuffle():
    x, y = load_default_images()
    x5, y5 = load_default_images(5)
    assert torch.equal(x5, x[:5]) and torch.equal(y5, y[:5])
    a, la = load_default_images(32, seed=3)
    b, lb = load_default_images(32, seed=3)
    c, _ = load_default_images(32, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="num_images must be in 1..1797"):
        load_default_images(0)


# ------------------------------------------------------------------ user files
def test_npy_three_dims_uint8_scaled_by_255(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = tmp_path / "imgs.npy"
    np.save(path, raw)
    x = load_images(path)
    assert x.shape == (2, 1, 3, 4) and x.dtype == torch.float32
    expected = torch.from_numpy(raw.astype(np.float32) / np.float32(255))[:, None]
    assert torch.equal(x, expected)


def test_npz_four_dims_float_used_as_is_and_key_selection(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((3, 2, 4, 4))
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=np.arange(3))
    x = load_images(path)  # "images" is chosen without a key
    assert x.shape == (3, 2, 4, 4)
    assert torch.equal(x, torch.from_numpy(images.astype(np.float32)))
    other = tmp_path / "one.npz"
    np.savez(other, pics=np.full((2, 4, 4), 16, dtype=np.uint8))
    # the sole array is taken; uint8 is divided by 255 unless scale= is given
    sixteen = np.float32(16) / np.float32(255)
    assert torch.equal(load_images(other), torch.full((2, 1, 4, 4), sixteen))
    assert torch.equal(load_images(other, scale=16), torch.ones(2, 1, 4, 4))


def test_explicit_scale_and_bool(tmp_path):
    path = tmp_path / "b.npy"
    np.save(path, np.array([[[True, False]]]))
    assert torch.equal(load_images(path), torch.tensor([[[[1.0, 0.0]]]]))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4)), r"expected images of shape \(N, H, W\) or \(N, C, H, W\), got 2 dim"),
        (np.zeros((1, 1, 1, 4, 4)), r"got 5 dimensions"),
        (np.array([["a", "b"]] * 2, dtype="U1")[None], r"dtype <U1 is not numeric"),
        (np.array([[[0.5, np.nan], [np.inf, 0.0]]]), r"1 NaN and 1 infinite values out of 4"),
        (np.zeros((0, 4, 4)), r"the array is empty"),
    ],
)
def test_npy_bad_arrays_raise_with_file_name(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message) as info:
        load_images(path)
    assert str(path) in str(info.value)


def test_npz_errors_name_file_and_key(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros((2, 4, 4)), b=np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\]; choose one with --key NAME"):
        load_images(path)
    with pytest.raises(ValueError, match=r"no array 'c'; it holds \['a', 'b'\]") as info:
        load_images(path, key="c")
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=r"\['b'\]: expected images .* got 2 dimensions") as info:
        load_images(path, key="b")
    assert str(path) in str(info.value)
    assert load_images(path, key="a").shape == (2, 1, 4, 4)


def test_wrong_suffix_missing_file_and_key_on_npy(tmp_path):
    path = tmp_path / "imgs.txt"
    path.write_text("0 1\n")
    with pytest.raises(ValueError, match=r"imgs.txt: unsupported file type '.txt'; use .npy"):
        load_images(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_images(tmp_path / "missing.npy")
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="a .npy file holds a single array"):
        load_images(npy, key="images")


def test_object_array_corrupt_file_and_bad_scale(tmp_path):
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([[[1, "a"]]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj.npy: cannot be read as a NumPy .npy file") as info:
        load_images(obj)
    assert "allow_pickle" not in str(info.value) and "Python objects" in str(info.value)
    text = tmp_path / "text.npy"  # not a NumPy file at all: no numpy advice about pickles
    text.write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"text.npy: cannot .* it does not begin as one does"):
        load_images(text)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"junk.npz: cannot be read as a NumPy .npz file"):
        load_images(junk)
    ok = tmp_path / "ok.npy"
    np.save(ok, np.zeros((1, 2, 2), dtype=np.uint8))
    for scale in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            load_images(ok, scale=scale)


@pytest.mark.parametrize(
    "array, scale, message",
    [
        (np.array([[[0.5, 1.5], [-0.25, 0.0]]]), None, r"2 of 4 pixel values .* -0.25 .. 1.5\)"),
        (
            np.array([[[0, 255], [-3, 7]]], dtype=np.int16),
            None,
            r"1 of 4 .* 32767 \(range found -9.1\d*e-05 .. 0.0077\d*\)",
        ),
        (np.array([[[0, 255], [3, 7]]], dtype=np.uint8), 100, r"1 of 4 .* after dividing by 100"),
    ],
    ids=["float", "signed-int", "scale"],
)
def test_pixels_outside_unit_range_are_counted_with_the_range(tmp_path, array, scale, message):
    path = tmp_path / "range.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message) as info:
        load_images(path, scale=scale)
    assert str(path) in str(info.value) and "rescale" in str(info.value)


def test_integer_pixels_in_range_after_scale_load(tmp_path):
    path = tmp_path / "ok.npy"
    np.save(path, np.array([[[0, 255], [3, 7]]], dtype=np.uint8))
    assert load_images(path, scale=255).max() == 1.0 and load_images(path).min() == 0.0


# ------------------------------------------------------------------ Fashion-MNIST
def write_idx(path, array, gz=True):
    """An idx file as LeCun's format has it (uint8 data, big-endian sizes)."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def fake_fashion_mnist(folder, n_train=5, n_test=3):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=False)  # either form
        arrays[prefix] = images, labels
    return arrays


def test_fashion_mnist_from_idx_files(tmp_path):
    from pyro_reparam_conv.data import load_fashion_mnist

    arrays = fake_fashion_mnist(tmp_path)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_fashion_mnist(split, path=tmp_path)
        images, labels = arrays[prefix]
        assert x.shape == (len(images), 784) and x.dtype == torch.float32
        assert torch.equal(x * 255, torch.from_numpy(images.reshape(len(images), -1)).float())
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("valid", path=tmp_path)


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    from pyro_reparam_conv.data import load_fashion_mnist

    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*path="):
        load_fashion_mnist("train", path=tmp_path)


def test_a_truncated_or_foreign_idx_file_is_an_error(tmp_path):
    from pyro_reparam_conv.data import read_idx

    write_idx(tmp_path / "ok", np.zeros((2, 3), np.uint8), gz=False)
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"short: 17 bytes do not hold an idx array of shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "npy").write_bytes(b"\x93NUMPY...")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "npy")


def test_dynamic_binarization_draws_afresh_with_the_pixel_as_probability():
    from pyro_reparam_conv.data import binarize

    x = torch.full((2000, 4), 0.3)
    a, b = binarize(x), binarize(x)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    assert abs(a.mean().item() - 0.3) < 0.02
    assert torch.equal(binarize(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))


def test_binarized_batches_are_one_seeded_sequence():
    from pyro_reparam_conv.data import binarized_batches

    images = torch.rand(30, 4)
    a = list(binarized_batches(images, 5, seed=3, steps=4))
    b = list(binarized_batches(images, 5, seed=3, steps=4))
    assert len(a) == 4 and all(x.shape == (5, 4) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g = torch.Generator().manual_seed(3)  # what it is: index, then binarize, one generator
    index = torch.randint(30, (5,), generator=g)
    assert torch.equal(a[0], torch.bernoulli(images[index], generator=g))
