"""Array geometry: bounding boxes, crop/uncrop, the anisotropy rule and new shapes for a new spacing.

Pure numpy, no torch (the planner uses the anisotropy rule too); resampling itself is covnet.image.resampling.
Axis order (z, y, x)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

# nnU-Net's rule: a spacing is anisotropic when its largest/smallest ratio exceeds this.
ANISOTROPY_THRESHOLD = 3.0

BoundingBox = tuple[tuple[int, int], ...]


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


def is_anisotropic(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> bool:
    """True when max(spacing) / min(spacing) > ``threshold``."""
    spacing = np.asarray(spacing, dtype=float)
    return bool(spacing.max() / spacing.min() > threshold)


def coarse_axis(spacing: Sequence[float]) -> int | None:
    """The axis with the largest spacing; None when two or more axes share that largest spacing."""
    spacing = np.asarray(spacing, dtype=float)
    axes = np.flatnonzero(spacing == spacing.max())
    return int(axes[0]) if len(axes) == 1 else None


def separate_z_axis(current_spacing: Sequence[float], target_spacing: Sequence[float],
                    threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """nnU-Net v2's decision: the coarse axis of the current spacing if that one is anisotropic, else that
    of the target spacing if it is anisotropic, else None (resample fully in 3D)."""
    if is_anisotropic(current_spacing, threshold):
        return coarse_axis(current_spacing)
    if is_anisotropic(target_spacing, threshold):
        return coarse_axis(target_spacing)
    return None


def compute_new_shape(shape: Sequence[int], current_spacing: Sequence[float],
                      target_spacing: Sequence[float]) -> tuple[int, ...]:
    """round(shape * current / target) per axis (at least 1)."""
    ratio = np.asarray(current_spacing, dtype=float) / np.asarray(target_spacing, dtype=float)
    return tuple(max(1, int(v)) for v in np.round(np.asarray(shape, dtype=float) * ratio))
