"""Data sets as in-memory uint8 tensors, read without network or pickle."""

from .images import ImageData, load_dataset
from .subset import CLEAN_FRACTION, select_clean_subset

__all__ = ["CLEAN_FRACTION", "ImageData", "load_dataset", "select_clean_subset"]
