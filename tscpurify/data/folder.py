"""An image folder: one sub-folder per class holding PNG/JPEG files (read with Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .images import ImageData

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}


def visible(folder: Path) -> list[Path]:
    """A folder's entries but hidden ones: tools leave `.ipynb_checkpoints/` among the class
    folders and macOS `._name.png` resource files among the images, and neither is data."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_folders(root: Path) -> list[str]:
    """The class names of an image folder: its visible sub-folders, sorted."""
    return [p.name for p in visible(root) if p.is_dir()]


def load_image_folder(root: Path) -> ImageData:
    """Classes are the sorted visible sub-folder names (hidden ones are skipped, as are hidden
    files); all images must share one size and mode."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = class_folders(root)
    if not classes:
        raise DataError(f"{root} has no class sub-folders")
    images, labels, first_shape, mode = [], [], None, None
    for label, name in enumerate(classes):
        files = visible(root / name)
        if not any(p.suffix.lower() in EXTENSIONS for p in files):
            raise DataError(f"class folder {root / name} holds no images "
                            f"({', '.join(sorted(EXTENSIONS))}); remove it or add images")
        for path in files:
            if path.suffix.lower() not in EXTENSIONS:
                continue
            try:
                with Image.open(path) as img:
                    # The first image fixes grey or colour for the whole folder.
                    mode = mode or ("L" if img.mode in ("L", "1", "I", "I;16") else "RGB")
                    array = np.asarray(img.convert(mode))
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"cannot read image {path}: {err}") from None
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            if first_shape is None:
                first_shape = array.shape
            if array.shape != first_shape:
                raise DataError(f"{path} has shape {array.shape}, the first image had "
                                f"{first_shape}; resize the folder to one size first")
            images.append(array)
            labels.append(label)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {root}")
    return ImageData(torch.from_numpy(np.stack(images)).contiguous(), torch.tensor(labels),
                     tuple(classes))
