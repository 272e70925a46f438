"""IDX files (MNIST / Fashion-MNIST format), optionally gzipped, read with numpy."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# The largest IDX payload read (4 GiB): the header's declared size is checked against it before
# any data is read, and never more than the declared size is inflated (a gzip bomb stops there).
MAX_BYTES = 4 << 30


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file: magic (0, 0, dtype, ndim), big-endian dims, then the data."""
    if not path.exists():
        raise DataError(f"missing file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
                raise DataError(f"{path} is not an IDX file (bad magic number)")
            ndim = head[3]
            dims_raw = handle.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path} is truncated inside its header")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, ">u4", count=ndim))
            dtype = np.dtype(_DTYPES[head[2]])
            expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
            if expected > MAX_BYTES:
                raise DataError(f"{path} declares {dims} ({expected:,} bytes), more than the "
                                f"{MAX_BYTES:,} bytes this reader accepts")
            raw = handle.read(expected + 1)  # one byte more tells trailing data apart
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if len(raw) != expected:
        what = "is truncated" if len(raw) < expected else "has data past its declared size"
        raise DataError(f"{path} {what}: header says {dims}, expected {expected} bytes")
    return np.frombuffer(raw, dtype).reshape(dims)


def load_idx_pair(images_path: Path, labels_path: Path, hint: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, H, W) uint8 and labels (N,) int64 from two IDX files."""
    for path in (images_path, labels_path):
        if not path.exists():
            raise DataError(f"missing data file {path}" + (f"; {hint}" if hint else ""))
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_path} and {labels_path} do not form an image/label pair: "
                        f"shapes {images.shape} and {labels.shape}")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))
