"""ImageData, the in-memory form every loader returns, and `load_dataset` by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..errors import DataError


@dataclass(frozen=True)
class ImageData:
    """A labelled image set: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def floats(self) -> torch.Tensor:
        """Pixels in [0, 1], float32."""
        return self.images.float().div_(255)

    def subset(self, indices: torch.Tensor) -> ImageData:
        return ImageData(self.images[indices], self.labels[indices], self.classes)

    def tensor_dataset(self, labels: bool = True) -> TensorDataset:
        """A torch Dataset of float pixels (and labels unless `labels=False`)."""
        if labels:
            return TensorDataset(self.floats(), self.labels)
        return TensorDataset(self.floats())


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "cifar10", "folder")


def dataset_key(name: str) -> str:
    """The loader a data set name selects ('fashion-mnist', 'cifar10' or 'folder'), aliases
    and case folded; an unknown name fails here, before anything else is done with it."""
    key = name.lower().replace("_", "-")
    aliases = {"fmnist": "fashion-mnist", "cifar-10": "cifar10"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choices: {', '.join(DATASETS)}")
    return key


def load_dataset(name: str, split: str = "train", root: str | Path | None = None) -> ImageData:
    """Load a data set by name: 'fashion-mnist', 'cifar10' (binary batches) or 'folder'.

    `split` is 'train' or 'test'. For 'folder', `root` holds `train/` and `test/`
    sub-folders, each with one sub-folder per class.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    key = dataset_key(name)
    if key == "fashion-mnist":
        from .idx import load_idx_pair

        base = Path(root) if root else FASHION_MNIST_ROOT
        prefix = "train" if split == "train" else "t10k"
        images, labels = load_idx_pair(
            base / f"{prefix}-images-idx3-ubyte.gz", base / f"{prefix}-labels-idx1-ubyte.gz",
            hint="install it with: apt-get install -y dataset-fashion-mnist" if root is None
            else "",
        )
        return ImageData(images.unsqueeze(1), labels, FASHION_MNIST_CLASSES)
    if key == "cifar10":
        from .cifar import load_cifar10

        if root is None:
            raise DataError("cifar10 needs --data-root: the folder holding data_batch_*.bin")
        return load_cifar10(Path(root), split)
    if key == "folder":
        from .folder import class_folders, load_image_folder

        if root is None:
            raise DataError("folder needs --data-root: a folder with train/ and test/ "
                            "class folders")
        other = Path(root) / ("test" if split == "train" else "train")
        data = load_image_folder(Path(root) / split)
        if other.is_dir():
            theirs = class_folders(other)
            if list(data.classes) != theirs:
                raise DataError(f"{Path(root) / split} has classes {list(data.classes)} but "
                                f"{other} has {theirs}; labels are numbered by class folder, "
                                f"so both splits need the same class folders")
        return data
    raise AssertionError(key)  # dataset_key admits only the loaders above


def dataset_folders(name: str, root: str | Path | None) -> list[Path]:
    """The folders a data set is read from as a whole, which an output must never go into:
    an image folder's splits, where a new folder is a new class (and every later load fails).
    The other loaders read named files only, so a folder beside them harms nothing."""
    if name.lower() == "folder" and root:
        return [Path(root) / "train", Path(root) / "test"]
    return []
