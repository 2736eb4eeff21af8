"""Array geometry: bounding boxes, crop/uncrop, and (re-exported from covnet.resampling) the anisotropy rule
and resampling. All functions are pure: numpy in, numpy out, axis order (z, y, x)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from covnet.resampling import (ANISOTROPY_THRESHOLD, coarse_axis, compute_new_shape, is_anisotropic,
                               resample_image, resample_probabilities, resample_segmentation,
                               separate_z_axis)

BoundingBox = tuple[tuple[int, int], ...]

__all__ = ["ANISOTROPY_THRESHOLD", "BoundingBox", "bounding_box", "coarse_axis", "compute_new_shape", "crop",
           "is_anisotropic", "resample_image", "resample_probabilities", "resample_segmentation",
           "separate_z_axis", "uncrop"]


def bounding_box(mask: np.ndarray) -> BoundingBox:
    """Smallest box holding every nonzero voxel: one half-open ``(start, stop)`` per axis."""
    mask = np.asarray(mask)
    if not mask.any():
        raise ValueError("bounding box of an empty mask")
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        used = np.flatnonzero(mask.any(axis=other_axes))
        box.append((int(used[0]), int(used[-1]) + 1))
    return tuple(box)


def _slices(bbox: BoundingBox, shape: Sequence[int]) -> tuple[slice, ...]:
    if len(bbox) > len(shape):
        raise ValueError(f"bounding box {bbox} has more axes than shape {tuple(shape)}")
    offset = len(shape) - len(bbox)  # a box over the trailing axes, e.g. (z, y, x) of (C, z, y, x)
    for (start, stop), size in zip(bbox, shape[offset:]):
        if not 0 <= start < stop <= size:
            raise ValueError(f"bounding box {bbox} does not fit in shape {tuple(shape)}")
    return (slice(None),) * offset + tuple(slice(start, stop) for start, stop in bbox)


def crop(array: np.ndarray, bbox: BoundingBox) -> np.ndarray:
    """The part of ``array`` inside ``bbox`` (a copy); the box covers the trailing axes."""
    return array[_slices(bbox, array.shape)].copy()


def uncrop(array: np.ndarray, bbox: BoundingBox, full_shape: Sequence[int], fill_value=0) -> np.ndarray:
    """Put a cropped ``array`` back at ``bbox`` inside a new array of ``full_shape`` filled with ``fill_value``."""
    full_shape = tuple(int(v) for v in full_shape)
    slices = _slices(bbox, full_shape)
    expected = tuple(len(range(full_shape[i])[s]) for i, s in enumerate(slices))
    if tuple(array.shape) != expected:
        raise ValueError(f"array of shape {array.shape} does not match box {bbox} (expected {expected})")
    full = np.full(full_shape, fill_value, dtype=array.dtype)
    full[slices] = array
    return full
