import numpy as np
import pytest
import torch
from PIL import Image

from tscpurify.data import load_dataset, select_clean_subset
from tscpurify.data.augment import random_crop_flip
from tscpurify.errors import DataError, SettingsError
from tscpurify.evaluation import Metrics  # noqa: F401  (import check of the metrics module)

from ..conftest import synthetic_images


def test_idx_round_trip(fmnist_root):
    train = load_dataset("fashion-mnist", "train", fmnist_root)
    test = load_dataset("fashion-mnist", "test", fmnist_root)
    assert train.images.shape == (600, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 200 and train.num_classes == 10
    images, labels = synthetic_images(600, 10, 28, 1, 0)
    assert torch.equal(train.images[:, 0], torch.from_numpy(images[:, 0]))
    assert torch.equal(train.labels, torch.from_numpy(labels).long())


def test_missing_fashion_mnist_names_the_apt_package(tmp_path, monkeypatch):
    from tscpurify.data import images as images_module

    monkeypatch.setattr(images_module, "FASHION_MNIST_ROOT", tmp_path)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_truncated_idx_is_rejected(fmnist_root, tmp_path):
    import gzip

    def read(name):
        with gzip.open(fmnist_root / name) as handle:
            return handle.read()

    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        data = read(name)[:-10] if "images" in name else read(name)
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write(data)
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", "train", tmp_path)


def test_cifar10_binary(tmp_path):
    images, labels = synthetic_images(50, 10, 32, 3, 2)
    records = np.concatenate([labels[:, None], images.reshape(50, -1)], axis=1).astype(np.uint8)
    records[:30].tofile(tmp_path / "data_batch_1.bin")
    records[30:40].tofile(tmp_path / "data_batch_2.bin")
    records[40:].tofile(tmp_path / "test_batch.bin")
    train = load_dataset("cifar10", "train", tmp_path)
    test = load_dataset("cifar10", "test", tmp_path)
    assert train.images.shape == (40, 3, 32, 32) and len(test) == 10
    assert torch.equal(train.images, torch.from_numpy(images[:40]))
    assert torch.equal(test.labels, torch.from_numpy(labels[40:]).long())
    (tmp_path / "bad").mkdir()
    np.zeros(100, np.uint8).tofile(tmp_path / "bad" / "data_batch_1.bin")
    with pytest.raises(DataError, match="not a CIFAR-10 binary batch"):
        load_dataset("cifar10", "train", tmp_path / "bad")


def test_image_folder(tmp_path):
    images, labels = synthetic_images(12, 3, 16, 3, 3)
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:03d}{suffix}", quality=100)
    data = load_dataset("folder", "train", tmp_path)
    assert data.classes == ("class_0", "class_1", "class_2")
    assert data.images.shape == (12, 3, 16, 16)
    png = [i for i in range(12) if i % 2]
    # PNG is lossless: the pixels of a PNG file come back exactly.
    order = np.argsort(labels, kind="stable")
    for position, index in enumerate(order):
        if index in png:
            assert torch.equal(data.images[position], torch.from_numpy(images[index]))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", "train", tmp_path / "nowhere")
    # What tools leave behind is not data: a hidden folder among the classes (Jupyter), a
    # hidden non-image among the images (macOS resource files named ._*.png).
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "test" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "class_0" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    again = load_dataset("folder", "train", tmp_path)
    assert again.classes == data.classes and torch.equal(again.images, data.images)


def test_clean_subset_is_stratified_seeded_and_exact():
    labels = torch.arange(1000) % 10
    a = select_clean_subset(labels, 0.05, seed=0)
    b = select_clean_subset(labels, 0.05, seed=0)
    c = select_clean_subset(labels, 0.05, seed=1)
    assert len(a) == 50 and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(labels[a], minlength=10).tolist() == [5] * 10
    assert len(select_clean_subset(labels, 123, seed=0)) == 123
    with pytest.raises(SettingsError):
        select_clean_subset(labels, 0, seed=0)
    with pytest.raises(SettingsError):
        select_clean_subset(labels, 5000, seed=0)


def test_crop_flip_keeps_shape_and_moves_content():
    x = torch.rand(64, 1, 10, 10)
    y = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert not torch.equal(x, y)
    # With no padding and no flip it is the identity.
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
